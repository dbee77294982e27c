"""The memory-lean lm_head path: per-token log-probs and exact divergences without [N, V] logits.

Shapes: ``N`` flattened tokens (batch·seq), ``H`` hidden size, ``V`` vocabulary. The hidden
states are the final, post-norm ones; the lm_head is ``logits = h @ Wᵀ + b`` with W ``[V, H]``.

For each chunk of ``c`` rows, the logits are formed in fp32, used and dropped, and the gradient
w.r.t. them is formed in closed form *inside the forward loop* (as Liger's fused linear
cross-entropy does), so peak memory beyond the hidden states grows with the chunk size, not N:

    ∂loss/∂z = a·(onehot(y) − π) + b·∂D/∂z,   ∂D/∂z_v = π_v (s_v − Σ_w π_w s_w), s = f'(π/π_ref)

where a = ∂loss/∂logprob and b = ∂loss/∂D per row come from a tiny autograd.grad of ``loss_fn``
on ``[c]`` leaves. Then grad_h = G @ W and grad_W += Gᵀ h: four lm_head matmuls in all (policy
forward, reference forward, two for the policy's backward).

With fp32 accumulation and a built-in divergence (or none) the per-chunk elementwise work
between the GEMMs runs as two fused steps (:mod:`kltrain.divergence.kernels`): row statistics
(lse of both models, log π(token), D, and Σ π s) before ``loss_fn``, then G. On CUDA they are
Triton kernels (G written over the policy's logits, or directly in bf16/fp16 for a native half
head); on the CPU the same torch code compiled by inductor, for calls of ≥ 512 tokens.
Elsewhere (float64, a user f, fewer tokens on the CPU, ``KLTRAIN_FUSED_CUDA=0`` /
``KLTRAIN_FUSED_CPU=0``) the torch ops below run, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kltrain.divergence import functions
from kltrain.divergence.functions import Divergence, as_divergence
from kltrain.divergence.kernels import cpu as chunked_cpu
from kltrain.divergence.kernels import cuda as chunked_cuda
from kltrain.divergence.kernels import onednn


@dataclass
class TokenChunk:
    """One chunk of the flattened token axis, as ``loss_fn`` sees it.

    index: the rows of ``[N]`` in this chunk (use it to slice advantages, masks, ...).
    logprobs: ``[c]`` log π(token), fp32, differentiable.
    divergence: ``[c]`` exact per-token D(π‖π_ref) over the full vocabulary, differentiable;
    None when no divergence was asked for.
    """

    index: slice
    logprobs: Tensor
    divergence: Tensor | None


_MM_OUT_DTYPE: dict[str, bool] = {}


def _has_mm_out_dtype(device: torch.device) -> bool:
    """Whether torch.mm(a, b, out_dtype=fp32) works for bf16/fp16 on this device type (CUDA)."""
    if device.type not in _MM_OUT_DTYPE:
        try:
            a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
            ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _MM_OUT_DTYPE[device.type] = ok
    return _MM_OUT_DTYPE[device.type]


class _Head:
    """An lm_head whose products come out in fp32.

    Half-precision operands use torch.mm(..., out_dtype=fp32) where the device has it (fp32
    accumulate and output, no bf16 rounding of logits); otherwise they are upcast once per call —
    not per chunk — at the cost of one fp32 copy of W and of h. fp32 on the CPU: the logits and
    ``G @ W`` products are oneDNN's (:mod:`.kernels.onednn`, faster than MKL's there).
    """

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None):
        half = weight.dtype in (torch.bfloat16, torch.float16)
        self.native = half and hidden.dtype == weight.dtype and _has_mm_out_dtype(weight.device)
        if self.native or weight.dtype == torch.float64:
            self.h, self.w = hidden.detach(), weight.detach()
        else:
            self.h, self.w = hidden.detach().float(), weight.detach().float()
        self.b = None if bias is None else bias.detach().to(self._acc)
        self.onednn = onednn.applies(self.h, self.w)

    @property
    def _acc(self) -> torch.dtype:
        return torch.float64 if self.w.dtype == torch.float64 else torch.float32

    def mm(self, a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
        """a @ b in fp32; into ``out`` when given (ignored on the native half path, where CUDA's
        caching allocator makes a fresh result cheap)."""
        if self.native:
            return torch.mm(a.to(self.w.dtype), b.to(self.w.dtype), out_dtype=torch.float32)
        if self.onednn:  # no out= there: a copy into the caller's buffer costs ~3% of the product
            product = onednn.matmul(a, b)
            return product if out is None else out.copy_(product)
        return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)

    def logits(self, rows: slice, out: Tensor | None = None) -> Tensor:
        z = self.mm(self.h[rows], self.w.t(), out)
        return z if self.b is None else z.add_(self.b)

    def add_weight_grad(self, grad_w: Tensor, g: Tensor, rows: slice) -> None:
        """grad_w += gᵀ h[rows] (fp32 accumulator, in place where possible)."""
        if self.native:
            grad_w.add_(self.mm(g.t(), self.h[rows]))
        else:
            grad_w.addmm_(g.t(), self.h[rows])


def _log_softmax_(z: Tensor, scratch: Tensor) -> Tensor:
    """log_softmax over the last axis, in place in ``z``, using ``scratch`` (same shape) for exp.

    Reusing buffers matters on CPU: a fresh [c, V] allocation is mmapped and page-faulted, which
    costs about as much as the arithmetic on it.
    """
    z.sub_(z.amax(-1, keepdim=True))
    lse = torch.exp(z, out=scratch).sum(-1, keepdim=True).log_()
    return z.sub_(lse)


def _check_inputs(hidden: Tensor, weight: Tensor, tokens: Tensor | None, what: str) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{what}: expected hidden [N, H] and weight [V, H], got "
            f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if tokens is not None and tokens.shape != hidden.shape[:1]:
        raise ValueError(f"{what}: tokens must be [N]={hidden.shape[0]}, got {tuple(tokens.shape)}")


def _ref_head(ref_hidden, ref_weight, ref_bias, policy_hidden, needed: bool) -> _Head | None:
    if ref_hidden is None and ref_weight is None:
        if needed:
            raise ValueError("a divergence needs the reference: pass ref_hidden and ref_weight")
        return None
    if ref_hidden is None or ref_weight is None:
        raise ValueError("pass both ref_hidden and ref_weight, or neither")
    _check_inputs(ref_hidden, ref_weight, None, "reference")
    if ref_hidden.shape[0] != policy_hidden.shape[0]:
        raise ValueError("reference and policy hidden states must have the same N")
    return _Head(ref_hidden, ref_weight, ref_bias)


def _row_grads(loss_fn, rows: slice, logprobs: Tensor, d: Tensor | None):
    """loss_fn on detached [c] leaves; returns (loss, ∂loss/∂logprobs, ∂loss/∂D or None)."""
    lp = logprobs.detach().requires_grad_(True)
    dv = None if d is None else d.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(TokenChunk(rows, lp, dv))
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn must return a scalar Tensor")
        leaves = [lp] if dv is None else [lp, dv]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    return loss.detach(), grads[0], (grads[1] if dv is not None else None)


def _fused_ops(device: torch.device, acc: torch.dtype, div: Divergence | None, tokens: int):
    """Fused ops for the per-chunk elementwise work (built-in divergences): Triton kernels on
    CUDA, compiled torch on the CPU (for ``tokens`` enough to pay); None where neither applies."""
    if device.type == "cpu":
        return chunked_cpu.chunk_ops(device, acc, div, tokens)
    return chunked_cuda.chunk_ops(device, acc, div)


class _FusedTokenLoss(torch.autograd.Function):
    """Forward does the whole chunk loop and stores the input grads; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, loss_fn, ref, div, chunk_size):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        head = _Head(hidden, weight, bias)
        acc = head._acc
        n = hidden.shape[0]
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        need_any = need_h or need_w or need_b
        fast = _fused_ops(hidden.device, acc, div, hidden.shape[0])
        # [chunk, V] buffers reused by every chunk: scratch, and the policy's and reference's
        # log-probs (which the divergence's in-place update turns into π and ∂D/∂z). A native
        # half-precision head returns fresh logits instead (CUDA's caching allocator reuses them).
        # The fused (CUDA) ops need no scratch and write G over the policy's logits.
        ref_used = ref if div is not None else None
        owners = [] if fast is not None else [None]
        owners += [h for h in (head, ref_used) if h is not None and not h.native]
        rows0 = min(chunk_size, n)
        bufs = torch.empty((len(owners), rows0, weight.shape[0]), dtype=acc, device=hidden.device)
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            c = rows.stop - rows.start
            buf_p, buf_q = (
                bufs[owners.index(h), :c] if h is not None and h in owners else None
                for h in (head, ref)
            )
            if fast is not None:
                z = head.logits(rows, buf_p)
                zq = None if ref_used is None else ref_used.logits(rows, buf_q)
                lp_tok, d, aux = fast.stats(z, zq, tokens[rows], div)
                loss, a, b = _row_grads(loss_fn, rows, lp_tok, d)
                total += loss
                if not need_any:
                    continue
                # G over z (fp32), or straight in the half dtype the backward GEMMs round it to
                # (not when the bias grad needs its fp32 column sums).
                out = z
                if head.native and not need_b:
                    out = torch.empty(z.shape, dtype=head.w.dtype, device=z.device)
                g = fast.grad(
                    z, zq, tokens[rows], aux, a.to(acc), None if b is None else b.to(acc), out, div
                )
                del z, zq
            else:
                scratch = bufs[0, :c]
                tok = tokens[rows].unsqueeze(1)
                logp = _log_softmax_(head.logits(rows, buf_p), scratch)
                lp_tok = logp.gather(1, tok).squeeze(1)
                d = dgrad = p = None
                if div is not None:
                    logq = _log_softmax_(ref.logits(rows, buf_q), scratch)
                    d, dgrad, p = div.value_and_logit_grad_(logp, logq, scratch)
                    del logq
                elif need_any:
                    p = logp.exp_()
                del logp
                loss, a, b = _row_grads(loss_fn, rows, lp_tok, d)
                total += loss
                if not need_any:
                    continue
                # G = b·∂D/∂z − a·π + a·onehot(y), built in place in dgrad (or in π when no D).
                a = a.unsqueeze(1).to(acc)
                if dgrad is None:
                    g = p.mul_(-a)
                else:
                    g = dgrad.mul_(b.unsqueeze(1).to(acc)).addcmul_(p, a, value=-1.0)
                g.scatter_add_(1, tok, a)
                del p, dgrad
            if need_h:
                grad_h[rows] = head.mm(g, head.w, out=grad_h[rows])
            if need_w:
                head.add_weight_grad(grad_w, g, rows)
            if need_b:
                grad_b.add_(g.sum(0))
            del g
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.grad_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.present = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.scaled = False
        return total.float() if acc == torch.float32 else total

    @staticmethod
    def backward(ctx, grad_out):
        # Scaled in place: the [V, H] weight gradient is the largest buffer alive at this point
        # of the backward (every activation is still held), and a scaled copy would double it.
        # So the stored gradients can be scaled once only.
        if ctx.scaled:
            raise RuntimeError(
                "fused_token_loss: a second backward through the same loss (retain_graph) is "
                "not supported; its stored gradients were already scaled by the first"
            )
        ctx.scaled = True
        saved = iter(ctx.saved_tensors)
        out = []
        for present, dtype in zip(ctx.present, ctx.grad_dtypes):
            out.append(next(saved).mul_(grad_out).to(dtype) if present else None)
        return (*out, None, None, None, None, None)


