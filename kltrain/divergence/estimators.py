"""Sampled divergence estimators and which gradient each (estimator, placement) pair follows.

Notation (docs/MATH.md): for a sampled token y ~ π at state s, ρ = ℓ(y) − ℓ_ref(y) and u = e^ρ.
An estimator is a function g(ρ) of the sampled token's log-ratio only; shapes are ``[...]``
(e.g. ``[batch, seq]``) in and out.

Which gradient a pair follows (J_D = E_{y~π}[Σ_t d_t]; local part E[Σ_t ∇d_t], future part
E[Σ_t (Σ_{t'>t} d_t') ∇log π(y_t|s_t)]), derived once here and checked by enumeration in the tests:

- ``loss``: the term g(ρ_t) is differentiated at the sampled token, with expectation
  Σ_y π_y g'(ρ_y) ∇ℓ_y. The local gradient of D_h is ∇Σ_y π_ref h(π/π_ref) = Σ_y π_y h'(u_y) ∇ℓ_y,
  and Σ_y π_y ∇ℓ_y = 0, so the pair follows local D_h iff g'(ρ) = h'(e^ρ) + const, and zero iff
  g' is constant.
- ``reward``: −g(ρ_t) is credited reward-to-go with no gradient through it. Later tokens' terms
  give E[Σ_{t'>t} g_t' ∇ℓ_t] = future part of the divergence whose *value* g estimates
  (E_{y~π} g = Σ π_ref·u·g(log u) = D_h iff u·g(log u) = h(u) + a(u−1)); the token's own term gives
  E[g(ρ_t)∇ℓ_t] = Σ_y π_y g(ρ_y) ∇ℓ_y, the local part of D_h iff g(ρ) = h'(e^ρ) + const.
  Full gradient of D_h iff both parts name the same h.
- ``both``: future part as for reward, local part from g + g', full D_h iff u·g(log u) = h(u) +
  a(u−1) and g + g' = h'(e^ρ) + const. Differentiating the first identity in u gives the second,
  so *every* estimator that is unbiased for D's value follows the full gradient of D here.
- ``exact`` (the full-vocabulary d_t, a function of the state only): loss → local D, reward →
  future D (E[d_t ∇ℓ_t] = 0), both → full D.

Off-policy (tokens from π_old, differentiated at π_θ; w = π_θ(y)/π_old(y), MATH.md "Off-policy
minibatches and the importance ratio"): the loss term's expected local gradient is
Σ_y π_old g'(ρ_θ) ∇ℓ_y without w (no named objective once θ ≠ θ_old: kind ``off_policy``),
Σ_y π_θ g' ∇ℓ_y with w detached (the on-policy rule above at the current θ), and
∇Σ_y π_θ g = Σ_y π_θ (g + g') ∇ℓ_y with the gradient through w: the rule above with g + g' in
place of g', i.e. the local gradient of the divergence whose *value* g is unbiased for (k1·w,
k3·w → local reverse KL; f_plain·w, f_cv·w → local D_f; k2·w → none). In ``both`` the reward
already supplies g's own score term, so w with gradient counts it twice there (mismatch) and
w detached keeps the full gradient.

The identities are checked on a grid of ρ against the named divergence and the parameter-free
built-ins, so user f's are classified by the same rule. Results (MATH.md's table, extended):
k1/reward = full reverse_kl, k2/loss = local reverse_kl, k3/loss = local forward_kl, k1/loss =
zero, k3/reward = mismatch; f_plain and f_cv are k1 and k3 under reverse_kl and mismatch in loss
or reward placement for every other built-in; all unbiased estimators are full D in ``both``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from kltrain.divergence.functions import DIVERGENCE_NAMES, Divergence, compute_dtype, get_divergence

EstimatorName = Literal["exact", "k1", "k2", "k3", "f_plain", "f_cv"]
Placement = Literal["loss", "reward", "both"]
#: How a loss-placed sampled term is weighted by w = π_θ/π_old (MATH.md, "Off-policy
#: minibatches"): not at all, with the gradient through w, or with w detached.
RatioMode = Literal["off", "on", "detached"]
ESTIMATOR_NAMES: tuple[str, ...] = get_args(EstimatorName)
PLACEMENTS: tuple[str, ...] = get_args(Placement)
RATIO_MODES: tuple[str, ...] = get_args(RatioMode)
_RATIO_SUFFIX = {"off": "", "on": "·w", "detached": "·sg(w)"}

_DESCRIPTIONS = {
    "exact": "full-vocabulary d_t = Σ_v π_ref f(π/π_ref) per token (needs both models' logits)",
    "k1": "ρ = ℓ−ℓ_ref: unbiased for reverse KL, high variance, can be negative",
    "k2": "½ρ²: biased for reverse KL, low variance",
    "k3": "e^(−ρ)−1+ρ: unbiased for reverse KL, never negative",
    "f_plain": "f(u)/u: unbiased for D_f on samples from π",
    "f_cv": "(f(u)−f'(1)(u−1))/u: unbiased for D_f, never negative; k3 under reverse KL",
}


def estimate(
    estimator: str, logprobs: Tensor, ref_logprobs: Tensor, divergence: Divergence
) -> Tensor:
    """Per-token estimate ``[...]`` from the sampled tokens' log-probs ``[...]`` under π and π_ref.

    k1 = ρ, k2 = ½ρ², k3 = (e^(−ρ) − 1) + ρ (reverse-KL estimators whatever ``divergence`` is);
    f_plain = f(u)/u, f_cv = (f(u) − f'(1)(u − 1))/u, by the divergence's stable ``f_over_u`` /
    ``cv_over_u``, so built-ins overflow to inf (not NaN) exactly where the true value does.
    Computed in fp32 (float64 kept); differentiable w.r.t. ``logprobs``. Nothing is clamped.
    """
    if estimator == "exact":
        raise ValueError(
            "'exact' is not a sampled estimator: it needs both models' full-vocabulary logits; "
            "use kltrain.divergence.functions.token_divergence or "
            "kltrain.divergence.lm_head.fused_token_loss"
        )
    if estimator not in ESTIMATOR_NAMES:
        raise ValueError(f"unknown estimator {estimator!r}; valid: {', '.join(ESTIMATOR_NAMES)}")
    dtype = compute_dtype(logprobs.dtype)
    rho = logprobs.to(dtype) - ref_logprobs.to(dtype)
    if estimator == "k1":
        return rho
    if estimator == "k2":
        return 0.5 * rho**2
    if estimator == "k3":
        return torch.expm1(-rho) + rho
    return divergence.f_over_u(rho) if estimator == "f_plain" else divergence.cv_over_u(rho)


@dataclass(frozen=True)
class GradientFollowed:
    """The gradient an (estimator, placement) pair follows in expectation.

    kind: "full" | "local" | "future" (parts of ∇J_D, see the module docstring) | "zero" |
    "mismatch" (belongs to no single divergence) | "off_policy" (a loss-placed sampled term
    without the importance ratio on tokens from π_old ≠ π_θ: the gradient of no named
    objective). divergence: whose gradient (None for zero, mismatch and off_policy).
    """

    kind: str
    divergence: str | None
    explanation: str

    @property
    def key(self) -> str:
        """What a config names to opt in: "full reverse_kl", "local forward_kl", "zero", ..."""
        return self.kind if self.divergence is None else f"{self.kind} {self.divergence}"

    def is_gradient_of(self, divergence_name: str) -> bool:
        return self.kind in ("full", "local", "future") and self.divergence == divergence_name


# ρ grid for the function identities; 0 is on it (tv's f' jumps there).
_RHO = torch.linspace(-3.0, 3.0, 121, dtype=torch.float64)


def _candidates(divergence: Divergence) -> list[Divergence]:
    """The named divergence first, then the parameter-free built-ins."""
    out = [divergence]
    for name in DIVERGENCE_NAMES:
        if name != "alpha" and name != divergence.name:
            out.append(get_divergence(name))
    return out


def _const(x: Tensor) -> bool:
    return bool(torch.isfinite(x).all()) and float(x.max() - x.min()) <= 1e-7 * (
        1 + float(x.abs().max())
    )


def _g_and_dg(estimator: str, divergence: Divergence) -> tuple[Tensor, Tensor]:
    rho = _RHO.clone().requires_grad_(True)
    with torch.enable_grad():
        g = estimate(estimator, rho, torch.zeros_like(rho), divergence)
        (dg,) = torch.autograd.grad(g.sum(), rho)
    return g.detach(), dg


def _match_score(target: Tensor, cands: list[Divergence]) -> Divergence | None:
    """The first candidate h with target(ρ) = h'(e^ρ) + const on the grid."""
    u = _RHO.exp()
    return next((h for h in cands if _const(target - h.f_prime(u))), None)


def _match_value(g: Tensor, cands: list[Divergence]) -> Divergence | None:
    """The first h with E_{y~π}[g] = D_h, i.e. u·g(log u) = h(u) + a(u−1) on the grid."""
    u = _RHO.exp()
    for h in cands:
        r = u * g - h.f(u)
        # r = a(u−1): fit a away from u = 1, then require the residual to vanish.
        a = torch.sum(r * (u - 1)) / torch.sum((u - 1) ** 2)
        resid = r - a * (u - 1)
        if bool(torch.isfinite(r).all()) and float(resid.abs().max()) <= 1e-7 * (
            1 + float(r.abs().max())
        ):
            return h
    return None


def _local_name(target: Tensor, cands: list[Divergence]) -> str:
    """Words for a local gradient that is no single divergence's (e.g. k3 in the reward)."""
    u = _RHO.exp()
    for a in cands:
        for b in cands:
            if a is not b and _const(target - a.f_prime(u) + b.f_prime(u)):
                return f"∇{a.name} − ∇{b.name} (local parts)"
    return "the local gradient of no named divergence"


def gradient_followed(
    estimator: str,
    placement: str,
    divergence: Divergence,
    importance_ratio: str = "off",
    off_policy: bool = False,
) -> GradientFollowed:
    """Classify the expected gradient of ``estimator`` in ``placement`` (see module docstring).

    ``importance_ratio`` (``off`` | ``on`` | ``detached``) is how the loss-placed term is weighted
    by w = π_θ/π_old (:mod:`kltrain.divergence.importance`); ``off_policy``: the sampled tokens
    come from π_old ≠ π_θ (a batch feeding several optimizer steps). Neither changes ``exact`` (no
    sampled token) or ``reward`` (no loss term).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; valid: {', '.join(PLACEMENTS)}")
    if estimator not in ESTIMATOR_NAMES:
        raise ValueError(f"unknown estimator {estimator!r}; valid: {', '.join(ESTIMATOR_NAMES)}")
    if importance_ratio not in RATIO_MODES:
        raise ValueError(
            f"unknown importance ratio {importance_ratio!r}; valid: {', '.join(RATIO_MODES)}"
        )
    name = divergence.name
    if estimator == "exact":
        return _exact(placement, name)
    if placement == "reward":
        importance_ratio = "off"  # no loss term to weight
    cands = _candidates(divergence)
    g, dg = _g_and_dg(estimator, divergence)
    where = f"{estimator}{_RATIO_SUFFIX[importance_ratio]} in the {placement}"
    if off_policy and importance_ratio == "off" and placement != "reward":
        return GradientFollowed(
            "off_policy",
            None,
            f"{where} on tokens sampled from π_old ≠ π_θ: E_π_old[g'(ρ_θ)∇log π_θ] is the "
            "gradient of no named objective after a batch's first optimizer step (MATH.md, "
            "'Off-policy minibatches')",
        )
    # expected local gradient of the loss term: Σ_y π_θ(y)·c(ρ_y)·∇ℓ_y with c = g' (no w, or w
    # detached: E_π_old[sg(w)∇g] = E_π_θ[g'∇ℓ]) or c = g + g' (w with gradient: ∇E_π_θ[g]).
    dg = g + dg if importance_ratio == "on" else dg
    if placement == "loss":
        if _const(dg):
            return GradientFollowed(
                "zero", None, f"{where}: g'(ρ) is constant, so its expected gradient is zero"
            )
        h = _match_score(dg, cands)
        if h is not None:
            return GradientFollowed(
                "local", h.name, f"{where} follows the local part of {h.name}'s gradient"
            )
        return GradientFollowed("mismatch", None, f"{where} follows {_local_name(dg, cands)}")
    value = _match_value(g, cands)
    local_target = g if placement == "reward" else g + dg
    local = _match_score(local_target, cands)
    if value is not None and local is not None and value.name == local.name:
        return GradientFollowed(
            "full", value.name, f"{where} follows the full gradient of {value.name}"
        )
    future = f"future part of {value.name}" if value is not None else "a future part of no f-div"
    local_words = (
        f"local part of {local.name}" if local is not None else _local_name(local_target, cands)
    )
    return GradientFollowed("mismatch", None, f"{where} follows {future} plus {local_words}")


def _exact(placement: str, name: str) -> GradientFollowed:
    kind = {"both": "full", "loss": "local", "reward": "future"}[placement]
    why = {
        "full": "loss and reward together give the local and future parts",
        "local": "each state is held fixed (as GRPO-style trainers do)",
        "future": "later penalties are credited by the score function; E[d_t ∇log π] = 0",
    }[kind]
    return GradientFollowed(
        kind, name, f"exact in the {placement} follows the {kind} gradient of {name}: {why}"
    )


def describe_estimators() -> list[tuple[str, str]]:
    """(name, one line) per estimator."""
    return [(n, _DESCRIPTIONS[n]) for n in ESTIMATOR_NAMES]
