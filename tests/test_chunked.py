"""kltrain.divergence.lm_head against the plain path: full [N, V] logits, token_divergence and
autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kltrain.divergence.functions import get_divergence, token_divergence
from kltrain.divergence.lm_head import TokenChunk, fused_token_loss, token_stats

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


# loss_fn(chunk) and its plain twin loss(logprobs [N], d [N] or None), both over the same rows.
def pg_plus_kl(t, beta=0.3):
    m = t["mask"].float()

    def chunked(c: TokenChunk):
        i = c.index
        return (-(t["adv"][i] * c.logprobs) + beta * c.divergence).mul(m[i]).sum()

    def plain(lp, d):
        return ((-(t["adv"] * lp) + beta * d) * m).sum()

    return chunked, plain


def nonlinear(t):
    def chunked(c):
        return (c.divergence.square() + torch.sin(c.logprobs)).sum()

    def plain(lp, d):
        return (d.square() + torch.sin(lp)).sum()

    return chunked, plain


def divergence_only(t):
    return (lambda c: c.divergence.sum()), (lambda lp, d: d.sum())


def logprobs_only(t):
    return (lambda c: -(t["adv"][c.index] * c.logprobs).sum()), (
        lambda lp, d: -(t["adv"] * lp).sum()
    )


def plain_path(t, divergence, loss, bias=False):
    z = t["h"].float() @ t["w"].float().T + (t["b"].float() if bias else 0)
    lp = torch.log_softmax(z, -1).gather(1, t["tok"][:, None]).squeeze(1)
    d = None
    if divergence is not None:
        zq = t["rh"].float() @ t["rw"].float().T + (t["rb"].float() if bias else 0)
        d = token_divergence(z, zq, divergence)
    return loss(lp, d)


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
TOL = {"rtol": 1e-5, "atol": 1e-6}


def assert_close_scaled(got, want, rtol=1e-5):
    """Elementwise |got − want| ≤ rtol·(|want| + max|want|): fp32-level agreement at the tensor's
    scale (tiny gradient entries carry cancellation error in any fp32 implementation)."""
    assert got.shape == want.shape
    want = want.detach().double()
    torch.testing.assert_close(
        got.detach().double(), want, rtol=rtol, atol=rtol * want.abs().max().item()
    )


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
    chunked, _ = loss(t)
    got = fused(t, div, chunked, chunk_size, bias)
    g_got = torch.autograd.grad(got, params(t, bias))
    # Against the plain path in fp32 (same precision) and in float64 (the accurate answer).
    for ref in (t, as64(t)):
        want = plain_path(ref, div, loss(ref)[1], bias)
        g_want = torch.autograd.grad(want, params(ref, bias))
        assert_close_scaled(got, want)
        for a, b in zip(g_got, g_want):
            assert a.dtype == torch.float32
            assert_close_scaled(a, b)


def test_no_reference_and_divergence_needs_one():
    t = make(1)
    chunked, plain = logprobs_only(t)
    want = plain_path(t, None, plain)
    got = fused(t, None, chunked, 8, ref=False)
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(
        torch.autograd.grad(got, params(t, False)), torch.autograd.grad(want, params(t, False))
    ):
        torch.testing.assert_close(a, b, **TOL)
    with pytest.raises(ValueError, match="reference"):
        fused(t, "reverse_kl", chunked, 8, ref=False)


def test_frozen_weight_gets_no_gradient():
    t = make(2)
    t["w"].requires_grad_(False)
    chunked, plain = pg_plus_kl(t)
    want = torch.autograd.grad(plain_path(t, "reverse_kl", plain), t["h"])[0]
    out = fused(t, "reverse_kl", chunked, 10)
    out.backward()
    assert t["w"].grad is None
    torch.testing.assert_close(t["h"].grad, want, **TOL)


def test_backward_scales_by_the_incoming_gradient():
    t = make(3)
    chunked, _ = pg_plus_kl(t)
    g1 = torch.autograd.grad(fused(t, "js", chunked, 16), params(t, False))
    g3 = torch.autograd.grad(-3 * fused(t, "js", chunked, 16), params(t, False))
    for a, b in zip(g1, g3):
        torch.testing.assert_close(-3 * a, b, **TOL)


class MatmulFlops(TorchDispatchMode):
    """Counts 2·m·k·n for every aten mm/addmm call, whatever the overload (out=, in place)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = args[-2:] if name != "mm" else args[:2]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        elif name in ("bmm", "matmul", "baddbmm", "mv", "dot", "linear"):
            raise AssertionError(f"unexpected {name}")
        return func(*args, **(kwargs or {}))


