"""f-DPG on an enumerable toy (tests/helpers/toy_sequences.py: the 40 completions of length ≤ 3
over 4 tokens, a tabular autoregressive policy), through the algorithm's real path:
``Fdpg.prepare`` (targets, per-prompt Z, f' pseudo-reward, baseline) → ``token_loss`` summed over
the valid tokens. The exact target p, Z and D_f(π‖p) come from enumeration."""

from __future__ import annotations

import math

import pytest
import torch

from kltrain.algorithms import make_algorithm
from kltrain.algorithms.fdpg.partition import LogPartitionEstimate
from kltrain.algorithms.fdpg.targets import TargetError, fit_lambdas, group_moments
from kltrain.config import ConfigError, config_from_dict
from kltrain.divergence.estimators import estimate
from kltrain.divergence.functions import get_divergence
from tests.conftest import fp64_tol
from tests.helpers.toy_sequences import (
    all_completions,
    contains_zero,
    exact_frequency_sample,
    sample,
    sequence_logprobs,
    token_logprobs,
    toy_reward,
    toy_rollout,
    truncated,
)

BETA = 0.7
EPS = 0.05
ALL_F = ["reverse_kl", "forward_kl", "js", "tv", "hellinger", "chi2", ("alpha", 0.5)]
FINITE_AT_INF = ["forward_kl", "js", "tv", "hellinger", ("alpha", 0.5)]


