"""f-DPG targets and diagnostics: pure tensor functions (no model, no loop).

A target is ``p(y|x) = π_ref(y|x)·exp(s(x,y)) / Z(x)`` with a **log-score** ``s`` (MATH.md, f-DPG):

- ``rlhf``:        ``s = R/β``                      (the RLHF optimum, R the configured reward)
- ``constraint``:  ``s = log b_ε``, ``b_ε = ε + (1 − ε)·b``, ``b = Π_k b_k ∈ {0, 1}``
                   (GDC pointwise; every reward term is a 0/1 scorer and all must hold; ε = 0
                   gives ``s = −∞`` where y violates the constraint: p(y) = 0)
- ``moments``:     ``s = λ·φ``                      (GDC distributional; φ_k the reward terms,
                   λ fitted so that ``E_x E_{p(·|x)}[φ] = μ``)

Shapes: ``[B]`` one value per sequence, ``[B, K]`` K features per sequence, ``[B, T]`` per token.
All log-space; ``−∞`` scores are allowed and handled explicitly (never ``0·∞``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from kltrain.divergence.functions import Divergence


class TargetError(ValueError):
    """A target that cannot be formed from what the rewards returned (named in the message)."""


# ----------------------------------------------------------------------------------------------
# Scores


def constraint_values(per_term: dict[str, Tensor]) -> Tensor:
    """``b = Π_k b_k`` [B] from each term's 0/1 values; anything else is an error naming it."""
    b = None
    for label, values in per_term.items():
        bad = (values != 0) & (values != 1)
        if bad.any():
            got = values[bad][:3].tolist()
            raise TargetError(
                f"target constraint: reward term {label!r} must return 0 or 1 for every sample "
                f"(a binary scorer, e.g. keyword with mode 'any'); got {got}"
            )
        b = values.double() if b is None else b * values.double()
    if b is None:
        raise TargetError("target constraint needs at least one reward term")
    return b


def constraint_log_score(b: Tensor, epsilon: float) -> Tensor:
    """``log b_ε = log(ε + (1 − ε)·b)`` [B]; ``−∞`` where b = 0 and ε = 0."""
    return torch.log(epsilon + (1.0 - epsilon) * b.double())


def feature_matrix(per_term: dict[str, Tensor]) -> Tensor:
    """φ [B, K] (float64), one column per reward term in config order."""
    return torch.stack([v.double() for v in per_term.values()], dim=1)


# ----------------------------------------------------------------------------------------------
# Moment matching (GDC distributional)


def group_moments(phi: Tensor, log_w0: Tensor, groups: Tensor, lambdas: Tensor) -> Tensor:
    """``m(λ) = mean_g Σ_{i∈g} softmax_g(log w0 + λ·φ)_i φ_i`` [K].

    Self-normalised importance sampling of ``E_{p_λ(·|x)}[φ]`` within each group g (a prompt),
    averaged over groups: ``log w0_i = log π_ref(y_i) − log q(y_i)`` for samples from q.
    phi [B, K], log_w0 [B], groups [B] (any ids), lambdas [K].
    """
    return _dual(phi, log_w0, groups, lambdas)[1]


def _dual(phi: Tensor, log_w0: Tensor, groups: Tensor, lambdas: Tensor):
    """Value ``L(λ) = mean_g log Σ_{i∈g} w0_i e^{λ·φ_i}``, its gradient m(λ) [K] and Hessian
    ``mean_g Cov_g(φ)`` [K, K] (the log-partition of an exponential family: convex in λ)."""
    _, inverse = torch.unique(groups, return_inverse=True)
    logits = log_w0.double() + phi @ lambdas
    value = 0.0
    grad = torch.zeros_like(lambdas)
    hess = torch.zeros(lambdas.numel(), lambdas.numel(), dtype=torch.float64)
    n_groups = int(inverse.max()) + 1
    for g in range(n_groups):
        idx = inverse == g
        lg, f = logits[idx], phi[idx]
        value += float(torch.logsumexp(lg, 0))
        w = torch.softmax(lg, 0)
        mean = w @ f
        centred = f - mean
        grad += mean
        hess += (centred * w.unsqueeze(1)).T @ centred
    return value / n_groups, grad / n_groups, hess / n_groups


def fit_lambdas(
    phi: Tensor,
    log_w0: Tensor,
    groups: Tensor,
    moments: Sequence[float],
    init: Tensor | None = None,
    tol: float = 1e-7,
    max_iter: int = 100,
) -> Tensor:
    """λ [K] with ``m(λ) = μ`` (:func:`group_moments`), by damped Newton on the convex dual
    ``L(λ) − λ·μ`` (gradient ``m(λ) − μ``, Hessian ``mean_g Cov_g(φ)``).

    Raises :class:`TargetError` when μ lies outside what the samples can reach (some μ_k not
    strictly between ``mean_g min_g φ_k`` and ``mean_g max_g φ_k``) or Newton does not converge.
    """
    phi, log_w0 = phi.double(), log_w0.double()
    mu = torch.tensor(list(moments), dtype=torch.float64)
    _check_reachable(phi, groups, mu)
    lam = torch.zeros_like(mu) if init is None else init.double().clone()

    def objective(x: Tensor) -> float:
        return _dual(phi, log_w0, groups, x)[0] - float(x @ mu)

    for _ in range(max_iter):
        value, m, hess = _dual(phi, log_w0, groups, lam)
        grad = m - mu
        if float(grad.abs().max()) < tol:
            return lam
        ridge = 1e-9 * torch.eye(mu.numel(), dtype=torch.float64)
        step = torch.linalg.solve(hess + ridge, grad)
        t, current = 1.0, value - float(lam @ mu)
        while objective(lam - t * step) > current - 1e-4 * t * float(grad @ step) and t > 1e-8:
            t *= 0.5
        lam = lam - t * step
    m = group_moments(phi, log_w0, groups, lam)
    raise TargetError(
        f"target moments: λ fitting did not converge in {max_iter} Newton steps (moments "
        f"{m.tolist()} vs targets {mu.tolist()}); use more samples (algorithm.num_generations, "
        f"trainer.prompts_per_step) or targets nearer the reference's moments"
    )


