"""kltrain.divergence.lm_head against the plain path: full [N, V] logits, token_divergence and
autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kltrain.divergence.functions import get_divergence, token_divergence
from kltrain.divergence.lm_head import TokenChunk, fused_token_loss, token_stats
from tests.conftest import assert_close_to_scale, fp32_tol

N, H, V = 45, 12, 70


def make(seed=0, dtype=torch.float32, bias=False, scale=0.4):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    t = {
        "h": rnd(N, H).requires_grad_(True),
        "w": rnd(V, H).requires_grad_(True),
        "rh": rnd(N, H),
        "rw": rnd(V, H),
        "tok": torch.randint(0, V, (N,), generator=g),
        "adv": torch.randn(N, generator=g),
        "mask": torch.rand(N, generator=g) > 0.2,
    }
    if bias:
        t["b"] = rnd(V).requires_grad_(True)
        t["rb"] = rnd(V)
    return t


# loss_fn(chunk), its plain twin loss(logprobs [N], d [N] or None), both over the same rows, and
# the loss's magnitude: Σ over tokens of |each term|, with a term's inputs in absolute value where
# it is not 1-Lipschitz-free of them (sin(ℓ) carries ℓ's error: |ℓ|; d² carries 2|d|·δd: d²).
# A sum's rounding error is bounded by its terms' absolute sum, not by the sum (which may cancel).
def pg_plus_kl(t, beta=0.3):
    m = t["mask"].float()

    def chunked(c: TokenChunk):
        i = c.index
        return (-(t["adv"][i] * c.logprobs) + beta * c.divergence).mul(m[i]).sum()

    def plain(lp, d):
        return ((-(t["adv"] * lp) + beta * d) * m).sum()

    def magnitude(lp, d):
        return (((t["adv"] * lp).abs() + beta * d.abs()) * m).sum()

    return chunked, plain, magnitude


def nonlinear(t):
    def chunked(c):
        return (c.divergence.square() + torch.sin(c.logprobs)).sum()

    def plain(lp, d):
        return (d.square() + torch.sin(lp)).sum()

    return chunked, plain, lambda lp, d: (d.square() + lp.abs()).sum()


def divergence_only(t):
    return (lambda c: c.divergence.sum()), (lambda lp, d: d.sum()), (lambda lp, d: d.abs().sum())


def logprobs_only(t):
    return (
        (lambda c: -(t["adv"][c.index] * c.logprobs).sum()),
        (lambda lp, d: -(t["adv"] * lp).sum()),
        (lambda lp, d: (t["adv"] * lp).abs().sum()),
    )


def _acc(x):
    """The plain path's precision: half inputs are upcast to fp32 (as the chunked path forms its
    logits), float64 stays float64 (the accurate reference)."""
    return x if x.dtype == torch.float64 else x.float()


def plain_inputs(t, divergence, bias=False):
    """Per-token log-probs [N] and divergences [N] (or None) from full [N, V] logits."""
    z = _acc(t["h"]) @ _acc(t["w"]).T + (_acc(t["b"]) if bias else 0)
    lp = torch.log_softmax(z, -1).gather(1, t["tok"][:, None]).squeeze(1)
    d = None
    if divergence is not None:
        zq = _acc(t["rh"]) @ _acc(t["rw"]).T + (_acc(t["rb"]) if bias else 0)
        d = token_divergence(z, zq, divergence)
    return lp, d


def plain_path(t, divergence, loss, bias=False):
    return loss(*plain_inputs(t, divergence, bias))


def magnitude64(t, divergence, loss, bias=False):
    """The loss's magnitude (its terms' absolute sum), in float64."""
    t64 = as64(t)
    with torch.no_grad():
        lp, d = plain_inputs(t64, divergence, bias)
        return float(loss(t64)[2](lp, d if d is not None else torch.zeros_like(lp)))


def fused(t, divergence, loss, chunk_size, bias=False, ref=True):
    kw = {"policy_bias": t["b"], "ref_bias": t["rb"]} if bias else {}
    if ref:
        kw |= {"ref_hidden": t["rh"], "ref_weight": t["rw"]}
    return fused_token_loss(
        t["h"], t["w"], t["tok"], loss, divergence=divergence, chunk_size=chunk_size, **kw
    )


def params(t, bias):
    return [t["h"], t["w"]] + ([t["b"]] if bias else [])


DIVS = [
    ("reverse_kl", {}),
    ("forward_kl", {}),
    ("js", {}),
    ("tv", {}),
    ("alpha", {"alpha": 1.5}),
    ("hellinger", {}),
    ("chi2", {}),
]


def chunk_rtol(n: int = N, v: int = V, h: int = H) -> float:
    """fp32 error bound of the chunked path's outputs against the exact value, relative to
    the quantity's magnitude: every output accumulates an h-term dot product (logits), a v-term
    log-sum-exp and softmax, and an n-term sum over tokens (the loss, ∂/∂W), plus ≤ 8 elementwise
    roundings per term (log-ratio, exp, f, the loss); gradient entries are differences of terms
    (π(s − Σπs), ±adv), given a cancellation allowance of 8 (ratio of an entry's terms' absolute
    sum to the tensor's largest entry)."""
    return fp32_tol(n + v + h + 8, cond=8.0)


def chunk_value_rtol(n: int = N, v: int = V, h: int = H) -> float:
    """The loss value's fp32 error relative to its magnitude (its terms' absolute sum, which
    already carries any cancellation): the same accumulation length, no further allowance."""
    return fp32_tol(n + v + h + 8)


#: Two fp32 evaluations of one quantity (each within chunk_rtol of the exact value).
TWO_FP32_RTOL = 2 * chunk_rtol()
TWO_FP32_VALUE_RTOL = 2 * chunk_value_rtol()


def assert_close_scaled(got, want, rtol=None):
    """Elementwise |got − want| ≤ rtol·(|want| + max|want|) (tests/conftest.py), by default
    at :func:`chunk_rtol`: fp32 agreement at the tensor's scale (tiny gradient entries carry
    cancellation error in any fp32 implementation)."""
    assert_close_to_scale(got, want, chunk_rtol() if rtol is None else rtol)


def assert_loss_close(got, want, magnitude, rtol=None):
    """A scalar loss within ``rtol`` (default :func:`chunk_value_rtol`) of ``magnitude``, the
    absolute sum of its terms (float64): a sum that cancels is only accurate to the terms'
    size."""
    rtol = chunk_value_rtol() if rtol is None else rtol
    got, want = float(got.detach()), float(want.detach())
    assert abs(got - want) <= rtol * float(magnitude), (got, want, magnitude)


def as64(t):
    """A float64 copy of the inputs (same leaves/requires_grad), for an accurate reference."""
    return {
        k: (v.detach().double().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
        for k, v in t.items()
    }


@pytest.mark.parametrize(("name", "p"), DIVS, ids=[n for n, _ in DIVS])
@pytest.mark.parametrize("loss", [pg_plus_kl, nonlinear, divergence_only])
@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_values_and_gradients_match_plain_path(name, p, loss, chunk_size):
    bias = chunk_size == 7  # exercise the bias path on one of the two chunkings
    t = make(bias=bias)
    div = get_divergence(name, **p)
    chunked = loss(t)[0]
    got = fused(t, div, chunked, chunk_size, bias)
    g_got = torch.autograd.grad(got, params(t, bias))
    magnitude = magnitude64(t, div, loss, bias)
    # Against the plain path in fp32 (both in error: twice the bound) and in float64 (exact).
    for ref, two in ((t, 2), (as64(t), 1)):
        want = plain_path(ref, div, loss(ref)[1], bias)
        g_want = torch.autograd.grad(want, params(ref, bias))
        assert_loss_close(got, want, magnitude, two * chunk_value_rtol())
        rtol = two * chunk_rtol()
        for a, b in zip(g_got, g_want):
            assert a.dtype == torch.float32
            assert_close_scaled(a, b, rtol)


def test_no_reference_and_divergence_needs_one():
    t = make(1)
    chunked, plain, _ = logprobs_only(t)
    want = plain_path(t, None, plain)
    got = fused(t, None, chunked, 8, ref=False)
    assert_loss_close(got, want, magnitude64(t, None, logprobs_only), TWO_FP32_VALUE_RTOL)
    for a, b in zip(
        torch.autograd.grad(got, params(t, False)), torch.autograd.grad(want, params(t, False))
    ):
        assert_close_scaled(a, b, TWO_FP32_RTOL)
    with pytest.raises(ValueError, match="reference"):
        fused(t, "reverse_kl", chunked, 8, ref=False)


def test_frozen_weight_gets_no_gradient():
    t = make(2)
    t["w"].requires_grad_(False)
    chunked, plain, _ = pg_plus_kl(t)
    want = torch.autograd.grad(plain_path(t, "reverse_kl", plain), t["h"])[0]
    out = fused(t, "reverse_kl", chunked, 10)
    out.backward()
    assert t["w"].grad is None
    assert_close_scaled(t["h"].grad, want, TWO_FP32_RTOL)


def test_backward_scales_by_the_incoming_gradient():
    t = make(3)
    chunked = pg_plus_kl(t)[0]
    g1 = torch.autograd.grad(fused(t, "js", chunked, 16), params(t, False))
    g3 = torch.autograd.grad(-3 * fused(t, "js", chunked, 16), params(t, False))
    for a, b in zip(g1, g3):
        # the same sums with the incoming gradient applied at a different point: each within
        # the bound of the exact −3·∇, plus one rounding of −3·a
        assert_close_scaled(-3 * a, b, TWO_FP32_RTOL + 2**-24)


def test_a_second_backward_through_the_same_loss_is_refused_not_rescaled():
    """The stored gradients are scaled in place (no [V, H] copy at the backward's peak), so a
    retained graph cannot be differentiated twice: that must raise instead of returning the
    gradient scaled twice."""
    t = make(3)
    loss = -3 * fused(t, "js", pg_plus_kl(t)[0], 16)
    torch.autograd.grad(loss, params(t, False), retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        torch.autograd.grad(loss, params(t, False))


class MatmulFlops(TorchDispatchMode):
    """Counts 2·m·k·n for every aten mm/addmm call, whatever the overload (out=, in place), and
    for oneDNN's linear (fp32 on the CPU: ``x [m, k] Wᵀ``, W ``[n, k]``)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = args[-2:] if name != "mm" else args[:2]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        elif name == "_linear_pointwise":
            x, w = args[:2]
            self.flops += 2 * x.numel() * w.shape[0]
        elif name in ("bmm", "matmul", "baddbmm", "mv", "dot", "linear"):
            raise AssertionError(f"unexpected {name}")
        return func(*args, **(kwargs or {}))


def test_exactly_four_lm_head_matmuls():
    t = make(4)
    chunked = pg_plus_kl(t)[0]
    with MatmulFlops() as counter:
        fused(t, "reverse_kl", chunked, 10).backward()
    assert counter.flops == 4 * 2 * N * H * V
    # Without a reference: policy forward and its two backward products only.
    t = make(4)
    chunked = logprobs_only(t)[0]
    with MatmulFlops() as counter:
        fused(t, None, chunked, 10, ref=False).backward()
    assert counter.flops == 3 * 2 * N * H * V


def test_no_grad_and_constant_inputs_compute_value_only():
    t = make(5)
    chunked, plain, _ = pg_plus_kl(t)
    want = plain_path(t, "reverse_kl", plain)
    with torch.no_grad():
        got = fused(t, "reverse_kl", chunked, 9)
    assert not got.requires_grad
    magnitude = magnitude64(t, "reverse_kl", pg_plus_kl)
    assert_loss_close(got, want.detach(), magnitude, TWO_FP32_VALUE_RTOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_use_fp32_logits(dtype):
    """bf16/fp16 hidden and weights: logits are formed in fp32 from the given values, grads come
    back in the input dtype (accumulated in fp32)."""
    t = make(6, dtype=dtype)
    chunked = pg_plus_kl(t)[0]
    got = fused(t, "reverse_kl", chunked, 11)
    g_got = torch.autograd.grad(got, params(t, False))
    # Reference: the same values in float64 (logits never rounded to the half type).
    t64 = as64(t)
    want = plain_path(t64, "reverse_kl", pg_plus_kl(t64)[1])
    g_want = torch.autograd.grad(want, params(t64, False))
    assert got.dtype == torch.float32
    assert_loss_close(got, want, magnitude64(t, "reverse_kl", pg_plus_kl))
    for a, b in zip(g_got, g_want):
        assert a.dtype == dtype
        # Only the final cast to the half dtype rounds, by at most its unit roundoff (2^-8
        # bf16, 2^-11 fp16) relative; the fp32 accumulation error (≤ chunk_rtol at the tensor's
        # scale) is far below that and covered by the max-scale term of the comparison.
        assert_close_scaled(a, b, rtol=2**-8 if dtype == torch.bfloat16 else 2**-11)


def test_native_half_path_emulated(monkeypatch):
    """The CUDA branch (torch.mm(..., out_dtype=fp32) on bf16 operands) emulated on CPU: bf16
    operands, products exact in fp32, G rounded to bf16 for the two backward GEMMs."""
    import kltrain.divergence.lm_head as chunked_mod

    def mm_out_dtype(self, a, b, out=None):
        if not self.native:
            return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
        return torch.mm(a.to(self.w.dtype).float(), b.to(self.w.dtype).float())

    monkeypatch.setattr(chunked_mod, "_has_mm_out_dtype", lambda device: True)
    monkeypatch.setattr(chunked_mod._Head, "mm", mm_out_dtype)
    t = make(9, dtype=torch.bfloat16)
    chunked = pg_plus_kl(t)[0]
    got = fused(t, "forward_kl", chunked, 16)
    g_got = torch.autograd.grad(got, params(t, False))
    t64 = as64(t)
    want = plain_path(t64, "forward_kl", pg_plus_kl(t64)[1])
    g_want = torch.autograd.grad(want, params(t64, False))
    assert_loss_close(got, want, magnitude64(t, "forward_kl", pg_plus_kl))
    for a, b in zip(g_got, g_want):
        assert a.dtype == torch.bfloat16
        # G is rounded to bf16 (2^-8 relative per entry) before an fp32-accumulated product,
        # then the result is rounded to bf16 once more: 2·2^-8
        assert_close_scaled(a, b, rtol=2**-7)


def test_loss_fn_must_return_a_scalar():
    t = make(7)
    with pytest.raises(ValueError, match="scalar"):
        fused(t, "tv", lambda c: c.divergence, 8)


def test_token_stats_match_plain_computations():
    t = make(8, bias=True)
    divs = [get_divergence("reverse_kl"), "forward_kl", get_divergence("alpha", alpha=0.5)]
    stats = token_stats(
        t["h"],
        t["w"],
        t["tok"],
        ref_hidden=t["rh"],
        ref_weight=t["rw"],
        divergences=divs,
        chunk_size=13,
        policy_bias=t["b"],
        ref_bias=t["rb"],
    )
    z = (t["h"] @ t["w"].T + t["b"]).detach().double()
    zq = (t["rh"] @ t["rw"].T + t["rb"]).double()
    lp, lq = torch.log_softmax(z, -1), torch.log_softmax(zq, -1)
    tok = t["tok"][:, None]
    want = {
        "logprobs": lp.gather(1, tok).squeeze(1),
        "ref_logprobs": lq.gather(1, tok).squeeze(1),
        "entropy": -(lp.exp() * lp).sum(-1),
        "reverse_kl": F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1),
        "forward_kl": F.kl_div(lp, lq, log_target=True, reduction="none").sum(-1),
        "alpha": 4 * (1 - (lp.exp().sqrt() * lq.exp().sqrt()).sum(-1)),  # α = ½: 4(1 − Σ√(pq))
    }
    assert set(stats) == set(want)
    for k, v in want.items():
        assert stats[k].shape == (N,) and not stats[k].requires_grad
        assert_close_to_scale(stats[k], v, chunk_rtol(), msg=k)
    only_policy = token_stats(t["h"], t["w"], t["tok"], chunk_size=100, policy_bias=t["b"])
    assert set(only_policy) == {"logprobs", "entropy"}
    torch.testing.assert_close(only_policy["entropy"], stats["entropy"])


# The fused per-chunk ops (kltrain.divergence.kernels): their torch twin runs the CUDA wiring on
# CPU;
# the Triton kernels themselves are checked where CUDA exists.
def use_fused_ops(monkeypatch, ops):
    import kltrain.divergence.lm_head as chunked_mod
    from kltrain.divergence.kernels import cuda as chunked_cuda

    calls = []

    def fused_ops(device, acc, div, tokens):
        if acc != torch.float32 or chunked_cuda.kernel_id(div) is None:
            return None
        calls.append(div)
        return ops

    monkeypatch.setattr(chunked_mod, "_fused_ops", fused_ops)
    return calls


def fused_path_matches_plain(t, name, p, loss, chunk_size, bias, rtol=None):
    """The fused path against float64, at ``rtol`` (default :func:`chunk_rtol` at the tensors'
    sizes)."""
    n, h = t["h"].shape
    value_rtol = chunk_value_rtol(n, t["w"].shape[0], h) if rtol is None else rtol
    rtol = chunk_rtol(n, t["w"].shape[0], h) if rtol is None else rtol
    div = None if name is None else get_divergence(name, **p)
    chunked = loss(t)[0]
    got = fused(t, div, chunked, chunk_size, bias, ref=div is not None)
    g_got = torch.autograd.grad(got, params(t, bias))
    t64 = as64(t)
    want = plain_path(t64, div, loss(t64)[1], bias)
    g_want = torch.autograd.grad(want, params(t64, bias))
    assert_loss_close(got, want, magnitude64(t, div, loss, bias), value_rtol)
    for a, b in zip(g_got, g_want):
        assert a.dtype == t["h"].dtype
        assert_close_scaled(a, b, rtol)


@pytest.mark.parametrize(("name", "p"), [*DIVS, (None, {})], ids=[n for n, _ in DIVS] + ["none"])
@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_fused_ops_twin_matches_plain_path(monkeypatch, name, p, chunk_size):
    from kltrain.divergence.kernels.cuda import TorchChunkOps

    calls = use_fused_ops(monkeypatch, TorchChunkOps())
    loss = pg_plus_kl if name is not None else logprobs_only
    bias = chunk_size == 7
    fused_path_matches_plain(make(11, bias=bias), name, p, loss, chunk_size, bias)
    assert calls


def test_fused_ops_twin_native_half_path(monkeypatch):
    """The CUDA bf16 branch on CPU: G is written straight in bf16 for the backward GEMMs."""
    import kltrain.divergence.lm_head as chunked_mod
    from kltrain.divergence.kernels.cuda import TorchChunkOps

    def mm_out_dtype(self, a, b, out=None):
        if not self.native:
            return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
        return torch.mm(a.to(self.w.dtype).float(), b.to(self.w.dtype).float())

    monkeypatch.setattr(chunked_mod, "_has_mm_out_dtype", lambda device: True)
    monkeypatch.setattr(chunked_mod._Head, "mm", mm_out_dtype)
    use_fused_ops(monkeypatch, TorchChunkOps())
    for name in ("reverse_kl", "js"):
        fused_path_matches_plain(make(12, torch.bfloat16), name, {}, pg_plus_kl, 16, False, 2**-7)


def test_fused_ops_only_for_cuda_fp32_and_builtins():
    from kltrain.divergence.functions import ReverseKL
    from kltrain.divergence.kernels.cuda import chunk_ops, kernel_id

    class Custom(ReverseKL):
        pass

    assert chunk_ops(torch.device("cpu"), torch.float32, get_divergence("js")) is None
    assert chunk_ops(torch.device("cuda"), torch.float64, get_divergence("js")) is None
    assert kernel_id(Custom()) is None and kernel_id(get_divergence("tv")) is not None
    assert chunk_ops(torch.device("cuda"), torch.float32, Custom()) is None


@pytest.mark.parametrize(("name", "p"), [*DIVS, (None, {})], ids=[n for n, _ in DIVS] + ["none"])
def test_cpu_compiled_ops_match_plain_path(monkeypatch, name, p):
    """The CPU default for fp32 and the built-ins: TorchChunkOps compiled by inductor. A vocab
    that is no multiple of the vector width (tails), chunks of two sizes (one compilation, as
    ``dynamic``), with and without bias, against float64."""
    from kltrain.divergence.kernels import cpu
    from kltrain.divergence.lm_head import _fused_ops

    monkeypatch.setenv(cpu.ENV_SWITCH, "1")  # the suite's default is off (tests/conftest.py)
    div = None if name is None else get_divergence(name, **p)
    ops = _fused_ops(torch.device("cpu"), torch.float32, div, 1)  # "1": at any token count
    assert isinstance(ops, cpu.CompiledChunkOps)
    global N, V
    old = N, V
    N, V = 45, 517  # chunks of 16, 16 and 13 rows
    try:
        loss = pg_plus_kl if name is not None else logprobs_only
        for bias in (False, True):
            fused_path_matches_plain(make(14, bias=bias), name, p, loss, 16, bias)
    finally:
        N, V = old


def test_cpu_compiled_ops_only_for_fp32_builtins_enough_tokens_or_when_asked(monkeypatch):
    from kltrain.divergence.functions import ReverseKL
    from kltrain.divergence.kernels import cpu

    class Custom(ReverseKL):
        pass

    def ops(div, tokens=cpu.MIN_TOKENS, dtype=torch.float32, device="cpu"):
        return cpu.chunk_ops(torch.device(device), dtype, div, tokens)

    js = get_divergence("js")
    monkeypatch.setenv(cpu.ENV_SWITCH, "auto")
    assert isinstance(ops(js), cpu.CompiledChunkOps)
    assert ops(js, tokens=cpu.MIN_TOKENS - 1) is None  # too small to pay for compiling
    assert ops(js, dtype=torch.float64) is None
    assert ops(Custom()) is None
    assert ops(js, device="cuda") is None
    half = ops(get_divergence("alpha", alpha=0.5))
    assert half is ops(get_divergence("alpha", alpha=0.5))
    assert half is not ops(get_divergence("alpha", alpha=1.5))
    monkeypatch.setenv(cpu.ENV_SWITCH, "1")
    assert isinstance(ops(js, tokens=1), cpu.CompiledChunkOps)
    monkeypatch.setenv(cpu.ENV_SWITCH, "0")
    assert ops(js) is None
    monkeypatch.setenv(cpu.ENV_SWITCH, "yes")
    with pytest.raises(ValueError, match="KLTRAIN_FUSED_CPU='yes': use auto"):
        ops(js)


def test_a_failed_cpu_compilation_says_why_and_names_the_switch(monkeypatch):
    from kltrain.divergence.kernels import cpu

    def grad_fails_to_compile(fn, **kwargs):
        if fn.__name__.startswith("stats"):
            return fn  # the statistics "compile"; the gradient step's compilation fails

        def run(*args):
            raise OSError("g++: command not found")

        return run

    monkeypatch.setattr(cpu.torch, "compile", grad_fails_to_compile)
    div = get_divergence("js")
    ops = cpu.CompiledChunkOps(div)
    z, tok = torch.randn(3, 5), torch.zeros(3, dtype=torch.long)
    _, _, aux = ops.stats(z, z, tok, div)
    with pytest.raises(RuntimeError, match="KLTRAIN_FUSED_CPU=0") as info:
        ops.grad(z, z, tok, aux, torch.ones(3), torch.ones(3), None, div)
    assert "g++: command not found" in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernels)")
@pytest.mark.parametrize(("name", "p"), [*DIVS, (None, {})], ids=[n for n, _ in DIVS] + ["none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_kernels_match_plain_path(name, p, dtype):
    from kltrain.divergence.kernels.cuda import chunk_ops

    assert chunk_ops(torch.device("cuda"), torch.float32, get_divergence("js")) is not None
    global N, V
    old = N, V
    N, V = 301, 5003  # several column blocks, a partial last chunk
    try:
        t = {k: v.detach().cuda().requires_grad_(v.requires_grad) for k, v in make(13).items()}
        t = {
            k: (
                v.detach().to(dtype).requires_grad_(v.requires_grad) if v.is_floating_point() else v
            )
            for k, v in t.items()
        }
        t["adv"], t["mask"] = t["adv"].float(), t["mask"].bool()
        loss = pg_plus_kl if name is not None else logprobs_only
        for bias in (False, True):
            if bias:
                t["b"] = (0.4 * torch.randn(V, device="cuda")).to(dtype).requires_grad_(True)
                t["rb"] = (0.4 * torch.randn(V, device="cuda")).to(dtype)
            # fp32: the derived bound at N, V; bf16: G and the result rounded to bf16 (2·2^-8)
            fused_path_matches_plain(
                t, name, p, loss, 128, bias, None if dtype == torch.float32 else 2**-7
            )
    finally:
        N, V = old
