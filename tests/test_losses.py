"""Losses: hand-computed values and gradients, and invariance to how a step is cut up."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kltrain.rl.losses import (
    explained_variance,
    policy_loss,
    sum_over_tokens,
    token_policy_loss,
    value_loss,
)
from tests.conftest import fp32_tol, fp64_tol, reduction_order_tol

F64 = torch.float64
#: The float64 hand-computed cases: ≤ 16 roundings (the decimal inputs, log/exp of the ratio, the
#: sums) of values ≤ 2.2 whose sum can cancel to 0.08 (condition ≤ 100): γ_16·100 ≈ 2e-13.
HAND64 = fp64_tol(16, cond=100.0)
NAN = float("nan")


def _policy_case():
    """Five valid tokens + one padded, old log-prob −1, ε = 0.2, global count 10.

    token  ratio   A    -ratio·A  -clip·A   loss   clip active
      0    1.1    +2     -2.2      -2.2    -2.2     no
      1    1.5    +1     -1.5      -1.2    -1.2     yes (gradient 0)
      2    1.5    -1     +1.5      +1.2    +1.5     no
      3    0.5    -2     +1.0      +1.6    +1.6     yes (gradient 0)
      4    0.5    +1     -0.5      -0.8    -0.5     no
    """
    ratio = torch.tensor([[1.1, 1.5, 1.5, 0.5, 0.5, 1.0]], dtype=F64)
    old = torch.full_like(ratio, -1.0)
    logprobs = (old + ratio.log()).requires_grad_(True)
    with torch.no_grad():
        logprobs[0, 5] = NAN  # padding garbage must not leak into loss or gradient
    adv = torch.tensor([[2.0, 1.0, -1.0, -2.0, 1.0, NAN]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    return logprobs, old, adv, mask


def test_policy_loss_hand_computed():
    logprobs, old, adv, mask = _policy_case()
    loss, metrics = policy_loss(logprobs, old, adv, mask, num_tokens=10, clip_range=0.2)
    assert loss.item() == pytest.approx((-2.2 - 1.2 + 1.5 + 1.6 - 0.5) / 10, rel=HAND64)
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 10, rel=HAND64)
    assert metrics["ratio"].item() == pytest.approx((1.1 + 1.5 + 1.5 + 0.5 + 0.5) / 10, rel=HAND64)
    k3 = sum(r - 1 - math.log(r) for r in [1.1, 1.5, 1.5, 0.5, 0.5])
    assert metrics["approx_kl"].item() == pytest.approx(k3 / 10, rel=HAND64)
    assert all(not m.requires_grad for m in metrics.values())
    loss.backward()
    # d loss_t / d ℓ_t = −ratio·A where the clip is not active, 0 where it is; / num_tokens
    expected = torch.tensor([[-2.2, 0.0, 1.5, 0.0, -0.5, 0.0]], dtype=F64) / 10
    torch.testing.assert_close(logprobs.grad, expected, rtol=HAND64, atol=HAND64)


def test_policy_loss_unclipped_hand_computed():
    logprobs, old, adv, mask = _policy_case()
    loss, metrics = policy_loss(logprobs, old, adv, mask, num_tokens=10, clip_range=None)
    assert loss.item() == pytest.approx((-2.2 - 1.5 + 1.5 + 1.0 - 0.5) / 10, rel=HAND64)
    assert metrics["clip_fraction"].item() == 0.0
    loss.backward()
    expected = torch.tensor([[-2.2, -1.5, 1.5, 1.0, -0.5, 0.0]], dtype=F64) / 10
    torch.testing.assert_close(logprobs.grad, expected, rtol=HAND64, atol=HAND64)


@pytest.mark.parametrize("clip_range", [None, 0.2])
@pytest.mark.parametrize("sequence_level", [False, True])
def test_on_policy_gradient_is_minus_advantage_over_num_tokens(clip_range, sequence_level):
    gen = torch.Generator().manual_seed(0)
    logprobs = (-torch.rand(3, 4, generator=gen, dtype=F64)).requires_grad_(True)
    old = logprobs.detach().clone()
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    adv = torch.randn(3, generator=gen, dtype=F64)
    token_adv = adv[:, None].expand(3, 4)
    loss, metrics = policy_loss(
        logprobs, old, adv if sequence_level else token_adv, mask, 7, clip_range
    )
    loss.backward()
    expected = torch.where(mask.bool(), -token_adv / 7, 0.0)
    torch.testing.assert_close(logprobs.grad, expected, rtol=HAND64, atol=HAND64)
    assert metrics["approx_kl"].item() == 0.0
    assert metrics["ratio"].item() == pytest.approx(1.0, rel=HAND64)


#: policy_loss's metric → the per-token stat of token_policy_loss it sums.
STAT_OF = {"clip_fraction": "clipped", "approx_kl": "approx_kl", "ratio": "ratio"}


def _random_step(seed: int):
    gen = torch.Generator().manual_seed(seed)
    b, t = 6, 7
    lengths = torch.tensor([7, 3, 5, 1, 6, 2])
    mask = torch.arange(t).expand(b, t) < lengths[:, None]
    logprobs = -torch.rand(b, t, generator=gen) * 3
    old = logprobs + 0.3 * torch.randn(b, t, generator=gen)
    adv = torch.randn(b, t, generator=gen)
    return logprobs, old, adv, mask


@pytest.mark.parametrize("clip_range", [None, 0.2])
def test_micro_batches_sum_to_the_whole_batch(clip_range):
    logprobs, old, adv, mask = _random_step(1)
    num_tokens = int(mask.sum())
    whole_lp = logprobs.clone().requires_grad_(True)
    whole, whole_metrics = policy_loss(whole_lp, old, adv, mask, num_tokens, clip_range)
    whole.backward()

    parts_lp = logprobs.clone().requires_grad_(True)
    total = torch.zeros(())
    summed = {k: torch.zeros(()) for k in whole_metrics}
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):  # uneven micro-batches
        loss, metrics = policy_loss(
            parts_lp[rows], old[rows], adv[rows], mask[rows], num_tokens, clip_range
        )
        loss.backward()  # gradient accumulation
        total = total + loss.detach()
        summed = {k: summed[k] + metrics[k] for k in summed}
    # fp32: the same per-token terms summed in another order (reduction-order bound at their
    # absolute sum); each token's gradient is the same few elementwise operations (exp, ×, ÷),
    # which vectorised and scalar code may round differently (≤ 4 roundings relative)
    per_token, stats = token_policy_loss(logprobs[mask], old[mask], adv[mask], clip_range)
    abs_sum = float(per_token.detach().abs().sum()) / num_tokens
    assert abs(float(total) - float(whole)) <= reduction_order_tol(num_tokens, abs_sum)
    torch.testing.assert_close(parts_lp.grad, whole_lp.grad, rtol=2 * fp32_tol(4), atol=0)
    for k in summed:
        stat_sum = float(stats[STAT_OF[k]].abs().sum()) / num_tokens
        tol = reduction_order_tol(num_tokens, stat_sum)
        assert abs(float(summed[k]) - float(whole_metrics[k])) <= tol, k


def test_token_form_on_flat_axis_is_the_summed_form():
    """The chunked kernel's path: valid tokens flattened to [N], per-token loss, sum / count."""
    logprobs, old, adv, mask = _random_step(2)
    num_tokens = int(mask.sum())
    loss, metrics = policy_loss(logprobs, old, adv, mask, num_tokens, 0.2)
    flat_loss, stats = token_policy_loss(logprobs[mask], old[mask], adv[mask], 0.2)
    assert flat_loss.shape == (num_tokens,)
    # the same fp32 terms summed flat or per row: the reduction-order bound
    tol = reduction_order_tol(num_tokens, float(flat_loss.abs().sum()) / num_tokens)
    assert abs(float(sum_over_tokens(flat_loss, None, num_tokens)) - float(loss)) <= tol
    # a count of 0/1 flags over num_tokens: exact
    clipped = sum_over_tokens(stats["clipped"], None, num_tokens)
    assert float(clipped) == float(metrics["clip_fraction"])


