"""Reward errors: each names the term, and for invalid outputs the step and the sample."""

from __future__ import annotations

from typing import Any


class RewardError(ValueError):
    """A reward configuration problem: names the term and what would be valid."""


class InvalidRewardError(RewardError):
    """A reward term produced no usable score (raised, wrong length, None/NaN/inf) under
    ``on_invalid="error"``: names the term, the step and the sample (with its prompt)."""


def check(ok: bool, what: str, got: Any) -> None:
    if not ok:
        raise RewardError(f"{what}; got {got!r}")