def _check_reachable(phi: Tensor, groups: Tensor, mu: Tensor) -> None:
    _, inverse = torch.unique(groups, return_inverse=True)
    n = int(inverse.max()) + 1
    lo = torch.stack([phi[inverse == g].min(0).values for g in range(n)]).mean(0)
    hi = torch.stack([phi[inverse == g].max(0).values for g in range(n)]).mean(0)
    for k in range(mu.numel()):
        if not lo[k] < mu[k] < hi[k]:
            raise TargetError(
                f"algorithm.fdpg.moments[{k}]={float(mu[k]):.4g} cannot be reached by reweighting "
                f"these samples: feature {k} spans [{float(lo[k]):.4g}, {float(hi[k]):.4g}] "
                f"(mean over prompts of the per-prompt min and max); use more samples per prompt "
                f"(algorithm.num_generations) or a target inside that range"
            )


# ----------------------------------------------------------------------------------------------
# The f' pseudo-reward and divergence estimates from samples of π


def f_prime_of_log_ratio(divergence: Divergence, log_u: Tensor) -> Tensor:
    """``f'(u)`` at ``u = e^{log_u}`` [B] (float64); ``log_u = +∞`` (p(y) = 0) gives f'(∞).

    Raises :class:`TargetError` if that limit is infinite: the divergence to the target is then
    infinite (MATH.md f-DPG support rule) and no finite gradient exists."""
    log_u = log_u.double()
    outside = torch.isposinf(log_u)
    u = torch.exp(torch.where(outside, 0.0, log_u).clamp(max=700.0))
    value = divergence.f_prime(u).double()
    if outside.any():
        limit = divergence.f_prime_at_infinity()
        if not math.isfinite(limit):
            raise TargetError(
                f"D_f(π‖p) is infinite for kl.divergence={divergence.name}: the policy sampled "
                f"{int(outside.sum())} completion(s) the target gives probability 0 and f'(∞) = ∞; "
                f"soften the target (algorithm.fdpg.epsilon > 0) or use a divergence with finite "
                f"f'(∞) (forward_kl, js, tv, hellinger, alpha with α < 1)"
            )
        value = torch.where(outside, limit, value)
    return value


def divergence_terms(divergence: Divergence, log_u: Tensor) -> Tensor:
    """Per-sample ``(f(u) − f'(1)(u − 1))/u`` [B] at ``u = π(y)/p(y)``, y ~ π: its mean is
    ``D_f(π‖p)`` (the control-variate form, each term ≥ 0). ``log_u = +∞`` gives the limit
    ``f'(∞) − f'(1)`` (∞ for reverse KL, χ², α > 1)."""
    log_u = log_u.double()
    outside = torch.isposinf(log_u)
    terms = divergence.cv_over_u(torch.where(outside, 0.0, log_u))
    if outside.any():
        limit = divergence.f_prime_at_infinity() - divergence.f_prime_at_one()
        terms = torch.where(outside, limit, terms)
    return terms


def effective_sample_fraction(log_w: Tensor) -> float:
    """``ESS/n = (Σw)² / (n·Σw²)`` ∈ (0, 1] of importance weights given as log-weights [n]
    (0 when every weight is 0)."""
    if not torch.isfinite(log_w).any():
        return 0.0
    log_w = log_w.double()
    ess = torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))
    return float(ess) / log_w.numel()


def log_z_stderr(log_w: Tensor) -> float:
    """Delta-method standard error of ``log Ẑ`` from one batch of n log-weights:
    ``sqrt(1/ESS − 1/n)`` (``Var(Ẑ)/Z² ≈ Var(w)/(n·mean(w)²)``); inf when every weight is 0."""
    frac = effective_sample_fraction(log_w)
    n = log_w.numel()
    return math.inf if frac == 0.0 else math.sqrt(max(1.0 / (frac * n) - 1.0 / n, 0.0))


def leave_one_out_mean(values: Tensor, group_size: int) -> Tensor:
    """[B] → [B]: the mean of the other ``group_size − 1`` members of each contiguous group."""
    groups = values.view(-1, group_size)
    total = groups.sum(dim=1, keepdim=True)
    return ((total - groups) / (group_size - 1)).reshape(-1)


# ----------------------------------------------------------------------------------------------
# Diversity


def distinct_n(completion_ids: Tensor, mask: Tensor, n: int) -> float:
    """distinct-n: unique token n-grams / all token n-grams over a batch of completions.

    completion_ids, mask [B, T] (mask: valid completion tokens); an n-gram counts when all its
    tokens are valid; 0 when no completion has n tokens."""
    if completion_ids.shape[1] < n:
        return 0.0
    grams = completion_ids.unfold(1, n, 1)[mask.unfold(1, n, 1).all(dim=-1)]  # [M, n]
    if grams.shape[0] == 0:
        return 0.0
    return torch.unique(grams, dim=0).shape[0] / grams.shape[0]
