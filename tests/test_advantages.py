"""Advantages: hand-computed tensors, naive loops, numpy and TRL as independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kltrain.algorithms import make_algorithm
from kltrain.algorithms.grpo import STD_EPS
from kltrain.config import config_from_dict
from kltrain.rl.advantages import (
    assemble_token_rewards,
    gae,
    group_mean_std,
    rloo_baseline,
    whiten,
)
from tests.conftest import U64, fp32_tol, fp64_tol, reduction_order_tol
from tests.test_algorithms import _bandit_rollout

F64 = torch.float64
#: Float64 token-level recursions (GAE, reward-to-go, whitening) over ≤ 9 tokens, ≤ 4 roundings
#: each, on values whose partial sums may cancel (randn inputs: allowance 8): γ_36·8 ≈ 3e-14.
SEQ64 = fp64_tol(36, cond=8.0)


def _right_padded(lengths: list[int], width: int) -> torch.Tensor:
    """Right-padded rows of the given lengths."""
    return torch.arange(width).expand(len(lengths), width) < torch.tensor(lengths)[:, None]


# --- RLOO / GRPO: through the algorithms' prepare(), the code the loop runs -------------------


def loop_advantages(name: str, rewards, k: int, valid=None, scale_rewards: bool = True):
    """Sequence advantages [P*k] of ``algorithm.name`` (rloo or grpo) as the loop computes them:
    ``prepare`` on a one-token rollout (no divergence in the reward); samples with
    ``valid`` False have their completion mask cleared, as the loop does for invalid rewards."""
    algorithm = {"name": name, "num_generations": k}
    if name == "grpo":
        algorithm["scale_rewards"] = scale_rewards
    algo = make_algorithm(config_from_dict({"algorithm": algorithm}))
    rollout = _bandit_rollout(torch.zeros(len(rewards), dtype=torch.long), k)
    if valid is not None:
        rollout.completion_mask = valid.view(-1, 1).clone()
    return algo.prepare(rollout, rewards, None).advantages[:, 0]


def rloo(rewards, k, valid=None):
    return loop_advantages("rloo", rewards, k, valid)


def grpo(rewards, k, valid=None, scale_rewards=True):
    return loop_advantages("grpo", rewards, k, valid, scale_rewards)


def test_rloo_hand_computed():
    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0], dtype=F64)
    # group 1: 1 - (2+6)/2, 2 - (1+6)/2, 6 - (1+2)/2; group 2: 0 - 3/2, 0 - 3/2, 3 - 0
    expected = torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0], dtype=F64)
    # small integers and halves: every operation is exact in float64
    torch.testing.assert_close(rloo(r, 3), expected, rtol=0, atol=0)


def test_rloo_matches_naive_loop():
    gen = torch.Generator().manual_seed(0)
    k, p = 5, 7
    r = torch.randn(p * k, generator=gen, dtype=F64)
    expected = []
    for i in range(p * k):
        g = i // k
        others = [r[j].item() for j in range(g * k, g * k + k) if j != i]
        expected.append(r[i].item() - sum(others) / len(others))
    # two float64 evaluations of a k-term sum and one division, at the rewards' scale
    tol = reduction_order_tol(k + 2, float(r.abs().max()) * k, U64)
    torch.testing.assert_close(rloo(r, k), torch.tensor(expected, dtype=F64), rtol=0, atol=tol)


def test_grpo_hand_computed():
    r = torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0, 4.0], dtype=F64)
    # group 1: mean 3, deviations (-2, -1, 3), unbiased var (4+1+9)/2 = 7; group 2: constant.
    std = math.sqrt(7.0)
    s = std + STD_EPS
    expected = torch.tensor([-2 / s, -1 / s, 3 / s, 0.0, 0.0, 0.0], dtype=F64)
    # mean, variance (3 terms), sqrt, + ε, division: ≤ 8 float64 roundings of O(1) values
    torch.testing.assert_close(grpo(r, 3), expected, rtol=fp64_tol(8), atol=0)
    unscaled = torch.tensor([-2.0, -1.0, 3.0, 0.0, 0.0, 0.0], dtype=F64)
    torch.testing.assert_close(grpo(r, 3, scale_rewards=False), unscaled, rtol=0, atol=0)


def test_grpo_matches_naive_loop():
    gen = torch.Generator().manual_seed(1)
    k, p = 4, 6
    r = torch.randn(p * k, generator=gen, dtype=F64)
    expected = []
    for i in range(p * k):
        group = [r[j].item() for j in range(i // k * k, i // k * k + k)]
        mean = sum(group) / k
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (k - 1))
        expected.append((r[i].item() - mean) / (std + STD_EPS))
    got = grpo(r, k)
    # both in float64: the mean and the variance are k-term sums (relative to the group's
    # scale; a deviation / std is ≤ √(k−1) in size), then sqrt and a division
    atol = 2 * fp64_tol(2 * k + 4, cond=float(r.abs().max()) / 0.1) * math.sqrt(k - 1)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=0, atol=atol)


def test_grpo_matches_trl_group_normalisation():
    """TRL's GRPOTrainer: (r - nanmean(group)) / (nanstd(group) + 1e-4), nanstd from trl."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    gen = torch.Generator().manual_seed(2)
    k = 8
    r = torch.randn(5 * k, generator=gen, dtype=F64)
    mean = torch.nanmean(r.view(-1, k), dim=1).repeat_interleave(k)
    std = trl_utils.nanstd(r.view(-1, k), dim=1).repeat_interleave(k)
    trl_adv = (r - mean) / (std + 1e-4)
    # in float64, both: the same formula with other summation orders (as test_grpo_matches_
    # naive_loop's bound), except that trl's nanstd forms its Bessel factor k/(k−1) from a
    # float32 count: one fp32 rounding of the variance, half of it in the std (rtol u32)
    atol = 2 * fp64_tol(2 * k + 4, cond=float(r.abs().max()) / 0.1) * math.sqrt(k - 1)
    torch.testing.assert_close(grpo(r, k), trl_adv, rtol=fp32_tol(1), atol=atol)