def _tables(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(13, 4, generator=g, dtype=torch.float64)
    theta = ref + 0.8 * torch.randn(13, 4, generator=g, dtype=torch.float64)
    return ref, theta


def _divergence_args(f):
    name, alpha = (f, None) if isinstance(f, str) else f
    return name, ({"alpha": alpha} if alpha is not None else {})


def make_fdpg(f, target="rlhf", k=4, **fdpg):
    name, params = _divergence_args(f)
    raw = {
        "algorithm": {"name": "fdpg", "num_generations": k, "fdpg": {"target": target, **fdpg}},
        "kl": {"divergence": name, **params},
        "generation": {"min_new_tokens": 0},
        "reward": {"terms": [{"name": "keyword", "kwargs": {"words": ["x"]}}]},
    }
    if target == "rlhf":
        raw["kl"]["coef"] = BETA
    if target == "moments":
        raw["reward"]["terms"].append({"name": "length", "kwargs": {"target": 3}})
    return make_algorithm(config_from_dict(raw))


def log_scores(target: str, tokens, mask, lambdas=None):
    """The target's log-score s(y) [N] on given completions (−inf where p = 0)."""
    if target == "rlhf":
        return toy_reward(tokens, mask) / BETA
    if target == "constraint":
        return torch.log(EPS + (1 - EPS) * contains_zero(tokens, mask))
    if target == "hard":
        return torch.log(contains_zero(tokens, mask))
    phi = torch.stack([contains_zero(tokens, mask), truncated(tokens, mask)], 1)
    return phi @ torch.as_tensor(lambdas, dtype=torch.float64)


def exact_target(ref, target: str, lambdas=None):
    """log p [40] and log Z over all completions, by enumeration."""
    tokens, mask = all_completions()
    log_tilde = sequence_logprobs(ref, tokens, mask) + log_scores(target, tokens, mask, lambdas)
    log_z = torch.logsumexp(log_tilde, 0)
    return log_tilde - log_z, float(log_z)


def exact_divergence(f, table, ref, target: str):
    """D_f(π‖p) = Σ_y p f(π/p) over the 40 completions (differentiable in ``table``)."""
    name, params = _divergence_args(f)
    tokens, mask = all_completions()
    log_p, _ = exact_target(ref, target)
    log_pi = sequence_logprobs(table, tokens, mask)
    return get_divergence(name, **params).token_terms_with_support(log_pi, log_p).sum()


def per_term(target: str, tokens, mask, rewards):
    if target == "rlhf":
        return {"keyword": rewards.float()}
    if target == "moments":
        return {"keyword": contains_zero(tokens, mask), "length": truncated(tokens, mask)}
    return {"keyword": contains_zero(tokens, mask).float()}


def rollout_for(algo, table, ref, tokens, mask, target, k):
    with torch.no_grad():
        old = token_logprobs(table, tokens, mask)
        ref_lp = token_logprobs(ref, tokens, mask)
    rewards = toy_reward(tokens, mask).float()
    terms = per_term(target, tokens, mask, rewards)
    return toy_rollout(tokens, mask, old, ref_lp, k, terms), rewards


def surrogate_loss(algo, table, ref, tokens, mask, target, k, normaliser):
    """Σ_valid tokens of the algorithm's per-token loss / normaliser, through prepare()."""
    rollout, rewards = rollout_for(algo, table, ref, tokens, mask, target, k)
    batch = algo.prepare(rollout, rewards, None)
    lp = token_logprobs(table, tokens, mask)[mask]
    per_token, _ = algo.token_loss(
        lp, rollout.stats["logprobs"][mask].double(), batch.advantages[mask].double()
    )
    return per_token.sum() / normaliser, batch


def set_exact_log_z(algo, log_z: float):
    """Give the algorithm the exact Z (with a huge count so updates cannot move it)."""
    algo.log_z.load_state_dict({"rate": None, "entries": [[0, log_z, 10**15]]})


def estimated_gradient(algo, table, ref, target, n=100_000, k=4, seed=1, exact_frequencies=True):
    """The loop's gradient on n samples from π (normalised by n instead of the token count)."""
    g = torch.Generator().manual_seed(seed)
    draw = exact_frequency_sample if exact_frequencies else sample
    tokens, mask = draw(table, n, g)
    theta = table.clone().requires_grad_(True)
    loss, _ = surrogate_loss(algo, theta, ref, tokens, mask, target, k, normaliser=n)
    (grad,) = torch.autograd.grad(loss, theta)
    return grad


def exact_gradient(f, table, ref, target):
    theta = table.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(exact_divergence(f, theta, ref, target), theta)
    return grad


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------------------------
# Gradient: E[estimate] = ∇ D_f(π‖p), for every f and target (exact Z given)

# Relative L2 error at n = 100k exact-frequency samples: measured 0.003-0.016 (the residual is
# the random leave-one-out pairing); a baseline that included the sample itself would be off by
# 1/k = 25%, a wrong f' by far more (next test).
GRAD_TOL = 0.025


@pytest.mark.parametrize(
    "f,target",
    [(f, "rlhf") for f in ALL_F]
    + [(f, "hard") for f in FINITE_AT_INF]
    + [("reverse_kl", "constraint"), ("chi2", "constraint")],
    ids=str,
)
def test_estimated_gradient_matches_exact_gradient(f, target):
    ref, theta = _tables()
    algo = make_fdpg(
        f,
        target="constraint" if target in ("hard", "constraint") else "rlhf",
        **({"epsilon": EPS} if target == "constraint" else {}),
    )
    set_exact_log_z(algo, exact_target(ref, target)[1])
    exact = exact_gradient(f, theta, ref, target)
    est = estimated_gradient(algo, theta, ref, "hard" if target == "hard" else target)
    assert rel_err(est, exact) < GRAD_TOL, (rel_err(est, exact), f, target)


def test_gradient_test_can_tell_divergences_apart():
    """The exact gradients of different f differ by far more than GRAD_TOL, so a pseudo-reward
    with the wrong f' would fail the test above."""
    ref, theta = _tables()
    grads = [exact_gradient(f, theta, ref, "rlhf") for f in ALL_F]
    for i in range(len(grads)):
        for j in range(i + 1, len(grads)):
            cos = float(grads[i].flatten() @ grads[j].flatten()) / float(
                grads[i].norm() * grads[j].norm()
            )
            assert cos < 1 - GRAD_TOL**2 / 2 or abs(grads[i].norm() / grads[j].norm() - 1) > 0.1


# ----------------------------------------------------------------------------------------------
# The unification: fdpg with reverse KL = RLOO with the k1 penalty in the reward, / β


def test_reverse_kl_fdpg_equals_rloo_k1_in_reward_over_beta():
    ref, theta = _tables()
    n, k = 100_000, 4
    g = torch.Generator().manual_seed(3)
    tokens, mask = exact_frequency_sample(theta, n, g)
    fdpg = make_fdpg("reverse_kl", k=k)  # Z is estimated: reverse KL's gradient ignores it
    grad_fdpg = estimated_gradient(fdpg, theta, ref, "rlhf", n=n, k=k, seed=3)
    rloo = make_algorithm(
        config_from_dict(
            {
                "algorithm": {"name": "rloo", "num_generations": k},
                "kl": {
                    "divergence": "reverse_kl",
                    "estimator": "k1",
                    "placement": "reward",
                    "coef": BETA,
                },
            }
        )
    )
    rollout, rewards = rollout_for(rloo, theta, ref, tokens, mask, "rlhf", k)
    k1 = estimate(
        "k1", rollout.stats["logprobs"], rollout.stats["ref_logprobs"], get_divergence("reverse_kl")
    )
    batch = rloo.prepare(rollout, rewards, BETA * k1 * mask)
    table = theta.clone().requires_grad_(True)
    lp = token_logprobs(table, tokens, mask)[mask]
    per_token, _ = rloo.token_loss(
        lp, rollout.stats["logprobs"][mask].double(), batch.advantages[mask].double()
    )
    (grad_rloo,) = torch.autograd.grad(per_token.sum() / n, table)
    exact = exact_gradient("reverse_kl", theta, ref, "rlhf")
    assert rel_err(grad_rloo / BETA, grad_fdpg) < GRAD_TOL
    assert rel_err(grad_rloo / BETA, exact) < GRAD_TOL
    # the factor is 1/β, not 1: without it they would differ by |1 − β| = 30%
    assert rel_err(grad_rloo, grad_fdpg) > 0.2


# ----------------------------------------------------------------------------------------------
# Z: the per-prompt moving average converges to the exact Z


def test_z_estimate_matches_exact_z():
    """5 batches drawn with exact frequencies from π ≠ π_ref: the running mean of the weights
    π_ref·b/π is Z to rounding, so a wrong weight (π/π_ref, a missing b) fails by far."""
    ref, theta = _tables()
    algo = make_fdpg("js", target="constraint")
    g = torch.Generator().manual_seed(4)
    for _ in range(5):
        tokens, mask = exact_frequency_sample(theta, 40_000, g)
        rollout, rewards = rollout_for(algo, theta, ref, tokens, mask, "constraint", 4)
        algo.prepare(rollout, rewards, None)
    _, log_z = exact_target(ref, "hard")
    assert abs(algo.log_z.get(0) - log_z) < 0.005, (algo.log_z.get(0), log_z)
    assert abs(log_z) > 1.0  # Z is far from 1


def test_z_is_per_prompt_and_in_the_state():
    """Two prompts with different targets (prompt 7's reward is R + 1, so Z·e^(1/β)), sampled
    from different policies: each key keeps its own Z, and the state restores both."""
    ref, theta = _tables()
    algo = make_fdpg("forward_kl", target="rlhf")
    g = torch.Generator().manual_seed(5)
    for prompt, table, shift in ((0, theta, 0.0), (7, ref, 1.0)):
        tokens, mask = exact_frequency_sample(table, 20_000, g)
        with torch.no_grad():
            rollout = toy_rollout(
                tokens,
                mask,
                token_logprobs(table, tokens, mask),
                token_logprobs(ref, tokens, mask),
                4,
                prompt_index=prompt,
            )
        rewards = (toy_reward(tokens, mask) + shift).float()
        rollout.rewards_per_term = {"keyword": rewards}
        algo.prepare(rollout, rewards, None)
    fresh = make_fdpg("forward_kl", target="rlhf")
    fresh.load_state_dict(algo.state_dict())
    _, log_z = exact_target(ref, "rlhf")
    for key, shift in ((0, 0.0), (7, 1.0)):
        assert fresh.log_z.get(key) == algo.log_z.get(key)
        assert abs(algo.log_z.get(key) - (log_z + shift / BETA)) < 0.005


# ----------------------------------------------------------------------------------------------
# Training converges to p, for every f


def train_toy(f, target, steps=150, n=128, k=8, lr=0.15, seed=0, **fdpg):
    ref, _ = _tables(seed)
    algo = make_fdpg(
        f, target="constraint" if target in ("hard", "constraint") else target, k=k, **fdpg
    )
    table = ref.clone().requires_grad_(True)
    opt = torch.optim.Adam([table], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 20)
    g = torch.Generator().manual_seed(seed + 10)
    for _ in range(steps):
        tokens, mask = sample(table.detach(), n, g)
        loss, batch = surrogate_loss(
            algo,
            table,
            ref,
            tokens,
            mask,
            target if target != "hard" else "constraint",
            k,
            normaliser=int(mask.sum()),
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return table.detach(), ref, batch.metrics


def tv_to_target(table, ref, target, lambdas=None):
    tokens, mask = all_completions()
    log_p, _ = exact_target(ref, target, lambdas)
    return 0.5 * float((sequence_logprobs(table, tokens, mask).exp() - log_p.exp()).abs().sum())


CONVERGE_TOL = 0.03  # total variation to p after 150 steps (0.31 at π_ref; 0.91 for "hard")


@pytest.mark.parametrize("f", ALL_F, ids=str)
def test_training_converges_to_the_target(f):
    table, ref, _ = train_toy(f, "rlhf")
    assert tv_to_target(ref, ref, "rlhf") > 0.3
    assert tv_to_target(table, ref, "rlhf") < CONVERGE_TOL, f


@pytest.mark.parametrize("f", ["forward_kl", "js", "tv"], ids=str)
def test_training_converges_to_a_hard_constraint(f):
    table, ref, metrics = train_toy(f, "hard")
    assert tv_to_target(ref, ref, "hard") > 0.9
    assert tv_to_target(table, ref, "hard") < CONVERGE_TOL, f
    assert metrics["fdpg/alignment/constraint"] > 0.95


# ----------------------------------------------------------------------------------------------
# Moments: λ fitting recovers a known exponential family


def test_lambda_fit_recovers_known_lambdas():
    ref, theta = _tables()
    true = torch.tensor([1.2, -0.7], dtype=torch.float64)
    tokens, mask = all_completions()
    log_p, _ = exact_target(ref, "moments", true)
    phi_all = torch.stack([contains_zero(tokens, mask), truncated(tokens, mask)], 1)
    mu = (log_p.exp() @ phi_all).tolist()
    g = torch.Generator().manual_seed(6)
    for proposal in (ref, theta):  # from π_ref itself, and importance-sampled from another π
        tk, mk = sample(proposal, 100_000, g)
        phi = torch.stack([contains_zero(tk, mk), truncated(tk, mk)], 1)
        log_w0 = sequence_logprobs(ref, tk, mk) - sequence_logprobs(proposal, tk, mk)
        lam = fit_lambdas(phi, log_w0, torch.zeros(len(tk)), mu)
        assert (lam - true).abs().max() < 0.05, (lam, true)
        got = group_moments(phi, log_w0, torch.zeros(len(tk)), lam)
        # fit_lambdas stops at max |m(λ) − μ| < 1e-7 (its tol), m from its own dual evaluation;
        # group_moments recomputes m: two float64 evaluations of 100k-term sums apart
        gap = 1e-7 + 2 * fp64_tol(100_000 + 16)
        assert (got - torch.tensor(mu, dtype=torch.float64)).abs().max() < gap


def test_unreachable_moments_are_an_error():
    phi = torch.tensor([[0.0], [0.0], [1.0], [0.0]])
    with pytest.raises(TargetError, match=r"moments\[0\]=1"):
        fit_lambdas(phi, torch.zeros(4), torch.zeros(4), [1.0])


def test_moments_training_meets_the_moments():
    ref, _ = _tables()
    true = [1.2, -0.7]
    tokens, mask = all_completions()
    log_p, _ = exact_target(ref, "moments", true)
    phi_all = torch.stack([contains_zero(tokens, mask), truncated(tokens, mask)], 1)
    mu = (log_p.exp() @ phi_all).tolist()
    table, ref, metrics = train_toy("js", "moments", moments=mu, refit_every=20, k=64)
    assert (
        max(abs(metrics["fdpg/lambda/keyword"] - 1.2), abs(metrics["fdpg/lambda/length"] + 0.7))
        < 0.3
    )
    assert tv_to_target(table, ref, "moments", true) < 0.08


# ----------------------------------------------------------------------------------------------
# Diagnostics and safety


def test_diagnostics_match_exact_values():
    ref, theta = _tables()
    algo = make_fdpg("js", target="rlhf", k=4)
    set_exact_log_z(algo, exact_target(ref, "rlhf")[1])
    g = torch.Generator().manual_seed(8)
    tokens, mask = sample(theta, 200_000, g)
    rollout, rewards = rollout_for(algo, theta, ref, tokens, mask, "rlhf", 4)
    metrics = algo.prepare(rollout, rewards, None).metrics
    for name in ("forward_kl", "reverse_kl", "tv", "js"):
        exact = float(exact_divergence(name, theta, ref, "rlhf"))
        got = metrics[f"fdpg/target_divergence/{name}"]
        assert abs(got - exact) < 0.02 * exact + 2e-3, (name, got, exact)
    assert 0 < metrics["fdpg/ess"] <= 1
    assert metrics["diversity/distinct_1"] == 4 / int(mask.sum())  # the same int ratio


def test_hard_constraint_leaves_out_infinite_diagnostics():
    algo = make_fdpg("js", target="constraint")
    assert set(algo.diagnosed) == {"forward_kl", "tv", "js"}


def test_weight_clipping_is_applied_and_logged():
    ref, theta = _tables()
    algo = make_fdpg("forward_kl", target="rlhf", weight_clip=2.0)
    g = torch.Generator().manual_seed(9)
    tokens, mask = sample(theta, 4000, g)
    rollout, rewards = rollout_for(algo, theta, ref, tokens, mask, "rlhf", 4)
    metrics = algo.prepare(rollout, rewards, None).metrics
    assert 0 < metrics["fdpg/clipped_fraction"] < 1
    assert metrics["fdpg/pseudo_reward_mean"] >= -2.0 - 1e-9  # f'(u) = −1/u ≥ −c


def test_violating_samples_under_infinite_f_are_an_error_not_nan():
    """A user f with f'(∞) = ∞ passes the config check only when softened; a runtime ∞ is
    reported by name (here: reverse KL's f' evaluated at a p = 0 sample)."""
    from kltrain.algorithms.fdpg.targets import f_prime_of_log_ratio

    with pytest.raises(TargetError, match="infinite"):
        f_prime_of_log_ratio(get_divergence("reverse_kl"), torch.tensor([0.0, math.inf]))


# ----------------------------------------------------------------------------------------------
# Config rules


def _cfg(**sections):
    raw = {"algorithm": {"name": "fdpg"}, "generation": {"min_new_tokens": 0}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return config_from_dict(raw)


@pytest.mark.parametrize(
    "sections,match",
    [
        ({"kl": {"estimator": "k3"}}, "kl.estimator=k3"),
        ({"kl": {"placement": "reward"}}, "kl.placement=reward"),
        ({"kl": {"adaptive": {"target": 1.0}}}, "kl.adaptive"),
        ({"generation": {"temperature": 0.7}}, "generation.temperature"),
        ({"generation": {"min_new_tokens": 1}}, "generation.min_new_tokens"),
        ({"algorithm": {"fdpg": {"target": "constraint"}}}, "algorithm.fdpg.epsilon"),
        (
            {"algorithm": {"fdpg": {"target": "constraint"}}, "kl": {"divergence": "chi2"}},
            "f'.∞. = ∞",
        ),
        ({"algorithm": {"fdpg": {"target": "moments"}}}, "algorithm.fdpg.moments"),
        ({"algorithm": {"fdpg": {"target": "rlhf", "epsilon": 0.1}}}, "needs target=constraint"),
        (
            {"algorithm": {"fdpg": {"target": "constraint", "epsilon": 0.1}}, "kl": {"coef": 0.1}},
            "kl.coef",
        ),
        ({"algorithm": {"name": "rloo", "fdpg": {"target": "rlhf"}}}, "algorithm.name='rloo'"),
        ({"algorithm": {"num_generations": 1}}, "num_generations"),
        (
            {"algorithm": {"fdpg": {"proposal_divergence": "chi2"}}, "kl": {"divergence": "js"}},
            "proposal_divergence='chi2'",
        ),
        (
            {
                "algorithm": {
                    "fdpg": {"target": "constraint", "proposal_divergence": "reverse_kl"}
                },
                "kl": {"divergence": "js"},
            },
            "proposal_divergence=reverse_kl",
        ),
    ],
)
def test_bad_fdpg_configs_are_refused_by_name(sections, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**sections)


def test_softened_constraint_with_reverse_kl_is_accepted():
    cfg = _cfg(algorithm={"fdpg": {"target": "constraint", "epsilon": 0.01}})
    assert cfg.algorithm.fdpg.epsilon == 0.01
    assert isinstance(LogPartitionEstimate(), LogPartitionEstimate)


def test_unreachable_first_fit_waits_with_lambda_zero_when_refits_are_on():
    """With refit_every the run starts at λ = 0 (p = π_ref) and retries; without, it stops."""
    ref, _ = _tables()
    g = torch.Generator().manual_seed(11)
    tokens, mask = sample(ref, 8, g)
    keep_going = make_fdpg("js", target="moments", moments=[0.999, 0.5], refit_every=3)
    rollout, rewards = rollout_for(keep_going, ref, ref, tokens, mask, "moments", 4)
    metrics = keep_going.prepare(rollout, rewards, None).metrics
    assert metrics["fdpg/refit_failures"] == 1 and keep_going.lambdas.tolist() == [0.0, 0.0]
    strict = make_fdpg("js", target="moments", moments=[0.999, 0.5])
    with pytest.raises(TargetError, match="cannot be reached"):
        strict.prepare(rollout, rewards, None)


# ----------------------------------------------------------------------------------------------
# Offline proposal (DPG's offline variant): samples from a fixed q ≠ π, weighted by π/q


def _proposal_table(seed: int = 11):
    """A third table q ≠ π, a lagging proposal: half as far from π_ref as π (weights π/q up to
    3.1, E_q[(π/q)²] = 1.38)."""
    ref, _ = _tables()
    g = torch.Generator().manual_seed(seed)
    return ref + 0.4 * torch.randn(13, 4, generator=g, dtype=torch.float64)


def offline_rollout(table, ref, q, tokens, mask, target, k):
    """A rollout of samples from q: ``logprobs`` are π's, ``proposal_logprobs`` q's."""
    with torch.no_grad():
        rollout = toy_rollout(
            tokens,
            mask,
            token_logprobs(table, tokens, mask),
            token_logprobs(ref, tokens, mask),
            k,
            per_term(target, tokens, mask, toy_reward(tokens, mask).float()),
        )
        rollout.stats["proposal_logprobs"] = token_logprobs(q, tokens, mask).float()
    return rollout, toy_reward(tokens, mask).float()


def _gradient_from(algo, table, ref, rollout, rewards, n):
    batch = algo.prepare(rollout, rewards, None)
    theta = table.clone().requires_grad_(True)
    mask = rollout.completion_mask
    lp = token_logprobs(theta, rollout.completion_ids, mask)[mask]
    per_token, _ = algo.token_loss(
        lp, rollout.stats["logprobs"][mask].double(), batch.advantages[mask].double()
    )
    (grad,) = torch.autograd.grad(per_token.sum() / n, theta)
    return grad


# Relative L2 error with n = 200k exact-frequency samples from q: measured 0.002-0.009 (the
# residual is the leave-one-out pairing, amplified by the weights); the same samples treated as
# on-policy (no weight π/q) are off by 1.7-5.
@pytest.mark.parametrize(
    "f,target",
    [("forward_kl", "rlhf"), ("js", "rlhf"), ("reverse_kl", "rlhf"), ("tv", "hard")],
    ids=str,
)
def test_offline_gradient_matches_exact_gradient(f, target):
    ref, theta = _tables()
    q = _proposal_table()
    algo_target = "constraint" if target == "hard" else target
    n = 200_000
    tokens, mask = exact_frequency_sample(q, n, torch.Generator().manual_seed(12))
    rollout, rewards = offline_rollout(theta, ref, q, tokens, mask, algo_target, 4)
    exact = exact_gradient(f, theta, ref, target)
    algo = make_fdpg(f, target=algo_target, proposal="offline")
    set_exact_log_z(algo, exact_target(ref, target)[1])
    est = _gradient_from(algo, theta, ref, rollout, rewards, n)
    assert rel_err(est, exact) < GRAD_TOL, (rel_err(est, exact), f, target)
    on_policy = make_fdpg(f, target=algo_target)  # ignores proposal_logprobs: no weight
    set_exact_log_z(on_policy, exact_target(ref, target)[1])
    wrong = _gradient_from(on_policy, theta, ref, rollout, rewards, n)
    assert rel_err(wrong, exact) > 1.0


def test_offline_z_estimate_matches_exact_z():
    """Samples from q: Ẑ = mean π_ref·b/q is Z (with π's log-probs in its place, it is not)."""
    ref, theta = _tables()
    q = _proposal_table()
    algo = make_fdpg("js", target="constraint", proposal="offline")
    g = torch.Generator().manual_seed(13)
    for _ in range(5):
        tokens, mask = exact_frequency_sample(q, 40_000, g)
        rollout, rewards = offline_rollout(theta, ref, q, tokens, mask, "constraint", 4)
        algo.prepare(rollout, rewards, None)
    _, log_z = exact_target(ref, "hard")
    assert abs(algo.log_z.get(0) - log_z) < 0.005, (algo.log_z.get(0), log_z)
    wrong = make_fdpg("js", target="constraint")
    wrong.prepare(rollout, rewards, None)
    assert abs(wrong.log_z.get(0) - log_z) > 0.1


def test_offline_diagnostics_are_importance_weighted():
    """The logged D(π‖p) from q's samples is π's exact divergence, and q's own is q's."""
    ref, theta = _tables()
    q = _proposal_table()
    algo = make_fdpg("js", target="rlhf", proposal="offline")
    set_exact_log_z(algo, exact_target(ref, "rlhf")[1])
    tokens, mask = exact_frequency_sample(q, 200_000, torch.Generator().manual_seed(14))
    metrics = algo.prepare(*offline_rollout(theta, ref, q, tokens, mask, "rlhf", 4), None).metrics
    for name in ("forward_kl", "tv", "js"):
        exact = float(exact_divergence(name, theta, ref, "rlhf"))
        got = metrics[f"fdpg/target_divergence/{name}"]
        assert abs(got - exact) < 0.02 * exact + 2e-3, (name, got, exact)
    assert metrics["fdpg/policy_divergence"] == metrics["fdpg/target_divergence/tv"]
    exact_q = float(exact_divergence("tv", q, ref, "rlhf"))
    assert abs(metrics["fdpg/proposal_divergence"] - exact_q) < 0.02 * exact_q + 2e-3
    assert 0 < metrics["fdpg/proposal_ess"] < 1


@pytest.mark.parametrize("policy_is_closer", [True, False])
def test_offline_proposal_is_replaced_only_when_the_policy_is_closer(policy_is_closer):
    """DPG's rule on exact-frequency samples from q: q ← π iff the estimated TV(π‖p) < TV(q‖p);
    the proposal module takes the policy's weights exactly then, and is untouched otherwise."""
    from types import SimpleNamespace

    ref, _ = _tables()
    near = ref.clone()
    near[:, 0] += 2.0  # token 0 (the constraint) more likely: closer to p than π_ref (checked)
    far = ref.clone()
    assert float(exact_divergence("tv", near, ref, "hard")) < float(
        exact_divergence("tv", far, ref, "hard")
    )
    table, q = (near, far) if policy_is_closer else (far, near)
    algo = make_fdpg("forward_kl", target="constraint", proposal="offline")
    set_exact_log_z(algo, exact_target(ref, "hard")[1])
    policy = torch.nn.Linear(3, 2)
    algo.setup(SimpleNamespace(policy=policy))
    assert algo.sampling_model(SimpleNamespace(policy=policy)) is algo.proposal
    assert not any(p.requires_grad for p in algo.proposal.parameters())
    assert set(algo.frozen_modules()) == {"proposal"}
    before = {k: v.clone() for k, v in algo.proposal.state_dict().items()}
    with torch.no_grad():
        policy.weight.add_(1.0)  # the policy has moved since q was copied
    tokens, mask = exact_frequency_sample(q, 50_000, torch.Generator().manual_seed(15))
    rollout, rewards = offline_rollout(table, ref, q, tokens, mask, "constraint", 4)
    metrics = algo.prepare(rollout, rewards, None).metrics
    assert (metrics["fdpg/policy_divergence"] < metrics["fdpg/proposal_divergence"]) is (
        policy_is_closer
    )
    assert metrics["fdpg/proposal_updates"] == (1.0 if policy_is_closer else 0.0)
    after = algo.proposal.state_dict()
    expected = policy.state_dict() if policy_is_closer else before
    assert all(torch.equal(after[k], expected[k]) for k in after)
    assert algo.state_dict()["proposal_updates"] == int(policy_is_closer)


def test_offline_proposal_is_kept_at_a_tie_that_rounding_breaks():
    """π = q (the first step): the two estimates are equal in exact arithmetic, and the policy's
    log-probs come from another pass than q's (fp32 rounding apart). Rounding either way must
    not replace q (before: whichever engine's rounding made π's estimate lower did)."""
    from types import SimpleNamespace

    ref, _ = _tables()
    q = _proposal_table()
    tokens, mask = exact_frequency_sample(q, 20_000, torch.Generator().manual_seed(15))
    lower = []
    for sign in (1.0, -1.0):
        algo = make_fdpg("forward_kl", target="constraint", proposal="offline")
        set_exact_log_z(algo, exact_target(ref, "hard")[1])
        algo.setup(SimpleNamespace(policy=torch.nn.Linear(3, 2)))
        rollout, rewards = offline_rollout(q, ref, q, tokens, mask, "constraint", 4)
        lp = rollout.stats["logprobs"]  # fp32: one rounding step of each log-prob
        rollout.stats["logprobs"] = lp + sign * lp.abs() * 2.0**-23 * mask
        metrics = algo.prepare(rollout, rewards, None).metrics
        lower.append(metrics["fdpg/policy_divergence"] < metrics["fdpg/proposal_divergence"])
        assert metrics["fdpg/proposal_updates"] == 0.0, sign
    assert any(lower)  # rounding did put π's estimate below q's (the old rule replaced q)


def test_on_policy_has_no_proposal_and_ignores_setup():
    from types import SimpleNamespace

    algo = make_fdpg("js", target="rlhf")
    policy = torch.nn.Linear(3, 2)
    algo.setup(SimpleNamespace(policy=policy))
    assert algo.proposal is None and algo.frozen_modules() == {}
    assert algo.sampling_model(SimpleNamespace(policy=policy)) is policy
