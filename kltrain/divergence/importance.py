"""The per-token importance ratio of a loss-placed sampled estimator (MATH.md, "Off-policy
minibatches and the importance ratio").

A rollout batch that feeds several optimizer steps is sampled from π_old while the loss is
differentiated at π_θ. With ``w_t = π_θ(y_t|s_t)/π_old(y_t|s_t)`` and a sampled estimator g of
the log-ratio at the sampled token, three forms of the loss term (``kl.importance_ratio``):

- ``on``: ``w·g`` with the gradient through w. ``E_π_old[w·g] = E_π_θ[g]``, so its gradient is
  ``∇_θ E_π_θ[g]``: the local gradient of the divergence whose value g is unbiased for (k1·w,
  k3·w → local reverse KL; f_plain·w, f_cv·w → local D_f), on- and off-policy alike.
- ``detached``: ``sg(w)·g``. ``E_π_old[sg(w)·∇g] = E_π_θ[g'(ρ)∇log π_θ]``: the on-policy table
  (k2 → local reverse KL, k3 → local forward KL) at the current θ.
- ``off``: g alone; after a batch's first optimizer step its expected gradient is that of no
  named objective (refused unless ``kl.accept_gradient: off_policy``).

``auto`` picks, among the forms allowed for the run, the first whose gradient is one of
``kl.divergence`` (or the one ``kl.accept_gradient`` names): on-policy it tries ``off`` first (the
plain table; ``on`` where the pair needs w, e.g. k3 under reverse KL), off-policy ``on`` then
``detached``. w is never clipped. Pure functions: no config, no models.

Shapes: ``[...]`` per token in and out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kltrain.divergence.estimators import RATIO_MODES, GradientFollowed, gradient_followed
from kltrain.divergence.functions import Divergence, compute_dtype

IMPORTANCE_RATIO_SETTINGS: tuple[str, ...] = ("auto", *RATIO_MODES)


def importance_weight(logprobs: Tensor, old_logprobs: Tensor, mode: str) -> Tensor:
    """``w = exp(ℓ_θ − ℓ_old)`` ``[...]`` at the sampled tokens, in fp32 (float64 kept): with
    its gradient (``on``, ∇w = w·∇ℓ_θ), detached (``detached``), or 1 (``off``). ``old_logprobs``
    is a constant (sampling time)."""
    if mode not in RATIO_MODES:
        raise ValueError(f"unknown importance ratio {mode!r}; valid: {', '.join(RATIO_MODES)}")
    dtype = compute_dtype(logprobs.dtype)
    if mode == "off":
        return torch.ones_like(logprobs, dtype=dtype)
    w = torch.exp(logprobs.to(dtype) - old_logprobs.detach().to(dtype))
    return w if mode == "on" else w.detach()


def weighted_term(term: Tensor, logprobs: Tensor, old_logprobs: Tensor, mode: str) -> Tensor:
    """The loss-placed sampled term ``w·g`` ``[...]`` in the given form (``off``: g itself)."""
    if mode == "off":
        return term
    return importance_weight(logprobs, old_logprobs, mode) * term


def candidate_modes(setting: str, off_policy: bool) -> tuple[str, ...]:
    """The forms ``auto`` chooses from, in order of preference (an explicit setting: itself)."""
    if setting not in IMPORTANCE_RATIO_SETTINGS:
        raise ValueError(
            f"unknown importance ratio {setting!r}; valid: {', '.join(IMPORTANCE_RATIO_SETTINGS)}"
        )
    if setting != "auto":
        return (setting,)
    return ("on", "detached") if off_policy else ("off", "on")


def resolve_importance_ratio(
    setting: str,
    estimator: str,
    placement: str,
    divergence: Divergence,
    off_policy: bool,
    accept_gradient: str | None = None,
) -> tuple[str, GradientFollowed]:
    """(the form used, the gradient it follows) for ``setting`` (``auto`` | ``on`` |
    ``detached`` | ``off``). Only a sampled estimator in the loss (``loss`` or ``both``) is
    weighted; anything else resolves to ``off``. ``auto`` takes the first candidate whose
    gradient is ``accept_gradient``'s, else the first that is a gradient of ``divergence``,
    else the first candidate (whose label the caller then refuses)."""
    modes = candidate_modes(setting, off_policy)
    if estimator == "exact" or placement == "reward":
        modes = ("off",)
    labels = {m: gradient_followed(estimator, placement, divergence, m, off_policy) for m in modes}
    for wanted in (
        lambda g: accept_gradient is not None and g.key == accept_gradient,
        lambda g: g.is_gradient_of(divergence.name),
    ):
        for mode in modes:
            if wanted(labels[mode]):
                return mode, labels[mode]
    return modes[0], labels[modes[0]]


def describe_modes(
    estimator: str, placement: str, divergence: Divergence
) -> list[tuple[str, str, str]]:
    """(sampling, form, gradient key) for every form, on-policy and off-policy: the rows of the
    table ``kltrain divergences`` prints."""
    rows = []
    for off_policy in (False, True):
        for mode in RATIO_MODES:
            g = gradient_followed(estimator, placement, divergence, mode, off_policy)
            rows.append(("off-policy" if off_policy else "on-policy", mode, g.key))
    return rows