def fused_token_loss(
    policy_hidden: Tensor,
    policy_weight: Tensor,
    tokens: Tensor,
    loss_fn: Callable[[TokenChunk], Tensor],
    *,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    divergence: str | Divergence | None = None,
    chunk_size: int = 1024,
    policy_bias: Tensor | None = None,
    ref_bias: Tensor | None = None,
) -> Tensor:
    """Σ_chunks loss_fn(chunk) without materialising [N, V] logits; differentiable.

    policy_hidden ``[N, H]`` (final, post-norm), policy_weight ``[V, H]`` (the lm_head; its grad is
    computed only if it requires grad, e.g. not when frozen under LoRA), tokens ``[N]`` long, and
    ``ref_*`` the same for the frozen reference (never differentiated). ``loss_fn`` maps a
    :class:`TokenChunk` to that chunk's scalar contribution; it is differentiated only w.r.t.
    ``chunk.logprobs`` and ``chunk.divergence`` (any other tensor it uses is a constant).

    Logits are fp32 even for bf16/fp16 inputs; grads are accumulated in fp32 and cast to each
    input's dtype. The returned scalar's backward gives exactly the gradient of the sum w.r.t.
    policy_hidden, policy_weight and policy_bias (four lm_head matmuls in all).
    """
    div = None if divergence is None else as_divergence(divergence)
    _check_inputs(policy_hidden, policy_weight, tokens, "policy")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    ref = _ref_head(ref_hidden, ref_weight, ref_bias, policy_hidden, div is not None)
    return _FusedTokenLoss.apply(
        policy_hidden, policy_weight, policy_bias, tokens, loss_fn, ref, div, chunk_size
    )


