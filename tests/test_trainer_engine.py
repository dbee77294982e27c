"""kltrain/training/trainer_engine.py's gradient clipping: torch's ``clip_grad_norm_`` bit for
bit, without a pass over the gradients when the norm is within the limit."""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from kltrain.training.trainer_engine import clip_grad_norm


def params_with_grads(scale: float) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in [(7, 5), (5,)]]
    for p in params:
        p.grad = scale * torch.randn(p.shape, generator=g)
    params.append(torch.nn.Parameter(torch.ones(3)))  # no gradient: skipped, as torch does
    return params


MULTIPLIES = ("aten::mul_", "aten::_foreach_mul_")


def clip_counting_multiplies(params, max_norm: float) -> tuple[float, int]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        norm = clip_grad_norm(params, max_norm)
    return norm, sum(e.count for e in prof.key_averages() if e.key in MULTIPLIES)


@pytest.mark.parametrize(
    ("scale", "max_norm", "clips"),
    [(0.01, 1.0, False), (10.0, 1.0, True), (1.0, math.inf, False)],
)
def test_clip_grad_norm_is_torchs_bit_for_bit(scale, max_norm, clips):
    ours, theirs = params_with_grads(scale), params_with_grads(scale)
    got, calls = clip_counting_multiplies(ours, max_norm)
    want = float(torch.nn.utils.clip_grad_norm_(theirs, max_norm))
    assert got == want
    for a, b in zip(ours[:2], theirs[:2], strict=True):
        assert torch.equal(a.grad, b.grad)
    assert ours[2].grad is None
    assert (calls > 0) == clips  # within the limit: no multiply by 1.0 over every gradient
    if clips:
        unclipped = params_with_grads(scale)
        assert not torch.equal(ours[0].grad, unclipped[0].grad)
