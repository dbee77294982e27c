"""Reward callables for the fault tests (tests/test_faults.py), importable by path."""

from __future__ import annotations


def none_for_first_group(prompts, completions, **kwargs):
    """No score (None) for the first two samples (the first prompt's group when k = 2)."""
    return [None if i < 2 else c.count("e") + 0.1 * len(c) for i, c in enumerate(completions)]


def always_none(prompts, completions, **kwargs):
    """No sample has a score."""
    return [None] * len(completions)


def raises(prompts, completions, **kwargs):
    raise RuntimeError("the reward service is down")
