"""Kernel ids: which built-in divergence a fused kernel computes. One enum shared by the torch
twin (:mod:`.cuda`) and the Triton kernels (:mod:`.triton_ops`), so the two cannot disagree."""

from __future__ import annotations

from enum import IntEnum

from kltrain.divergence.functions import (
    Alpha,
    ChiSquared,
    Divergence,
    ForwardKL,
    Hellinger,
    JensenShannon,
    ReverseKL,
    TotalVariation,
)


class KernelId(IntEnum):
    REVERSE_KL = 0
    FORWARD_KL = 1
    JS = 2
    TV = 3
    ALPHA = 4
    HELLINGER = 5
    CHI2 = 6
    NONE = 7  # no divergence: log-probs only, no reference logits


_IDS: dict[type, KernelId] = {
    ReverseKL: KernelId.REVERSE_KL,
    ForwardKL: KernelId.FORWARD_KL,
    JensenShannon: KernelId.JS,
    TotalVariation: KernelId.TV,
    Alpha: KernelId.ALPHA,
    Hellinger: KernelId.HELLINGER,
    ChiSquared: KernelId.CHI2,
}


def kernel_id(div: Divergence | None) -> KernelId | None:
    """The kernel's id for ``div`` (exact built-in classes only; subclasses may override math),
    ``NONE`` for no divergence, None when no kernel computes it."""
    return KernelId.NONE if div is None else _IDS.get(type(div))


def alpha_of(div: Divergence | None) -> float:
    """α of an :class:`Alpha` divergence (the kernels' ALPHA argument), else 0."""
    return float(div.alpha) if isinstance(div, Alpha) else 0.0
