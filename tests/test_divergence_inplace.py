"""The chunk loop's in-place divergence path (``value_and_logit_grad_``: row blocks, and each
built-in's own fused formulas for D and ∂D/∂z) against the generic allocating form built from
``token_terms`` and ``weighted_score`` (the plain formulas the old path used), for every built-in
f and a user f, with blocks of a few rows so that the blocked loop, its last partial block and
the unblocked call all meet.

Tolerance: the fused formulas are rearrangements of the plain ones (shared exponentials, no
cancellation added), so the two differ by rounding: about ten roundings of ≤ 1 ulp feed each
output, and 64 ulp of the tensor's scale (2^-24 in fp32, 2^-53 in float64) bounds that with room
to spare, while a wrong term, sign, row or missing write differs at O(1) of the scale.
"""

from __future__ import annotations

import pytest
import torch

import kltrain.divergence.functions as functions
from kltrain.divergence.functions import DIVERGENCE_NAMES, Divergence, get_divergence
from kltrain.divergence.lm_head import token_stats

ULPS = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def user_kl(u):
    return torch.special.xlogy(u, u)


def divergences():
    out = [
        get_divergence(n, alpha=0.5) if n == "alpha" else get_divergence(n)
        for n in DIVERGENCE_NAMES
    ]
    out.append(get_divergence("alpha", alpha=1.5))
    out.append(get_divergence(f"{__name__}:user_kl"))
    return out


def log_probs(dtype, rows=11, vocab=37, seed=0):
    """Policy and reference log-probs [rows, vocab]: close rows, far-apart rows (|ρ| up to ~40,
    probabilities that underflow in fp32) and one identical pair (D = 0)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    zq = z + torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 0.2
    zq[3:6] = torch.randn(3, vocab, generator=g, dtype=torch.float64) * 15
    zq[7] = z[7]
    return torch.log_softmax(z, -1).to(dtype), torch.log_softmax(zq, -1).to(dtype)


def assert_close_at_scale(got, want, dtype):
    tol = 64 * ULPS[dtype] * want.abs().max().item()
    assert torch.isfinite(got).all() and torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=64 * ULPS[dtype], atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block_rows", [1, 3, 64])
@pytest.mark.parametrize("div", divergences(), ids=lambda d: d.name)
def test_in_place_path_matches_allocating_path(monkeypatch, div, block_rows, dtype):
    logp, logq = log_probs(dtype)
    monkeypatch.setattr(functions, "BLOCK_ELEMENTS", block_rows * logp.shape[-1])
    # The generic form from token_terms and weighted_score (the plain formulas), not the
    # divergence's own fused value_and_logit_grad, which the in-place path runs per block.
    want_d, want_grad = Divergence.value_and_logit_grad(div, logp, logq, logp.exp())
    lp, lq, scratch = logp.clone(), logq.clone(), torch.full_like(logp, float("nan"))
    d, grad, p = div.value_and_logit_grad_(lp, lq, scratch)
    assert d.shape == want_d.shape and grad.shape == want_grad.shape
    assert grad.data_ptr() != p.data_ptr()  # the chunk loop combines the two
    assert_close_at_scale(d, want_d, dtype)
    assert_close_at_scale(grad, want_grad, dtype)
    assert_close_at_scale(p, logp.exp(), dtype)
    assert d[7].abs().item() <= 64 * ULPS[dtype]  # identical rows: D = 0


def test_token_stats_rows_capped_by_block_size(monkeypatch):
    """token_stats caps its chunk at BLOCK_ELEMENTS / V rows; a cap of 2 rows (many partial
    chunks) gives the uncapped statistics (same per-row formulas; 64-ulp tolerance as above)."""
    g = torch.Generator().manual_seed(3)
    n, h, v = 9, 8, 37
    hid, rhid = torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)
    w, rw = torch.randn(v, h, generator=g), torch.randn(v, h, generator=g)
    tok = torch.randint(0, v, (n,), generator=g)
    divs = [get_divergence("reverse_kl"), get_divergence("js"), get_divergence("chi2")]

    def stats():
        return token_stats(hid, w, tok, ref_hidden=rhid, ref_weight=rw, divergences=divs)

    want = stats()
    monkeypatch.setattr(functions, "BLOCK_ELEMENTS", 2 * v)
    got = stats()
    assert got.keys() == want.keys()
    for key in want:
        assert_close_at_scale(got[key], want[key], torch.float32)
