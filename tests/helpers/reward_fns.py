"""Reward callables importable by path (``helpers.reward_fns:<name>``) for tests/test_rewards.py:
well-behaved ones that expose what they were given, and broken ones for each invalid case."""

from __future__ import annotations

import math

CALLS: list[dict] = []  # what from_column / record saw, newest last


def from_column(prompts, completions, *, column="score", offset=0.0, **kwargs):
    """Score = the dataset column ``column`` (+ ``offset``): hand-computable transform inputs."""
    CALLS.append({"prompts": list(prompts), "completions": list(completions), **kwargs})
    return [float(v) + offset for v in kwargs[column]]


def completion_length(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def raises_on_bad(prompts, completions, **kwargs):
    """Fails the whole call if any completion contains 'bad' (so only per-sample retries
    can tell which sample is at fault)."""
    if any("bad" in c for c in completions):
        raise ValueError("cannot score a bad completion")
    return [1.0] * len(completions)


def raises_on_batches(prompts, completions, **kwargs):
    """Fails whenever it gets more than one sample: a batch-level failure."""
    if len(completions) > 1:
        raise RuntimeError("batch too large")
    return [1.0]


def wrong_length(prompts, completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def not_a_list(prompts, completions, **kwargs):
    return 1.0


def _marked(completions, value):
    return [value if "bad" in c else 1.0 for c in completions]


def none_on_bad(prompts, completions, **kwargs):
    return _marked(completions, None)


def nan_on_bad(prompts, completions, **kwargs):
    return _marked(completions, math.nan)


def inf_on_bad(prompts, completions, **kwargs):
    return _marked(completions, math.inf)


def text_on_bad(prompts, completions, **kwargs):
    return _marked(completions, "high")


def tensor_scores(prompts, completions, *, shape="flat", **kwargs):
    """Scores as a tensor: [n] ("flat"), [n, 1] ("column") or [n, 2] ("wide", invalid)."""
    import torch

    x = torch.arange(len(completions), dtype=torch.float32)
    return {"flat": x, "column": x[:, None], "wide": torch.stack([x, x], 1)}[shape]


def list_on_bad(prompts, completions, **kwargs):
    return _marked(completions, [1.0, 2.0])


def no_kwargs(prompts, completions):
    return [0.0] * len(completions)


NOT_CALLABLE = 3
