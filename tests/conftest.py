"""Shared fixtures and tolerance helpers: the one home of the tiny model, the run-folder readers
and every floating-point tolerance the tests derive.

Tolerances are derived from the computation, never fitted to what one machine printed (BLAS
kernels differ between CPUs: AVX2 vs AVX-512, MKL vs OpenBLAS, and between CPU and GPU):

- ``U32 = 2^-24`` is fp32's unit roundoff (half an ulp at 1), ``U64 = 2^-53`` float64's.
- A sum or dot product of n terms evaluated in floating point satisfies
  ``|fl(Σx) − Σx| ≤ γ_{n−1}·Σ|x|`` with ``γ_n = n·u / (1 − n·u)`` (Higham, "Accuracy and
  Stability of Numerical Algorithms", 2nd ed., §3.1 and §4.2), whatever the order of the sum.
  Relative to the result that is ``γ_{n−1}·κ`` with the condition number ``κ = Σ|x| / |Σx|``.
- Two evaluations of the same sum in different orders (micro-batching, another SIMD width, another
  number of processes) each lie within that bound of the exact sum, so they differ by at most
  twice it: :func:`reduction_order_tol`.
- Invariance tests whose point is exactness (micro-batching, accumulation, world size) compare in
  float64, where the same bound is 2^29 times smaller, or against this bound; never against an
  atol of one fp32 ulp. Resuming on the same machine runs the same kernels: that stays bit-exact
  (``torch.equal``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

# The compiled CPU lm_head ops (kltrain/divergence/kernels/cpu.py) compile once per process and
# divergence: seconds each, in every process a test launches. The suite runs the torch ops;
# the tests that check the compiled ones turn them on (KLTRAIN_FUSED_CPU=1 runs them everywhere).
os.environ.setdefault("KLTRAIN_FUSED_CPU", "0")

U32 = 2.0**-24  # fp32 unit roundoff
U64 = 2.0**-53  # float64 unit roundoff


def gamma(n: int, u: float = U32) -> float:
    """``γ_n = n·u / (1 − n·u)``: the relative error bound of n successive roundings."""
    n = max(int(n), 1)
    assert n * u < 1, f"γ_{n} is undefined for u={u}: n·u ≥ 1"
    return n * u / (1 - n * u)


def fp32_tol(n_terms: int, cond: float = 1.0, u: float = U32) -> float:
    """Relative error bound ``γ_n·κ`` of a computation that accumulates ``n_terms`` roundings
    (a sum or dot product of n_terms terms, or a chain of that many operations) whose result
    has condition number ``cond`` = Σ|terms| / |result| (1 for terms of one sign). Used as an
    ``rtol``; as an ``atol`` pass ``cond`` = the scale Σ|terms| of the quantity compared."""
    return cond * gamma(n_terms, u)


def fp32_tol_probabilistic(n_terms: int, cond: float = 1.0, lam: float = 6.0) -> float:
    """The probabilistic counterpart of :func:`fp32_tol` for long sums: with roundings modelled
    as independent, mean-zero errors, ``|fl(Σx) − Σx| ≤ λ·√n·u·Σ|x|`` except with probability
    ≤ ``2·n·exp(−λ²/2)`` (Higham & Mary, SIAM J. Sci. Comput. 2019, Thm 3.1); λ = 6 puts that
    below 3e-8·n. For n in the tens of thousands, where ``γ_n`` is uselessly loose."""
    return cond * lam * math.sqrt(max(int(n_terms), 1)) * U32


def reduction_order_tol(n_terms: int, abs_sum: float, u: float = U32) -> float:
    """Absolute bound on the difference of two evaluations of one sum of ``n_terms`` terms in
    different orders: each is within ``γ_{n−1}·Σ|x|`` of the exact sum, so ``2·γ_{n−1}·Σ|x|``."""
    return 2 * gamma(max(n_terms - 1, 1), u) * abs_sum


def step_one_divergence_tol(tokens: int, depth: int, width: int, logit_scale: float) -> float:
    """Bound on a divergence per sequence between a policy and a reference with identical
    weights (step 1), which differ only by roundoff of their two fp32 forward passes.

    Each logit is a chain of ``depth`` layers, each accumulating ``width`` products (hidden +
    MLP width). The probabilistic rounding model (Higham & Mary 2019: an error of
    ``√n·u`` rather than ``n·u``, with overwhelming probability) puts each pass's logit error
    at ``√(depth·width)·u·logit_scale``, so two passes differ by ``ε_z`` = twice that.
    ``log_softmax`` is 2-Lipschitz in the max norm, so ``|ℓ − ℓ_ref| ≤ 2ε_z`` per token, and
    every divergence's first-order term (``Σ_v π (ℓ − ℓ_ref)`` and the like) is at most that;
    summed over ``tokens`` completion tokens per sequence."""
    eps_z = 2 * math.sqrt(depth * width) * U32 * logit_scale
    return tokens * 2 * eps_z


# The tiny test model (tests/helpers/tiny.py): 2 layers, hidden 32, MLP 64; its random-init
# logits are far below 1 in magnitude, so 1 bounds their scale.
TINY_DEPTH, TINY_WIDTH, TINY_LOGIT_SCALE = 2, 32 + 64, 1.0
#: The tiny loop config's completion length (generation.max_new_tokens in tests/helpers/tiny.py).
TINY_NEW_TOKENS = 6
#: A divergence per sequence at step 1 of the tiny loop config, when the policy is the reference.
TINY_STEP_ONE_TOL = step_one_divergence_tol(
    TINY_NEW_TOKENS, TINY_DEPTH, TINY_WIDTH, TINY_LOGIT_SCALE
)
# smollm2-135m: 30 layers, hidden 576, MLP 1536; its logits stay within ±30.
SMOLLM2_DEPTH, SMOLLM2_WIDTH, SMOLLM2_LOGIT_SCALE = 30, 576 + 1536, 30.0


def smollm2_step_one_tol(new_tokens: int) -> float:
    """:func:`step_one_divergence_tol` for the embedded smollm2-135m and ``new_tokens``
    completion tokens per sequence; it also bounds ``|log π_ref(y) − log π(y)|`` per sequence at
    step 1 (the same per-token bound, summed)."""
    return step_one_divergence_tol(new_tokens, SMOLLM2_DEPTH, SMOLLM2_WIDTH, SMOLLM2_LOGIT_SCALE)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random Llama + BPE tokenizer folder (tests/helpers/tiny.py), built once."""
    from tests.helpers.tiny import make_tiny_model_dir

    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model"))


def read_jsonl(path: Path) -> list[dict]:
    """One dict per line of a JSON-lines file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def read_metrics(run: Path) -> list[dict]:
    """A run folder's ``metrics.jsonl``, one dict per logged step."""
    return read_jsonl(Path(run) / "metrics.jsonl")


def fp64_tol(n_terms: int, cond: float = 1.0) -> float:
    """:func:`fp32_tol` in float64 (``u = 2^-53``)."""
    return fp32_tol(n_terms, cond, U64)


def assert_close_to_scale(got, want, rtol: float, msg: str = "") -> None:
    """Elementwise ``|got − want| ≤ rtol·(|want| + max|want|)``, compared in float64.

    The error bounds above bound an entry's error by its terms' absolute sum, not by the entry:
    an entry that is a small difference of large terms (a gradient entry near 0) carries an
    absolute error at the scale of the tensor. ``max|want|`` stands for that scale, so ``rtol``
    is a bound such as ``fp32_tol(n, cond)`` with ``cond`` the ratio of the terms' absolute sum
    to the tensor's largest entry (stated where it is used)."""
    import torch

    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{msg}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale, msg=msg or None)
