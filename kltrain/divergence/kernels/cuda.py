"""Fused per-chunk elementwise work of the chunked lm_head path, for CUDA (Triton kernels).

The chunk loop of :mod:`kltrain.divergence.lm_head` turns fp32 logits ``z`` (policy) and ``zq``
(reference), ``[c, V]`` each, into per-row values and the gradient w.r.t. ``z``. Done with torch
ops that is
some twenty full passes over ``[c, V]`` buffers, which dominate once the lm_head GEMMs run in
bf16 on a GPU. Here it is two kernels, with the ``[c]``-sized ``loss_fn`` call between them:

- ``stats``: one program per row; an online (max, Σexp) pass over both rows gives
  lse = logsumexp of each, and for the KLs the value at the same time
  (KL(π‖π_ref) = E_π[z − zq] − lse + lse_ref, KL(π_ref‖π) likewise with the roles swapped); the
  other built-ins take a second pass with ℓ = z − lse, ℓ_ref = zq − lse_ref for D = Σ term and
  S = Σ_v π_v s_v. Also log π(token). Reads z, zq once (KLs) or twice.
- ``grad``: G = b·∂D/∂z − a·π + a·onehot(token), ∂D/∂z = π(ρ − D) (reverse KL), π − π_ref
  (forward KL), or πs − π·S (the rest): reads z, zq once and writes G (into z's buffer, or as
  bf16 when that is what the backward GEMMs take anyway).

Same formulas as ``Divergence.token_terms``/``weighted_score`` in fp32 (MATH.md precision rule),
so results agree with the torch path to fp32 rounding. Only the built-in divergence classes
(exact type) have kernels; user f, float64 and non-CUDA tensors use the torch path.
:class:`TorchChunkOps` is the same two-step computation in torch: the reference the kernels are
tested against, and what :mod:`.cpu` compiles for the CPU.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from kltrain.divergence.functions import Divergence
from kltrain.divergence.kernels.ids import KernelId, kernel_id

ENV_SWITCH = "KLTRAIN_FUSED_CUDA"  # "0" turns the fused kernels off (the torch path runs)


def _lse_and_mean(z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: logsumexp(z) and E_softmax(z)[x], from the one exp per entry they share
    (``m + log Σ e^(z−m)`` and ``Σ e^(z−m) x / Σ e^(z−m)``; the compiled CPU ops fuse both sums
    into one pass)."""
    m = z.amax(-1, keepdim=True)
    e = torch.exp(z - m)
    total = e.sum(-1)
    return m.squeeze(-1) + total.log(), (e * x).sum(-1) / total


class TorchChunkOps:
    """The kernels' computation in torch (reference for tests; works on any device)."""

    def stats(self, z: Tensor, zq: Tensor | None, tok: Tensor, div: Divergence | None):
        """-> (log π(token) [c], D [c] or None, aux) with aux = (lse, lse_ref, D, S) per row.

        KL(π‖π_ref) = E_π[z − zq] − lse + lse_ref; KL(π_ref‖π) likewise with the roles swapped."""
        k = kernel_id(div)
        lseq = d = s = None
        if k == KernelId.REVERSE_KL:
            lse, mean = _lse_and_mean(z, z - zq)
            lseq = torch.logsumexp(zq, -1)
            d = mean - lse + lseq
        elif k == KernelId.FORWARD_KL:
            lseq, mean = _lse_and_mean(zq, zq - z)
            lse = torch.logsumexp(z, -1)
            d = mean - lseq + lse
        else:
            lse = torch.logsumexp(z, -1)
            if k != KernelId.NONE:
                lseq = torch.logsumexp(zq, -1)
                logp, logq = z - lse[:, None], zq - lseq[:, None]
                terms, score = div.terms_and_score(logp, logq)
                d, s = terms.sum(-1), score.sum(-1)
        lp = z.gather(1, tok[:, None]).squeeze(1) - lse
        return lp, d, (lse, lseq, d, s)

    def grad(self, z, zq, tok, aux, a, b, out, div):
        """G = b·∂D/∂z − a·π + a·onehot(token), written into ``out`` ([c, V], any float dtype)."""
        return out.copy_(self.grad_values(z, zq, tok, aux, a, b, div))

    def grad_values(self, z, zq, tok, aux, a, b, div) -> Tensor:
        """G as a new ``[c, V]`` tensor, in ``z``'s dtype."""
        k = kernel_id(div)
        lse, lseq, d, s = aux
        logp = z - lse[:, None]
        p = logp.exp()
        g = -a[:, None] * p
        if k != KernelId.NONE:
            logq = zq - lseq[:, None]
            if k == KernelId.REVERSE_KL:
                dz = p * (logp - logq - d[:, None])
            elif k == KernelId.FORWARD_KL:
                dz = p - logq.exp()
            else:
                dz = div.weighted_score(logp, logq) - p * s[:, None]
            g = g + b[:, None] * dz
        return g.scatter_add_(1, tok[:, None], a[:, None].to(g.dtype))


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_TRITON: bool | None = None


def chunk_ops(device: torch.device, acc: torch.dtype, div: Divergence | None):
    """The fused ops for this device/accumulation dtype/divergence, or None (use torch)."""
    global _TRITON
    if device.type != "cuda" or acc != torch.float32 or kernel_id(div) is None:
        return None
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    if _TRITON is None:
        _TRITON = _triton_ok()
    if not _TRITON:
        return None
    from kltrain.divergence.kernels import triton_ops

    return triton_ops.OPS
