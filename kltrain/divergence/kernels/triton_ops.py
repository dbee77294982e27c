"""Triton kernels behind :mod:`kltrain.divergence.kernels.cuda` (imported only on CUDA with
Triton present)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kltrain.divergence.kernels.ids import KernelId, alpha_of, kernel_id

LOG2 = tl.constexpr(0.6931471805599453)
_REVERSE_KL = tl.constexpr(int(KernelId.REVERSE_KL))
_FORWARD_KL = tl.constexpr(int(KernelId.FORWARD_KL))
_JS = tl.constexpr(int(KernelId.JS))
_TV = tl.constexpr(int(KernelId.TV))
_ALPHA = tl.constexpr(int(KernelId.ALPHA))
_HELLINGER = tl.constexpr(int(KernelId.HELLINGER))
_NONE = tl.constexpr(int(KernelId.NONE))
STATS_BLOCK, STATS_WARPS = 2048, 8
GRAD_BLOCK, GRAD_WARPS = 2048, 8


@triton.jit
def _log1pexp_neg(x):
    """log(1 + e^(−x)) for x ≥ 0."""
    return tl.log(1.0 + tl.exp(-x))


@triton.jit
def _terms(logp, logq, ALPHA, DIV: tl.constexpr):
    """(π_ref·f(π/π_ref), π·f'(π/π_ref)) elementwise, as the divergences' token_terms and
    weighted_score, for DIV in 2..6."""
    p = tl.exp(logp)
    if DIV == _JS:  # js
        diff = logp - logq
        logm = tl.maximum(logp, logq) + _log1pexp_neg(tl.abs(diff)) - LOG2
        tt = 0.5 * (p * (logp - logm) + tl.exp(logq) * (logq - logm))
        softplus = tl.maximum(-diff, 0.0) + _log1pexp_neg(tl.abs(diff))
        ws = 0.5 * p * (LOG2 - softplus)
    elif DIV == _TV:  # tv
        diff = logp - logq
        tt = 0.5 * tl.abs(p - tl.exp(logq))
        ws = 0.5 * p * tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    elif DIV == _ALPHA:  # alpha
        mixed = tl.exp(ALPHA * logp + (1.0 - ALPHA) * logq)
        tt = (mixed - ALPHA * p - (1.0 - ALPHA) * tl.exp(logq)) / (ALPHA * (ALPHA - 1.0))
        ws = (mixed - p) / (ALPHA - 1.0)
    elif DIV == _HELLINGER:  # hellinger
        hd = tl.exp(0.5 * logp) - tl.exp(0.5 * logq)
        tt = hd * hd
        ws = p - tl.exp(0.5 * (logp + logq))
    else:  # chi2
        cd = tl.exp(logp - 0.5 * logq) - tl.exp(0.5 * logq)
        tt = cd * cd
        ws = 2.0 * (tl.exp(2.0 * logp - logq) - p)
    return tt, ws


@triton.jit
def _stats_kernel(
    Z, ZQ, TOK, AUX, C, V, stride_z, stride_zq, ALPHA,
    DIV: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """AUX [5, C]: lse, lse_ref, D, S, log π(token) per row."""
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    zq_row = ZQ + row * stride_zq
    offs = tl.arange(0, BLOCK)
    ninf = float("-inf")
    mp = tl.full([BLOCK], ninf, tl.float32)
    sp = tl.zeros([BLOCK], tl.float32)
    mq = tl.full([BLOCK], ninf, tl.float32)
    sq = tl.zeros([BLOCK], tl.float32)
    t = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        x = tl.load(z_row + cols, mask=mask, other=ninf).to(tl.float32)
        mpn = tl.maximum(mp, x)
        safe_p = tl.where(mpn == ninf, 0.0, mpn)
        scale_p = tl.exp(mp - safe_p)
        ex = tl.exp(x - safe_p)
        sp = sp * scale_p + ex
        mp = mpn
        if DIV != _NONE:
            y = tl.load(zq_row + cols, mask=mask, other=ninf).to(tl.float32)
            mqn = tl.maximum(mq, y)
            safe_q = tl.where(mqn == ninf, 0.0, mqn)
            scale_q = tl.exp(mq - safe_q)
            ey = tl.exp(y - safe_q)
            sq = sq * scale_q + ey
            mq = mqn
            if DIV == _REVERSE_KL:
                t = t * scale_p + ex * tl.where(mask, x - y, 0.0)
            if DIV == _FORWARD_KL:
                t = t * scale_q + ey * tl.where(mask, y - x, 0.0)
    m = tl.max(mp, 0)
    wp = tl.exp(mp - m)
    s_p = tl.sum(sp * wp, 0)
    lse = m + tl.log(s_p)
    tok = tl.load(TOK + row)
    lp = tl.load(z_row + tok).to(tl.float32) - lse
    tl.store(AUX + row, lse)
    tl.store(AUX + 4 * C + row, lp)
    if DIV != _NONE:
        mr = tl.max(mq, 0)
        wq = tl.exp(mq - mr)
        s_q = tl.sum(sq * wq, 0)
        lseq = mr + tl.log(s_q)
        tl.store(AUX + C + row, lseq)
        if DIV == _REVERSE_KL:
            d = tl.sum(t * wp, 0) / s_p - lse + lseq
            tl.store(AUX + 2 * C + row, d)
        elif DIV == _FORWARD_KL:
            d = tl.sum(t * wq, 0) / s_q - lseq + lse
            tl.store(AUX + 2 * C + row, d)
        else:
            d_acc = tl.zeros([BLOCK], tl.float32)
            s_acc = tl.zeros([BLOCK], tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + offs
                mask = cols < V
                logp = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32) - lse
                logq = tl.load(zq_row + cols, mask=mask, other=0.0).to(tl.float32) - lseq
                tt, ws = _terms(logp, logq, ALPHA, DIV)
                d_acc += tl.where(mask, tt, 0.0)
                s_acc += tl.where(mask, ws, 0.0)
            tl.store(AUX + 2 * C + row, tl.sum(d_acc, 0))
            tl.store(AUX + 3 * C + row, tl.sum(s_acc, 0))


@triton.jit
def _grad_kernel(
    Z, ZQ, TOK, AUX, A, B, G, C, V, stride_z, stride_zq, stride_g, ALPHA,
    DIV: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """G = b·∂D/∂z − a·π + a·onehot(token), one (row, column block) per program."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    lse = tl.load(AUX + row)
    a = tl.load(A + row).to(tl.float32)
    tok = tl.load(TOK + row)
    logp = tl.load(Z + row * stride_z + cols, mask=mask, other=0.0).to(tl.float32) - lse
    p = tl.exp(logp)
    g = -a * p
    if DIV != _NONE:
        b = tl.load(B + row).to(tl.float32)
        lseq = tl.load(AUX + C + row)
        logq = tl.load(ZQ + row * stride_zq + cols, mask=mask, other=0.0).to(tl.float32) - lseq
        if DIV == _REVERSE_KL:
            d = tl.load(AUX + 2 * C + row)
            dz = p * (logp - logq - d)
        elif DIV == _FORWARD_KL:
            dz = p - tl.exp(logq)
        else:
            s = tl.load(AUX + 3 * C + row)
            _, ws = _terms(logp, logq, ALPHA, DIV)
            dz = ws - p * s
        g += b * dz
    g += tl.where(cols == tok, a, 0.0)
    tl.store(G + row * stride_g + cols, g.to(G.dtype.element_ty), mask=mask)


def _rowmajor(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class TritonChunkOps:
    def stats(self, z, zq, tok, div):
        k = kernel_id(div)
        z = _rowmajor(z)
        zq = z if k == KernelId.NONE else _rowmajor(zq)
        c, v = z.shape
        aux = torch.empty((5, c), dtype=torch.float32, device=z.device)
        if k != KernelId.NONE:
            aux[3].zero_()
        tok = tok.contiguous()
        _stats_kernel[(c,)](
            z, zq, tok, aux, c, v, z.stride(0), zq.stride(0), alpha_of(div),
            DIV=int(k), BLOCK=STATS_BLOCK, num_warps=STATS_WARPS,
        )  # fmt: skip
        d = None if k == KernelId.NONE else aux[2]
        return aux[4], d, aux

    def grad(self, z, zq, tok, aux, a, b, out, div):
        k = kernel_id(div)
        z = _rowmajor(z)
        zq = z if k == KernelId.NONE else _rowmajor(zq)
        c, v = z.shape
        assert out.stride(-1) == 1
        a = a.contiguous()
        b = a if b is None else b.contiguous()
        grid = (c, triton.cdiv(v, GRAD_BLOCK))
        _grad_kernel[grid](
            z, zq, tok.contiguous(), aux, a, b, out, c, v,
            z.stride(0), zq.stride(0), out.stride(0), alpha_of(div),
            DIV=int(k), BLOCK=GRAD_BLOCK, num_warps=GRAD_WARPS,
        )  # fmt: skip
        return out


OPS = TritonChunkOps()