@torch.no_grad()
def token_stats(
    policy_hidden: Tensor,
    policy_weight: Tensor,
    tokens: Tensor,
    *,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    divergences=(),
    chunk_size: int = 1024,
    policy_bias: Tensor | None = None,
    ref_bias: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-token statistics ``[N]`` each, chunked like :func:`fused_token_loss`, no grad.

    "logprobs" (log π(token)), "entropy" (−Σ_v π log π), "ref_logprobs" (if a reference is given),
    and one entry per divergence (a Divergence or a name), keyed by its name.
    """
    divs = [as_divergence(d) for d in divergences]
    _check_inputs(policy_hidden, policy_weight, tokens, "policy")
    ref = _ref_head(ref_hidden, ref_weight, ref_bias, policy_hidden, bool(divs))
    head = _Head(policy_hidden, policy_weight, policy_bias)
    n = policy_hidden.shape[0]
    # Rows per chunk capped so that each [rows, V] temporary of the (allocating) statistics below
    # stays under glibc's mmap threshold and is reused from the heap, not page-faulted afresh.
    chunk_size = min(chunk_size, max(1, functions.BLOCK_ELEMENTS // policy_weight.shape[0]))
    keys = ["logprobs", "entropy"] + (["ref_logprobs"] if ref else []) + [d.name for d in divs]
    out = {k: torch.empty(n, dtype=head._acc, device=policy_hidden.device) for k in keys}
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        tok = tokens[rows].unsqueeze(1)
        logp = F.log_softmax(head.logits(rows), -1)
        out["logprobs"][rows] = logp.gather(1, tok).squeeze(1)
        out["entropy"][rows] = torch.special.entr(logp.exp()).sum(-1)
        if ref is not None:
            logq = F.log_softmax(ref.logits(rows), -1)
            out["ref_logprobs"][rows] = logq.gather(1, tok).squeeze(1)
            for d in divs:
                out[d.name][rows] = d.token_terms(logp, logq).sum(-1)
    return out