@pytest.mark.parametrize("fn", [rloo_baseline, group_mean_std])
def test_group_layout_errors(fn):
    with pytest.raises(ValueError, match="groups of 3"):
        fn(torch.zeros(7), 3)
    with pytest.raises(ValueError, match="≥ 2"):
        fn(torch.zeros(4), 1)


# --- reward-to-go and GAE ------------------------------------------------------------------


def _gae_loop(rewards, values, mask, gamma, lam):
    """Textbook GAE on each row's valid tokens, compacted, in Python floats."""
    adv = np.zeros(rewards.shape)
    ret = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        r = [float(rewards[b, t]) for t in idx]
        v = [float(values[b, t]) for t in idx] + [0.0]
        running = 0.0
        for j in reversed(range(len(idx))):
            delta = r[j] + gamma * v[j + 1] - v[j]
            running = delta + gamma * lam * running
            adv[b, idx[j]] = running
            ret[b, idx[j]] = running + v[j]
    return torch.tensor(adv), torch.tensor(ret)


def test_gae_hand_computed_three_tokens():
    r = torch.tensor([[0.0, 0.0, 1.0, 5.0]], dtype=F64)
    v = torch.tensor([[0.5, 0.6, 0.7, float("nan")]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    # γ=0.9, λ=0.8: δ = (0.9·0.6−0.5, 0.9·0.7−0.6, 1−0.7) = (0.04, 0.03, 0.3)
    # A_2 = 0.3, A_1 = 0.03 + 0.72·0.3 = 0.246, A_0 = 0.04 + 0.72·0.246 = 0.21712
    adv, ret = gae(r, v, mask, gamma=0.9, lam=0.8)
    want_adv = torch.tensor([[0.21712, 0.246, 0.3, 0.0]], dtype=F64)
    torch.testing.assert_close(adv, want_adv, rtol=SEQ64, atol=SEQ64)
    want_ret = torch.tensor([[0.71712, 0.846, 1.0, 0.0]], dtype=F64)
    torch.testing.assert_close(ret, want_ret, rtol=SEQ64, atol=SEQ64)
    assert adv[0, 3].item() == 0.0 and ret[0, 3].item() == 0.0


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.7, 0.0), (0.5, 1.0)])
def test_gae_matches_loop_with_padding(gamma, lam):
    gen = torch.Generator().manual_seed(3)
    lengths = [9, 1, 4, 7, 9, 2]
    mask = _right_padded(lengths, 9)
    mask[4, :3] = False  # a left-padded row too
    r = torch.randn(6, 9, generator=gen, dtype=F64)
    v = torch.randn(6, 9, generator=gen, dtype=F64)
    v[~mask] = 1e6  # garbage at padding must not leak
    adv, ret = gae(r, v, mask, gamma, lam)
    exp_adv, exp_ret = _gae_loop(r, v, mask, gamma, lam)
    torch.testing.assert_close(adv, exp_adv, rtol=SEQ64, atol=SEQ64)
    torch.testing.assert_close(ret, exp_ret, rtol=SEQ64, atol=SEQ64)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def reward_to_go(r: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Naive reference: G_t = Σ_{t' ≥ t, valid} γ^(number of valid tokens in [t, t')) r_t',
    by a Python loop over each row's valid positions; 0 at padding."""
    out = torch.zeros_like(r)
    for b in range(r.shape[0]):
        valid = [t for t in range(r.shape[1]) if mask[b, t]]
        for i, t in enumerate(valid):
            out[b, t] = sum(gamma**j * r[b, t2] for j, t2 in enumerate(valid[i:]))
    return out


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    gen = torch.Generator().manual_seed(4)
    mask = _right_padded([5, 3, 1], 5)
    r = torch.randn(3, 5, generator=gen, dtype=F64)
    v = torch.randn(3, 5, generator=gen, dtype=F64)
    adv, ret = gae(r, v, mask, 1.0, 1.0)
    rtg = reward_to_go(r, mask)
    torch.testing.assert_close(adv, torch.where(mask, rtg - v, 0.0), rtol=SEQ64, atol=SEQ64)
    torch.testing.assert_close(ret, rtg, rtol=SEQ64, atol=SEQ64)


