"""0/1 and feature rewards tiny random models can satisfy, for the f-DPG loop tests."""

from __future__ import annotations


def has_letter_e(prompts, completions, **kwargs):
    """1.0 if the completion contains an 'e' (a constraint a random model meets sometimes)."""
    return [float("e" in c) for c in completions]


def has_letter_a(prompts, completions, **kwargs):
    return [float("a" in c) for c in completions]
