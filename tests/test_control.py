"""Controllers: adaptive β against MATH.md's update, Z estimate against exact enumeration."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from kltrain.algorithms.fdpg.partition import LogPartitionEstimate
from kltrain.rl.coef import AdaptiveCoef, FixedCoef, make_coef
from tests.conftest import fp64_tol

F64 = torch.float64
#: One controller update or one log-mean-exp in float64: ≤ 16 roundings of quantities at most
#: 4 times the result (log-sum-exp of a few terms, β·(1 + e·n/H)).
F64_FEW = fp64_tol(16, cond=4.0)


# --- β ------------------------------------------------------------------------------------


def test_fixed_coef_never_moves():
    coef = FixedCoef(0.05)
    assert coef.update(100.0, 256) == 0.05 and coef.value == 0.05
    restored = FixedCoef(1.0)
    restored.load_state_dict(json.loads(json.dumps(coef.state_dict())))
    assert restored.value == 0.05


def test_adaptive_coef_scripted_sequence():
    """MATH.md: e = clip(KL/target − 1, −0.2, 0.2), β ← β·(1 + e·n_steps/H).

    target 6, H 10000, n_steps 256 (so e·n/H = e·0.0256); observed → e by hand:
    6 → 0, 9 → +0.5 clipped to +0.2, 3 → −0.5 clipped to −0.2, 6.6 → +0.1,
    0 → −1 clipped to −0.2, 100 → clipped +0.2, 5.4 → −0.1.
    """
    observed = [6.0, 9.0, 3.0, 6.6, 0.0, 100.0, torch.tensor(5.4, dtype=F64)]
    factors = [1.0, 1.00512, 0.99488, 1.00256, 0.99488, 1.00512, 0.99744]
    coef = AdaptiveCoef(0.1, target=6.0, horizon=10000.0)
    beta = 0.1
    for obs, factor in zip(observed, factors):
        beta *= factor
        # the product of k factors, each ≤ 16 roundings: γ_{16k}
        assert coef.update(obs, 256) == pytest.approx(beta, rel=fp64_tol(16 * 7))
    assert coef.value == pytest.approx(
        0.1 * 1.00512 * 0.99488 * 1.00256 * 0.99488 * 1.00512 * 0.99744, rel=fp64_tol(16 * 7)
    )


def test_adaptive_coef_error_is_clipped_at_a_fifth():
    for observed, factor in [(1e9, 1.2), (12.0, 1.2), (0.0, 0.8), (4.0, 0.8), (5.5, 1.1)]:
        coef = AdaptiveCoef(1.0, target=5.0, horizon=10.0)
        assert coef.update(observed, 10) == pytest.approx(factor, rel=F64_FEW)


def test_adaptive_coef_state_round_trip():
    coef = AdaptiveCoef(0.2, target=3.0, horizon=500.0)
    coef.update(4.0, 8)
    restored = AdaptiveCoef(1.0, target=1.0, horizon=1.0)
    restored.load_state_dict(json.loads(json.dumps(coef.state_dict())))
    for obs in [1.0, 5.0, 3.3]:
        assert restored.update(obs, 8) == coef.update(obs, 8)
    assert restored.state_dict() == coef.state_dict()


def test_make_coef():
    assert isinstance(make_coef(0.1, None, None), FixedCoef)
    assert isinstance(make_coef(0.1, None, 10000.0), FixedCoef)
    adaptive = make_coef(0.1, 6.0, 10000.0)
    assert isinstance(adaptive, AdaptiveCoef) and adaptive.target == 6.0
    with pytest.raises(ValueError, match="horizon"):
        make_coef(0.1, 6.0, None)
    with pytest.raises(ValueError):
        make_coef(0.1, 0.0, 10.0)


# --- Z -------------------------------------------------------------------------------------

# A bandit over four outputs: Z = Σ_y π_ref(y)·exp(R(y)/β), sampled from a different π_θ.
PI_REF = np.array([0.1, 0.2, 0.3, 0.4])
PI_THETA = np.array([0.4, 0.3, 0.2, 0.1])
REWARD = np.array([1.0, -2.0, 0.5, 3.0])
BETA = 0.7
Z_EXACT = float(np.sum(PI_REF * np.exp(REWARD / BETA)))
LOG_W = REWARD / BETA + np.log(PI_REF) - np.log(PI_THETA)  # log-weight of each output


def test_single_batch_estimate_is_unbiased_by_exact_enumeration():
    """E[Ẑ] over every 3-sample batch from π_θ equals Z exactly; E[log Ẑ] < log Z (Jensen),
    which is why the estimate averages Z and not log Z."""
    expected_z, expected_log_z = 0.0, 0.0
    for batch in itertools.product(range(4), repeat=3):
        prob = float(np.prod(PI_THETA[list(batch)]))
        log_z = LogPartitionEstimate(rate=None).update(None, torch.tensor(LOG_W[list(batch)]))
        expected_z += prob * math.exp(log_z)
        expected_log_z += prob * log_z
    # 64 batches, each a 3-term log-mean-exp and a product of 3 probabilities
    assert expected_z == pytest.approx(Z_EXACT, rel=fp64_tol(64 + 16, cond=4.0))
    assert expected_log_z < math.log(Z_EXACT) - 0.05


def test_cumulative_mean_is_the_mean_of_all_weights_and_converges():
    rng = np.random.default_rng(0)
    est = LogPartitionEstimate(rate=None)
    all_w = []
    for n in rng.integers(1, 12, size=1500):
        ys = rng.choice(4, size=n, p=PI_THETA)
        log_z = est.update("prompt", torch.tensor(LOG_W[ys]))
        all_w.append(np.exp(LOG_W[ys]))
    w = np.concatenate(all_w)
    # 1500 running updates of ≤ 16 roundings each, against numpy's mean of all weights
    assert math.exp(log_z) == pytest.approx(w.mean(), rel=fp64_tol(1500 * 16 + w.size))
    # Ẑ over ~9000 samples is within 5 standard errors of the exact Z
    std_err = math.sqrt(np.sum(PI_THETA * (np.exp(LOG_W) - Z_EXACT) ** 2) / w.size)
    assert abs(math.exp(log_z) - Z_EXACT) < 5 * std_err
    assert est.count["prompt"] == w.size


def test_cumulative_mean_converges_while_the_policy_moves():
    """Z does not depend on θ: batches drawn from a drifting policy all estimate the same Z."""
    rng = np.random.default_rng(1)
    est = LogPartitionEstimate(rate=None)
    steps, n, var_sum = 4000, 4, 0.0
    for step in range(steps):
        s = step / steps  # π_θ drifts from PI_THETA to π_ref
        pi = (1 - s) * PI_THETA + s * PI_REF
        ys = rng.choice(4, size=n, p=pi)
        log_w = REWARD[ys] / BETA + np.log(PI_REF[ys]) - np.log(pi[ys])
        log_z = est.update(None, torch.tensor(log_w))
        w = np.exp(REWARD / BETA) * PI_REF / pi
        var_sum += n * (np.sum(pi * w**2) - Z_EXACT**2)  # exact variance of this batch's sum
    std_err = math.sqrt(var_sum) / (steps * n)
    assert abs(math.exp(log_z) - Z_EXACT) < 5 * std_err
    assert 5 * std_err < 0.1 * Z_EXACT  # the bound is a real test


def test_moving_average_of_z_in_plain_space():
    est = LogPartitionEstimate(rate=0.25)
    batches = [[0.0, 1.0], [2.0], [-1.0, 0.5, 3.0]]
    z = None
    for b in batches:
        z_hat = float(np.mean(np.exp(b)))
        z = z_hat if z is None else 0.75 * z + 0.25 * z_hat
        assert math.exp(est.update(7, torch.tensor(b))) == pytest.approx(z, rel=3 * F64_FEW)


def test_per_key_estimates_are_separate():
    est = LogPartitionEstimate(rate=None)
    keys = ["a", "b", "a", 3, "b", "a"]
    log_w = torch.tensor([0.0, 1.0, 2.0, -4.0, 3.0, 1.0], dtype=F64)
    got = est.update(keys, log_w)

    def log_mean_exp(xs):
        return math.log(np.mean(np.exp(xs)))

    want = {"a": log_mean_exp([0.0, 2.0, 1.0]), "b": log_mean_exp([1.0, 3.0]), 3: -4.0}
    want_t = torch.tensor([want[k] for k in keys], dtype=F64)
    torch.testing.assert_close(got, want_t, rtol=F64_FEW, atol=F64_FEW)
    for k, v in want.items():
        assert est.get(k) == pytest.approx(v, rel=F64_FEW)
    # tensor keys (prompt indices) become plain ints; a batch for key 3 leaves "b" alone
    est.update(torch.tensor([3, 3]), torch.tensor([-4.0, -4.0]))
    assert est.get(3) == pytest.approx(-4.0, rel=F64_FEW) and est.count[3] == 3
    assert est.get("b") == want["b"]  # untouched
    with pytest.raises(KeyError):
        est.get(None)


def test_extreme_log_weights_do_not_overflow():
    est = LogPartitionEstimate(rate=0.1)
    log_z = est.update(None, torch.tensor([1000.0, 1001.0, -1000.0], dtype=F64))
    expected = 1001.0 + math.log((math.exp(-1) + 1.0 + 0.0) / 3)
    assert log_z == pytest.approx(expected, rel=F64_FEW)
    log_z = est.update(None, torch.tensor([5000.0]))
    assert log_z == pytest.approx(5000.0 + math.log(0.1), rel=F64_FEW)
    # a batch where every sample violates a binary constraint: Ẑ = 0, log Ẑ = −inf
    fresh = LogPartitionEstimate(rate=None)
    assert fresh.update("c", torch.full((4,), -math.inf)) == -math.inf
    assert fresh.update("c", torch.tensor([0.0])) == pytest.approx(math.log(1 / 5), rel=F64_FEW)


def test_z_state_round_trip_through_json_keeps_key_types():
    est = LogPartitionEstimate(rate=0.5)
    est.update(["p1", 2, None], torch.tensor([0.1, 0.2, 0.3]))
    restored = LogPartitionEstimate()
    restored.load_state_dict(json.loads(json.dumps(est.state_dict())))
    assert restored.rate == 0.5 and set(restored.log_z) == {"p1", 2, None}
    batch = (["p1", 2, 2], torch.tensor([1.0, -1.0, 2.0]))
    # the same state (JSON round-trips floats exactly) and the same operations: bit for bit
    assert torch.equal(restored.update(*batch), est.update(*batch))
    assert restored.state_dict() == est.state_dict()


def test_z_rejects_bad_input():
    with pytest.raises(ValueError, match="rate"):
        LogPartitionEstimate(rate=0.0)
    with pytest.raises(ValueError, match="keys"):
        LogPartitionEstimate().update(["a"], torch.zeros(2))
    with pytest.raises(TypeError):
        LogPartitionEstimate().update([1.5], torch.zeros(1))