def test_reward_to_go_reference_hand_computed():
    r = torch.tensor([[1.0, 2.0, 3.0, 7.0], [4.0, 0.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    # γ=0.5: row 0: G2 = 3, G1 = 2 + 1.5 = 3.5, G0 = 1 + 1.75 = 2.75; row 1: 4
    expected = torch.tensor([[2.75, 3.5, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]], dtype=F64)
    # integers and halves: exact in float64
    torch.testing.assert_close(reward_to_go(r, mask, 0.5), expected, rtol=0, atol=0)


def test_outputs_are_detached():
    r = torch.randn(2, 3, requires_grad=True)
    v = torch.randn(2, 3, requires_grad=True)
    mask = torch.ones(2, 3)
    adv, ret = gae(r, v, mask, 1.0, 0.9)
    assert not adv.requires_grad and not ret.requires_grad


# --- token rewards -------------------------------------------------------------------------


def test_assemble_token_rewards_lengths_and_padding():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    penalty = torch.tensor(
        [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, float("nan"), 9.0], [0.7, float("inf"), 1.0, 1.0]],
        dtype=F64,
    )
    reward = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    got = assemble_token_rewards(reward, penalty, mask, coef=0.5)
    expected = torch.tensor(
        [
            [-0.05, -0.10, -0.15, -0.20 + 1.0],
            [-0.25, -0.30 + 2.0, 0.0, 0.0],
            [-0.35 + 3.0, 0.0, 0.0, 0.0],
        ],
        dtype=F64,
    )
    # decimal inputs (one rounding each), one product and one sum: ≤ 4 roundings of values ≤ 3
    torch.testing.assert_close(got, expected, rtol=0, atol=fp64_tol(4, cond=3.0))
    # the sum over a row is R - coef·Σ d: the MATH.md PPO reward (4-term sums, values ≤ 3)
    want = reward - 0.5 * torch.where(mask.bool(), penalty, 0).sum(1)
    torch.testing.assert_close(got.sum(1), want, rtol=0, atol=2 * fp64_tol(8, cond=3.0))


def test_assemble_token_rewards_needs_a_valid_token():
    with pytest.raises(ValueError, match="no valid token"):
        assemble_token_rewards(
            torch.ones(2), torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0] * 3]), 0.1
        )


