"""kltrain.divergence.estimators by exact enumeration: unbiasedness, expected gradients, and
MATH.md's table of which gradient each (estimator, placement) pair follows, on a 2-token MDP."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from kltrain.divergence.estimators import (
    ESTIMATOR_NAMES,
    PLACEMENTS,
    GradientFollowed,
    describe_estimators,
    estimate,
    gradient_followed,
)
from kltrain.divergence.functions import get_divergence
from tests.conftest import fp64_tol
from tests.helpers.naive_f import NAIVE_F

DT = torch.float64
#: Exact enumerations in float64: sums over ≤ 9 outcomes (V² for the 2-token MDP, V = 3; 6 for
#: the single state), each term through ≤ 16 roundings (log_softmax, exp, the estimator, the
#: products and the autograd chain), terms up to 1e3 times the result (f(u)/u with u down to
#: e^-6 on these logits; gradients that cancel to ~1e-3): γ_25·1e3 ≈ 3e-12.
ENUM64 = fp64_tol(25, cond=1e3)
SAMPLED = [e for e in ESTIMATOR_NAMES if e != "exact"]

DIVS = [
    ("reverse_kl", {}),
    ("forward_kl", {}),
    ("js", {}),
    ("tv", {}),
    ("alpha", {"alpha": 0.5}),
    ("hellinger", {}),
    ("chi2", {}),
]
DIV_IDS = [n for n, _ in DIVS]


def exact_d(name: str, alpha: float | None, logp: torch.Tensor, logq: torch.Tensor):
    """Σ_v q f(p/q) over the last axis, straight from probabilities."""
    p, q = logp.exp(), logq.exp()
    return (q * NAIVE_F[name](p / q, alpha)).sum(-1)


def random_pair(seed: int, v: int = 5):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(v, generator=g, dtype=DT), -1)
    lq = torch.log_softmax(torch.randn(v, generator=g, dtype=DT), -1)
    return lp, lq


@pytest.mark.parametrize(("name", "params"), DIVS, ids=DIV_IDS)
def test_unbiased_by_enumeration(name, params):
    """E_{y~π}[f_plain] = E[f_cv] = D_f, E[k1] = E[k3] = KL(π‖π_ref); k2 is biased."""
    div = get_divergence(name, **params)
    lp, lq = random_pair(0)
    pi = lp.exp()
    d = exact_d(name, params.get("alpha"), lp, lq)
    kl = exact_d("reverse_kl", None, lp, lq)
    for est, want in (("f_plain", d), ("f_cv", d), ("k1", kl), ("k3", kl)):
        got = (pi * estimate(est, lp, lq, div)).sum()
        torch.testing.assert_close(got, want, rtol=ENUM64, atol=ENUM64, msg=est)
    assert abs((pi * estimate("k2", lp, lq, div)).sum() - kl) > 1e-3


@pytest.mark.parametrize(("name", "params"), DIVS, ids=DIV_IDS)
def test_cv_and_k3_never_negative(name, params):
    div = get_divergence(name, **params)
    rho = torch.linspace(-20, 20, 401, dtype=DT)
    assert (estimate("f_cv", rho, torch.zeros_like(rho), div) >= 0).all()
    assert (estimate("k3", rho, torch.zeros_like(rho), div) >= 0).all()


def test_reverse_kl_reduces_to_k1_k3():
    div = get_divergence("reverse_kl")
    rho = torch.linspace(-5, 5, 51, dtype=DT)
    zero = torch.zeros_like(rho)
    tol = fp64_tol(8, cond=6.0)  # a few float64 operations on |ρ| ≤ 5 (+1)
    plain, k1 = estimate("f_plain", rho, zero, div), estimate("k1", rho, zero, div)
    torch.testing.assert_close(plain, k1, rtol=tol, atol=tol)
    cv, k3 = estimate("f_cv", rho, zero, div), estimate("k3", rho, zero, div)
    torch.testing.assert_close(cv, k3, rtol=tol, atol=tol)


def test_formulas_at_a_point():
    rho = torch.tensor([0.7], dtype=DT)
    lq = torch.tensor([-1.2], dtype=DT)
    lp = lq + rho
    rev = get_divergence("reverse_kl")
    # float64, ≤ 8 operations; k3 = 0.497 − 1 + 0.7 cancels to 0.197 (condition ≤ 16)
    approx = functools.partial(pytest.approx, rel=fp64_tol(8, cond=16.0))
    assert estimate("k1", lp, lq, rev).item() == approx(0.7)
    assert estimate("k2", lp, lq, rev).item() == approx(0.245)
    assert estimate("k3", lp, lq, rev).item() == approx(math.exp(-0.7) - 1 + 0.7)
    u = math.exp(0.7)
    chi2, fwd = get_divergence("chi2"), get_divergence("forward_kl")
    assert estimate("f_plain", lp, lq, chi2).item() == approx((u - 1) ** 2 / u)
    assert estimate("f_cv", lp, lq, chi2).item() == approx((u - 1) ** 2 / u)  # f'(1) = 0
    assert estimate("f_plain", lp, lq, fwd).item() == approx(-math.log(u) / u)
    assert estimate("f_cv", lp, lq, fwd).item() == approx((-math.log(u) + (u - 1)) / u)


def test_extreme_ratios_give_inf_not_nan():
    rho = torch.tensor([-1000.0, 0.0, 1000.0])
    zero = torch.zeros_like(rho)
    for name, params in DIVS:
        div = get_divergence(name, **params)
        for est in SAMPLED:
            out = estimate(est, rho, zero, div)
            assert not torch.isnan(out).any(), (name, est)
    # e^1000 overflows fp32; the true values are +inf there.
    assert estimate("k3", rho, zero, get_divergence("tv"))[0] == math.inf
    assert estimate("f_cv", rho, zero, get_divergence("forward_kl"))[0] == math.inf
    assert estimate("f_cv", rho, zero, get_divergence("forward_kl"))[2] == 1.0  # (−ρ+u−1)/u → 1


def test_estimate_refuses_exact_and_unknown():
    div = get_divergence("reverse_kl")
    with pytest.raises(ValueError, match="full-vocabulary"):
        estimate("exact", torch.zeros(2), torch.zeros(2), div)
    with pytest.raises(ValueError, match="k3"):
        estimate("k4", torch.zeros(2), torch.zeros(2), div)


@pytest.mark.parametrize(
    ("est", "target"), [("k1", None), ("k2", "reverse_kl"), ("k3", "forward_kl")]
)
def test_expected_loss_gradient_single_state(est, target):
    """Σ_y π_y ∇g(ρ_y) (π held fixed) equals the local gradient of the named divergence."""
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(6, generator=g, dtype=DT, requires_grad=True)
    lq = torch.log_softmax(torch.randn(6, generator=g, dtype=DT), -1)
    div = get_divergence("reverse_kl")

    def lp():
        return torch.log_softmax(theta, -1)

    pi = lp().exp().detach()
    (got,) = torch.autograd.grad((pi * estimate(est, lp(), lq, div)).sum(), theta)
    if target is None:
        torch.testing.assert_close(got, torch.zeros_like(got), atol=ENUM64, rtol=0)
        return
    (want,) = torch.autograd.grad(exact_d(target, None, lp(), lq), theta)
    torch.testing.assert_close(got, want, rtol=ENUM64, atol=ENUM64)
    other = "reverse_kl" if target == "forward_kl" else "forward_kl"
    (wrong,) = torch.autograd.grad(exact_d(other, None, lp(), lq), theta)
    assert not torch.allclose(got, wrong, rtol=1e-3)


# ---- the 2-token MDP -----------------------------------------------------------------------
# Vocabulary V; step 1 from the prompt, step 2 conditioned on y1. Tabular policy logits θ (one
# leaf), fixed tabular reference. Every quantity below is an exact sum over the V² trajectories.

V = 3


class MDP:
    def __init__(self, seed: int = 7):
        g = torch.Generator().manual_seed(seed)
        self.theta = torch.randn(V + V * V, generator=g, dtype=DT).requires_grad_(True)
        self.lq1 = torch.log_softmax(torch.randn(V, generator=g, dtype=DT), -1)
        self.lq2 = torch.log_softmax(torch.randn(V, V, generator=g, dtype=DT), -1)

    def logp(self):
        return (
            torch.log_softmax(self.theta[:V], -1),
            torch.log_softmax(self.theta[V:].view(V, V), -1),
        )

    def grad(self, scalar) -> torch.Tensor:
        (g,) = torch.autograd.grad(scalar, self.theta)
        return g

    def parts(self, name: str, alpha: float | None) -> dict[str, torch.Tensor]:
        """∇J_D = local + future for J_D = d_1 + Σ_{y1} π(y1) d_2(y1)."""
        lp1, lp2 = self.logp()
        d1, d2 = exact_d(name, alpha, lp1, self.lq1), exact_d(name, alpha, lp2, self.lq2)
        pi1 = lp1.exp()
        full = self.grad(d1 + (pi1 * d2).sum())
        lp1, lp2 = self.logp()
        d1, d2 = exact_d(name, alpha, lp1, self.lq1), exact_d(name, alpha, lp2, self.lq2)
        local = self.grad(d1 + (lp1.exp().detach() * d2).sum())
        lp1, _ = self.logp()
        future = self.grad((lp1.exp() * d2.detach()).sum())
        torch.testing.assert_close(full, local + future, rtol=ENUM64, atol=ENUM64)
        return {"full": full, "local": local, "future": future}

    def surrogate_grad(self, est: str, placement: str, div, name: str, alpha) -> torch.Tensor:
        """Expected gradient of the surrogate an RL step would build, by enumeration."""
        lp1, lp2 = self.logp()
        prob = (lp1.exp().unsqueeze(1) * lp2.exp()).detach()  # P(y1, y2)
        if est == "exact":  # d_t is a function of the state: broadcast over the sampled token
            g1 = exact_d(name, alpha, lp1, self.lq1).expand(V).unsqueeze(1).expand(V, V)
            g2 = exact_d(name, alpha, lp2, self.lq2).unsqueeze(1).expand(V, V)
        else:
            g1 = estimate(est, lp1, self.lq1, div).unsqueeze(1).expand(V, V)
            g2 = estimate(est, lp2, self.lq2, div)
        total = torch.zeros((), dtype=DT)
        if placement in ("loss", "both"):  # gradient through the sampled-token term
            total = total + (prob * (g1 + g2)).sum()
        if placement in ("reward", "both"):  # reward-to-go penalties, score function
            go1, go2 = (g1 + g2).detach(), g2.detach()
            total = total + (prob * (go1 * lp1.unsqueeze(1) + go2 * lp2)).sum()
        return self.grad(total)


def _naive_spec(name: str, div_name: str, params: dict):
    """(name, alpha) of the divergence a GradientFollowed names, for the naive sums."""
    return name, (params.get("alpha") if name == div_name else None)


@pytest.mark.parametrize(("name", "params"), DIVS, ids=DIV_IDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("est", ESTIMATOR_NAMES)
def test_gradient_followed_by_enumeration(est, placement, name, params):
    mdp = MDP()
    div = get_divergence(name, **params)
    claim = gradient_followed(est, placement, div)
    got = mdp.surrogate_grad(est, placement, div, name, params.get("alpha"))
    tol = {"rtol": ENUM64, "atol": ENUM64}
    if claim.kind == "zero":
        torch.testing.assert_close(got, torch.zeros_like(got), **tol)
        return
    if claim.kind != "mismatch":
        want = mdp.parts(*_naive_spec(claim.divergence, name, params))[claim.kind]
        torch.testing.assert_close(got, want, **tol)
        return
    # A mismatch follows no part of any candidate's gradient, and is not zero either.
    assert got.abs().max() > 1e-6
    for cand in {"reverse_kl", "forward_kl", name}:
        for part, vec in mdp.parts(*_naive_spec(cand, name, params)).items():
            assert not torch.allclose(got, vec, rtol=1e-3, atol=1e-8), (cand, part)


def test_math_md_table():
    rev, fwd = get_divergence("reverse_kl"), get_divergence("forward_kl")
    for div in (rev, fwd, get_divergence("js")):
        n = div.name
        assert gradient_followed("exact", "both", div).key == f"full {n}"
        assert gradient_followed("exact", "loss", div).key == f"local {n}"
        assert gradient_followed("exact", "reward", div).key == f"future {n}"
        assert gradient_followed("k1", "reward", div).key == "full reverse_kl"
        assert gradient_followed("k2", "loss", div).key == "local reverse_kl"
        assert gradient_followed("k3", "loss", div).key == "local forward_kl"
        assert gradient_followed("k1", "loss", div).key == "zero"
        assert gradient_followed("k3", "reward", div).key == "mismatch"
    # f_plain / f_cv reduce to k1 / k3 under reverse KL, and are mismatches elsewhere ...
    for placement in PLACEMENTS:
        for a, b in (("f_plain", "k1"), ("f_cv", "k3")):
            assert (
                gradient_followed(a, placement, rev).key == gradient_followed(b, placement, rev).key
            )
    for name, params in DIVS[1:]:
        div = get_divergence(name, **params)
        for est in ("f_plain", "f_cv"):
            for placement in ("loss", "reward"):
                assert gradient_followed(est, placement, div).kind == "mismatch"
            # ... except with both placements: unbiased for D's value => full gradient of D.
            assert gradient_followed(est, "both", div).key == f"full {name}"
    explanation = gradient_followed("k3", "reward", rev).explanation
    assert "∇reverse_kl − ∇forward_kl" in explanation


def test_user_f_is_classified_like_its_builtin():
    div = get_divergence("tests_user_f_module:kl")
    assert gradient_followed("f_plain", "reward", div).key == "full tests_user_f_module:kl"
    assert gradient_followed("f_cv", "loss", div).key == "local forward_kl"
    assert gradient_followed("exact", "loss", div).is_gradient_of("tests_user_f_module:kl")


@pytest.fixture(autouse=True)
def _user_f_module(monkeypatch):
    """A user f importable as "tests_user_f_module:kl" (u log u, written independently)."""
    import sys
    import types

    mod = types.ModuleType("tests_user_f_module")
    mod.kl = lambda u: torch.special.xlogy(u, u)
    monkeypatch.setitem(sys.modules, "tests_user_f_module", mod)


def test_gradient_followed_key_and_is_gradient_of():
    gf = GradientFollowed("local", "forward_kl", "x")
    assert gf.key == "local forward_kl"
    assert gf.is_gradient_of("forward_kl") and not gf.is_gradient_of("reverse_kl")
    assert GradientFollowed("zero", None, "x").key == "zero"
    assert not GradientFollowed("mismatch", None, "x").is_gradient_of("reverse_kl")
    with pytest.raises(ValueError, match="placement"):
        gradient_followed("k1", "value", get_divergence("tv"))


def test_describe_estimators():
    assert [n for n, _ in describe_estimators()] == list(ESTIMATOR_NAMES)
