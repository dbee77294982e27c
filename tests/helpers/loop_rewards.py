"""Reward callables (TRL signature) used by the loop tests, importable by path."""

from __future__ import annotations

_calls = {"n": 0}


def fail_after_first_call(prompts, completions, **kwargs):
    """Scores the first batch, then raises: the run must stop at step 2 and keep step 1."""
    _calls["n"] += 1
    if _calls["n"] > 1:
        raise RuntimeError("reward service went away")
    return [float(len(c)) for c in completions]


def letter_e_count(prompts, completions, **kwargs):
    """A reward tiny random models can move and that rarely ties within a group: the number of
    'e's plus a tenth of the completion's length in characters."""
    return [c.count("e") + 0.1 * len(c) for c in completions]


def none_for_second_sample(prompts, completions, **kwargs):
    """Like letter_e_count, but the second sample of every batch has no score (None)."""
    return [None if i == 1 else c.count("e") + 0.1 * len(c) for i, c in enumerate(completions)]