def test_policy_loss_rejects_mismatched_advantages():
    with pytest.raises(ValueError, match="advantages"):
        token_policy_loss(torch.zeros(4), torch.zeros(4), torch.zeros(2), 0.2)
    with pytest.raises(ValueError, match="num_tokens"):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), 0, 0.2)


def test_value_loss_hand_computed():
    # V_old = 1, ε = 0.2:
    # V=1.1 R=2: (−0.9)²=0.81, clip(V)=1.1 same          → 0.405, not clipped
    # V=1.5 R=2: 0.25, clip(V)=1.2 → 0.64                  → 0.32,  clipped (gradient 0)
    # V=1.5 R=1: 0.25, clip(V)=1.2 → 0.04                  → 0.125, not clipped
    # V=0.5 R=0: 0.25, clip(V)=0.8 → 0.64                  → 0.32,  clipped (gradient 0)
    values = torch.tensor([[1.1, 1.5, 1.5, 0.5, NAN]], dtype=F64, requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 1.0, 1.0, NAN]], dtype=F64)
    returns = torch.tensor([[2.0, 2.0, 1.0, 0.0, NAN]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, metrics = value_loss(values, old, returns, mask, num_tokens=4, clip_range=0.2)
    assert loss.item() == pytest.approx((0.405 + 0.32 + 0.125 + 0.32) / 4, rel=HAND64)
    assert metrics["value_clip_fraction"].item() == 0.5  # 2 of 4, exact
    assert metrics["value_mse"].item() == pytest.approx((0.81 + 0.25 + 0.25 + 0.25) / 4, rel=HAND64)
    loss.backward()
    expected = torch.tensor([[-0.9, 0.0, 0.5, 0.0, 0.0]], dtype=F64) / 4
    torch.testing.assert_close(values.grad, expected, rtol=HAND64, atol=HAND64)

    unclipped, m = value_loss(values, old, returns, mask, num_tokens=4, clip_range=None)
    assert unclipped.item() == pytest.approx(0.5 * (0.81 + 0.25 + 0.25 + 0.25) / 4, rel=HAND64)
    assert m["value_clip_fraction"].item() == 0.0


def test_explained_variance_matches_numpy():
    gen = torch.Generator().manual_seed(3)
    returns = torch.randn(4, 5, generator=gen, dtype=F64)
    values = returns + 0.5 * torch.randn(4, 5, generator=gen, dtype=F64)
    mask = torch.rand(4, 5, generator=gen) < 0.7
    values[~mask] = 1e9
    r, v = returns[mask].numpy(), values[mask].numpy()
    expected = 1 - np.var(r - v) / np.var(r)
    assert explained_variance(values, returns, mask).item() == pytest.approx(expected, rel=HAND64)
    assert explained_variance(returns, returns, mask).item() == 1.0  # Var[0] = 0 exactly
    assert math.isnan(explained_variance(values, torch.ones(4, 5), mask).item())