def test_exactly_four_lm_head_matmuls():
    t = make(4)
    chunked, _ = pg_plus_kl(t)
    with MatmulFlops() as counter:
        fused(t, "reverse_kl", chunked, 10).backward()
    assert counter.flops == 4 * 2 * N * H * V
    # Without a reference: policy forward and its two backward products only.
    t = make(4)
    chunked, _ = logprobs_only(t)
    with MatmulFlops() as counter:
        fused(t, None, chunked, 10, ref=False).backward()
    assert counter.flops == 3 * 2 * N * H * V


def test_no_grad_and_constant_inputs_compute_value_only():
    t = make(5)
    chunked, plain = pg_plus_kl(t)
    want = plain_path(t, "reverse_kl", plain)
    with torch.no_grad():
        got = fused(t, "reverse_kl", chunked, 9)
    assert not got.requires_grad
    torch.testing.assert_close(got, want.detach(), **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_use_fp32_logits(dtype):
    """bf16/fp16 hidden and weights: logits are formed in fp32 from the given values, grads come
    back in the input dtype (accumulated in fp32)."""
    t = make(6, dtype=dtype)
    chunked, _ = pg_plus_kl(t)
    got = fused(t, "reverse_kl", chunked, 11)
    g_got = torch.autograd.grad(got, params(t, False))
    # Reference: the same values in float64 (logits never rounded to the half type).
    t64 = as64(t)
    want = plain_path(t64, "reverse_kl", pg_plus_kl(t64)[1])
    g_want = torch.autograd.grad(want, params(t64, False))
    assert got.dtype == torch.float32
    assert_close_scaled(got, want)
    for a, b in zip(g_got, g_want):
        assert a.dtype == dtype
        # Only the final cast to the half dtype rounds: half an ulp (2^-9 bf16, 2^-12 fp16).
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
    chunked, _ = pg_plus_kl(t)
    got = fused(t, "forward_kl", chunked, 16)
    g_got = torch.autograd.grad(got, params(t, False))
    t64 = as64(t)
    want = plain_path(t64, "forward_kl", pg_plus_kl(t64)[1])
    g_want = torch.autograd.grad(want, params(t64, False))
    assert_close_scaled(got, want)
    for a, b in zip(g_got, g_want):
        assert a.dtype == torch.bfloat16
        assert_close_scaled(a, b, rtol=2**-7)  # G is rounded to bf16 once, then fp32 accumulate


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
        torch.testing.assert_close(stats[k].double(), v, rtol=1e-5, atol=1e-6, msg=k)
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

    def fused_ops(device, acc, div):
        if acc != torch.float32 or chunked_cuda.kernel_id(div) is None:
            return None
        calls.append(div)
        return ops

    monkeypatch.setattr(chunked_mod, "_fused_ops", fused_ops)
    return calls


def fused_path_matches_plain(t, name, p, loss, chunk_size, bias, rtol=1e-5):
    div = None if name is None else get_divergence(name, **p)
    chunked, _ = loss(t)
    got = fused(t, div, chunked, chunk_size, bias, ref=div is not None)
    g_got = torch.autograd.grad(got, params(t, bias))
    t64 = as64(t)
    want = plain_path(t64, div, loss(t64)[1], bias)
    g_want = torch.autograd.grad(want, params(t64, bias))
    assert_close_scaled(got, want, rtol)
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
            fused_path_matches_plain(
                t, name, p, loss, 128, bias, 1e-4 if dtype == torch.float32 else 2**-7
            )
    finally:
        N, V = old