# --- whitening and running moments ---------------------------------------------------------


def test_whiten_matches_numpy():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, generator=gen, dtype=F64) * 3 + 2
    mask = _right_padded([6, 2, 5, 3], 6)
    x[~mask] = float("nan")
    valid = x[mask].numpy()
    mean, std = valid.mean(), valid.std(ddof=0)
    got = whiten(x, mask, eps=0.0)
    # 16 values: two 16-term sums (mean, variance), sqrt, division; x = 3·randn + 2, so a
    # deviation is ≥ 1/1000 of the values' scale here: allowance 1e3 at the result
    tol = 2 * fp64_tol(2 * 16 + 4, cond=1e3)
    np.testing.assert_allclose(got[mask].numpy(), (valid - mean) / std, rtol=tol, atol=tol)
    assert (got[~mask] == 0).all()
    scaled = whiten(x, mask, shift_mean=False, eps=0.0)
    want = (valid - mean) / std + mean
    np.testing.assert_allclose(scaled[mask].numpy(), want, rtol=tol, atol=tol)
    flat = x[mask]
    want = (valid - mean) / std
    np.testing.assert_allclose(whiten(flat, eps=0.0).numpy(), want, rtol=tol, atol=tol)


def test_invalid_samples_leave_every_baseline():
    """`reward.on_invalid: skip` clears a sample: it gets advantage 0 and is in no baseline."""
    r = torch.tensor([1.0, 2.0, 100.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    valid = torch.tensor([True, True, False, True, True, True, True, False])
    # group 1: valid 1, 2, 4 → b = mean of the other two valid
    a_rloo = rloo(r, 4, valid)
    assert a_rloo.tolist()[:4] == [1 - 3.0, 2 - 2.5, 0.0, 4 - 1.5]  # exact in fp32
    # group 2: valid 5, 6, 7
    assert a_rloo.tolist()[4:] == [5 - 6.5, 6 - 6.0, 7 - 5.5, 0.0]
    a_grpo = grpo(r, 4, valid=valid)
    g1 = torch.tensor([1.0, 2.0, 4.0], dtype=F64)
    expected = (g1 - g1.mean()) / (g1.std(unbiased=True) + STD_EPS)
    # fp32 against float64: mean, 3-term variance, sqrt, + ε, division of O(1) values
    torch.testing.assert_close(a_grpo[[0, 1, 3]].double(), expected, rtol=fp32_tol(8), atol=0)
    assert a_grpo[2] == 0 and a_grpo[7] == 0


def test_a_lone_valid_sample_has_no_baseline_and_zero_advantage():
    r = torch.tensor([3.0, 9.0])
    valid = torch.tensor([True, False])
    assert rloo(r, 2, valid).tolist() == [0.0, 0.0]
    assert grpo(r, 2, valid=valid).tolist() == [0.0, 0.0]
    mean, std = group_mean_std(r, 2, valid)
    assert mean.tolist() == [3.0, 3.0] and std.tolist() == [0.0, 0.0]
