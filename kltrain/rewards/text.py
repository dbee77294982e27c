"""Text helpers shared by the reward scorers: completion text, tokenising, lexicons."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

from kltrain.rewards.errors import RewardError


def completion_text(completion: Any) -> str:
    """The text of a completion: the string itself, or the ``content`` of its messages joined
    by newlines (conversational completions are lists of ``{role, content}`` messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict) and isinstance(completion.get("content"), str):
        return completion["content"]
    if isinstance(completion, (list, tuple)) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in completion
    ):
        return "\n".join(m["content"] for m in completion)
    raise TypeError(
        f"a completion must be a string or a list of {{role, content}} messages; "
        f"got {type(completion).__name__}"
    )


TOKEN_RE = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*|[.,;:!?]")
WORD_RE = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*")


def normalise_text(text: str) -> str:
    return text.lower().replace("\u2019", "'").replace("\u2018", "'")


@cache
def load_lexicon(name: str) -> frozenset[str]:
    """Entries of ``kltrain/rewards/lexicons/<name>.txt``: lower-case lines, ``#`` comments
    dropped."""
    path = resources.files("kltrain.rewards") / "lexicons" / f"{name}.txt"
    if not path.is_file():
        raise RewardError(f"no lexicon {name!r} in kltrain/rewards/lexicons/")
    entries = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip().lower()
        if line:
            entries.add(line)
    return frozenset(entries)


def phrase_pattern(phrases: Sequence[str]) -> re.Pattern[str]:
    """Case-insensitive whole-word matcher for any of ``phrases`` (longest first; inner
    whitespace matches any run of whitespace)."""
    parts = [r"\s+".join(map(re.escape, p.split())) for p in sorted(phrases, key=len, reverse=True)]
    return re.compile(r"(?<!\w)(?:" + "|".join(parts) + r")(?!\w)", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------
