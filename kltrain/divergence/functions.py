"""f-divergences D_f(P‖Q) = Σ_v Q(v)·f(P(v)/Q(v)), policy P = π, reference Q = π_ref.

Pure tensor math: no model, config or I/O. Conventions (docs/MATH.md):

- ``logp`` = ℓ = log π, ``logq`` = ℓ_ref = log π_ref, log-ratio ρ = ℓ − ℓ_ref, ratio u = e^ρ.
- Shapes: logits and log-probs are ``[..., vocab]`` (e.g. ``[batch, seq, vocab]`` or ``[N, V]``);
  per-token divergences are ``[...]``.
- Everything is computed in log space; probabilities are never divided.

Each built-in defines ``f`` and ``f_prime`` (for estimators, classification and user code) and a
numerically stable ``token_terms`` (the elementwise Q·f(P/Q) summed over the vocabulary) and
``weighted_score`` (the elementwise P·f'(P/Q) the closed-form logit gradient needs). The base
class holds the shared logic, so a user ``f`` gets all of it from ``f`` (and ``f_prime``) alone.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

DIVERGENCE_NAMES: tuple[str, ...] = (
    "reverse_kl",
    "forward_kl",
    "js",
    "tv",
    "alpha",
    "hellinger",
    "chi2",
)

_LOG2 = math.log(2.0)
#: Elements per block in the generic in-place chunk path (16 MiB of fp32): under glibc's largest
#: mmap threshold (32 MiB), so the formulas' temporaries are reused from the heap instead of fresh,
#: page-faulted mappings, yet few enough blocks that the per-op OpenMP start-up stays small
#: (measured on 2 CPU cores: 1 MiB blocks were slower than 16 MiB ones when the cores are shared).
BLOCK_ELEMENTS = 1 << 22


class Divergence:
    """An f-divergence D_f(π‖π_ref) = Σ_v π_ref(v)·f(π(v)/π_ref(v)), f convex with f(1) = 0.

    Subclasses define ``f`` (and ideally ``f_prime``); the generic log-space forms below work for
    any f, and built-ins override them with forms that neither overflow nor produce NaN where the
    true value is finite.
    """

    name: str = ""
    params: dict = {}  # noqa: RUF012 - replaced per instance; class default is never mutated
    description: str = ""

    def f(self, u: Tensor) -> Tensor:
        """f(u), elementwise; every divergence defines it."""
        raise TypeError(f"{type(self).__name__} defines no f(u)")

    def f_prime(self, u: Tensor) -> Tensor:
        """f'(u) by autograd (used when a divergence gives no closed form)."""
        with torch.enable_grad():
            x = u.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.f(x).sum(), x)
        return g

    def token_terms(self, logp: Tensor, logq: Tensor) -> Tensor:
        """Elementwise π_ref·f(π/π_ref) from log-probs, ``[..., V] -> [..., V]``.

        Generic form exp(ℓ_ref)·f(exp(ℓ − ℓ_ref)); summing over V gives the per-token divergence.
        """
        return logq.exp() * self.f((logp - logq).exp())

    def weighted_score(self, logp: Tensor, logq: Tensor) -> Tensor:
        """Elementwise π·f'(π/π_ref), ``[..., V] -> [..., V]``.

        With s_v = f'(u_v) the logit gradient is ∂D/∂z_v = π_v·s_v − π_v·Σ_w π_w s_w, so this is
        the only divergence-specific quantity the closed-form gradient needs.
        """
        return logp.exp() * self.f_prime((logp - logq).exp())

    def terms_and_score(self, logp: Tensor, logq: Tensor) -> tuple[Tensor, Tensor]:
        """(:meth:`token_terms`, :meth:`weighted_score`) together, ``[..., V]`` each; a
        divergence overrides it where the two share costly elementwise work."""
        return self.token_terms(logp, logq), self.weighted_score(logp, logq)

    def f_prime_at_one(self) -> float:
        """f'(1) (a subgradient where f has a kink there, e.g. 0 for tv)."""
        return float(self.f_prime(torch.ones((), dtype=torch.float64)))

    def cv_terms(self, logp: Tensor, logq: Tensor) -> Tensor:
        """Elementwise π_ref·f̃(π/π_ref), f̃(u) = f(u) − f'(1)(u − 1): the control-variate form.

        Sums to the same D (Σ π = Σ π_ref = 1) but each term is ≥ 0 for convex f. Generic form
        token_terms − f'(1)(π − π_ref); built-ins with f'(1) ≠ 0 override it so that no inf − inf
        occurs where the true term overflows.
        """
        c = self.f_prime_at_one()
        terms = self.token_terms(logp, logq)
        return terms if c == 0 else terms - c * (logp.exp() - logq.exp())

    def f_over_u(self, rho: Tensor) -> Tensor:
        """f(u)/u at u = e^ρ (the f_plain estimator), ``[...] -> [...]``.

        Evaluated as π_ref·f(π/π_ref) at π = 1, π_ref = e^(−ρ) (degree-1 homogeneity), so it reuses
        the stable ``token_terms``.
        """
        return self.token_terms(torch.zeros_like(rho), -rho)

    def cv_over_u(self, rho: Tensor) -> Tensor:
        """(f(u) − f'(1)(u − 1))/u at u = e^ρ (the f_cv estimator), from ``cv_terms`` likewise."""
        if self.f_prime_at_one() == 0:
            return self.f_over_u(rho)
        return self.cv_terms(torch.zeros_like(rho), -rho)

    def f_at_zero(self) -> float:
        """f(0): the term π_ref·f(0) of a token the policy gives probability 0."""
        return float(self.f(torch.zeros((), dtype=torch.float64)))

    def f_prime_at_infinity(self) -> float:
        """f'(∞) = lim f(u)/u: the term π·f'(∞) of a token the reference gives probability 0.

        Generic estimate from f' at u = 1e100 and 1e200 (still growing -> inf); built-ins are exact.
        """
        lo, hi = self.f_prime(torch.tensor([1e100, 1e200], dtype=torch.float64)).tolist()
        return math.inf if abs(hi - lo) > 1e-6 * (1 + abs(hi)) else hi

    def token_terms_with_support(self, logp: Tensor, logq: Tensor) -> Tensor:
        """``token_terms`` that also takes log-probs of −inf (tokens outside a model's support).

        π = 0 gives π_ref·f(0), π_ref = 0 gives π·f'(∞) (inf for reverse KL: MATH.md), both 0 give
        0. Inputs are made finite before the formula so no 0·inf NaN reaches value or gradient.
        """
        p0, q0 = torch.isneginf(logp), torch.isneginf(logq)
        if not (p0.any() or q0.any()):
            return self.token_terms(logp, logq)
        bad = p0 | q0
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        terms = self.token_terms(torch.where(bad, zero, logp), torch.where(bad, zero, logq))
        terms = torch.where(bad, zero, terms)
        only_p0, only_q0 = p0 & ~q0, q0 & ~p0
        terms = torch.where(
            only_p0, torch.where(only_p0, logq, zero).exp() * self.f_at_zero(), terms
        )
        finf = self.f_prime_at_infinity()
        return torch.where(only_q0, torch.where(only_q0, logp, zero).exp() * finf, terms)

    def value_and_logit_grad(self, logp: Tensor, logq: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token D ``[...]`` and its gradient w.r.t. the policy logits ``[..., V]``.

        ∂D/∂z_v = π(v)·(s_v − Σ_w π(w) s_w), s = f'(π/π_ref) (MATH.md). ``p`` = exp(logp), passed in
        because the caller (the chunked lm_head path) already has it.
        """
        d = self.token_terms(logp, logq).sum(-1)
        ps = self.weighted_score(logp, logq)
        return d, ps - p * ps.sum(-1, keepdim=True)

    def value_and_logit_grad_(
        self, logp: Tensor, logq: Tensor, scratch: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """In-place variant for the chunk loop: returns (D ``[...]``, ∂D/∂z, π), both ``[..., V]``.

        May overwrite ``logp``, ``logq`` and ``scratch`` (same shape) and return views of them, so
        the KLs need no fresh [c, V] allocation (on CPU each one costs page faults comparable to
        the arithmetic).

        The generic version runs :meth:`value_and_logit_grad` on blocks of rows small enough
        (``BLOCK_ELEMENTS``) that its temporaries come from the allocator's free lists; it
        writes ∂D/∂z into ``scratch`` and π over ``logp``. Rows are independent and the formulas
        the same, so the values are the unblocked call's (up to the last-ulp
        differences between torch's vectorised and scalar loops for exp and log).
        """
        vocab = logp.shape[-1]
        lp, lq, grad = (t.view(-1, vocab) for t in (logp, logq, scratch))
        d = torch.empty(lp.shape[0], dtype=logp.dtype, device=logp.device)
        step = max(1, BLOCK_ELEMENTS // vocab)
        for start in range(0, lp.shape[0], step):
            rows = slice(start, start + step)
            p = lp[rows].exp()
            d[rows], grad[rows] = self.value_and_logit_grad(lp[rows], lq[rows], p)
            lp[rows] = p
        return d.view(logp.shape[:-1]), scratch, logp

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"get_divergence({self.name!r}{extra})"


class ReverseKL(Divergence):
    """KL(π‖π_ref) = Σ π(ℓ − ℓ_ref); f(u) = u log u. Mode-seeking; the RLHF default."""

    name = "reverse_kl"
    description = "KL(π‖π_ref) = Σ π(ℓ−ℓ_ref), f(u)=u·log u; mode-seeking, the RLHF default"

    def f_prime_at_infinity(self):
        return math.inf

    def f(self, u):
        return torch.special.xlogy(u, u)

    def f_prime(self, u):
        return torch.log(u) + 1

    def token_terms(self, logp, logq):
        return logp.exp() * (logp - logq)

    def weighted_score(self, logp, logq):
        return logp.exp() * (logp - logq + 1)

    def cv_terms(self, logp, logq):
        # π ρ − π + π_ref (u log u − u + 1); at π = 1 this is k3.
        return logp.exp() * (logp - logq - 1) + logq.exp()

    def value_and_logit_grad(self, logp, logq, p):
        # Σ π(ρ+1) = D + 1, so ∂D/∂z = π(ρ + 1 − D − 1) = π(ρ − D): one [.., V] temporary.
        rho = logp - logq
        d = (p * rho).sum(-1)
        return d, rho.sub_(d.unsqueeze(-1)).mul_(p)

    def value_and_logit_grad_(self, logp, logq, scratch):
        rho = torch.sub(logp, logq, out=logq)
        p = logp.exp_()
        d = torch.mul(p, rho, out=scratch).sum(-1)
        return d, rho.sub_(d.unsqueeze(-1)).mul_(p), p


class ForwardKL(Divergence):
    """KL(π_ref‖π) = Σ π_ref(ℓ_ref − ℓ); f(u) = −log u. Mass-covering; GDC/DPG."""

    name = "forward_kl"
    description = "KL(π_ref‖π) = Σ π_ref(ℓ_ref−ℓ), f(u)=−log u; mass-covering (GDC/DPG)"

    def f_prime_at_infinity(self):
        return 0.0

    def f(self, u):
        return -torch.log(u)

    def f_prime(self, u):
        return -1 / u

    def token_terms(self, logp, logq):
        return logq.exp() * (logq - logp)

    def weighted_score(self, logp, logq):
        # π·(−π_ref/π) = −π_ref: no division, so no 0·inf where π underflows.
        return -logq.exp()

    def cv_terms(self, logp, logq):
        # π_ref(−ρ) + π − π_ref, grouped so that an overflowing π_ref gives inf, not inf − inf.
        return logq.exp() * (logq - logp - 1) + logp.exp()

    def value_and_logit_grad(self, logp, logq, p):
        q = logq.exp()
        d = (q * (logq - logp)).sum(-1)
        # Σ_w π·s = −Σ π_ref = −1 exactly, so ∂D/∂z = −π_ref + π.
        return d, p - q

    def value_and_logit_grad_(self, logp, logq, scratch):
        diff = torch.sub(logq, logp, out=scratch)
        q = logq.exp_()
        d = diff.mul_(q).sum(-1)
        p = logp.exp_()
        return d, torch.sub(p, q, out=scratch), p


class JensenShannon(Divergence):
    """JS = ½KL(π‖m) + ½KL(π_ref‖m), m = (π+π_ref)/2; f(u) = ½[u log u − (u+1) log((u+1)/2)]."""

    name = "js"
    description = "½KL(π‖m)+½KL(π_ref‖m), m=(π+π_ref)/2; symmetric, bounded by log 2"

    def f_prime_at_infinity(self):
        return 0.5 * _LOG2

    def f(self, u):
        return 0.5 * (torch.special.xlogy(u, u) - (u + 1) * torch.log((u + 1) / 2))

    def f_prime(self, u):
        return 0.5 * torch.log(2 * u / (u + 1))

    def token_terms(self, logp, logq):
        logm = torch.logaddexp(logp, logq) - _LOG2
        return 0.5 * (logp.exp() * (logp - logm) + logq.exp() * (logq - logm))

    def weighted_score(self, logp, logq):
        # ½ log(2u/(u+1)) = ½(log 2 − softplus(−ρ)): finite for every finite ρ.
        return 0.5 * logp.exp() * (_LOG2 - F.softplus(logq - logp))

    def terms_and_score(self, logp, logq):
        # As value_and_logit_grad below: one exp and one log1p serve both (the compiled CPU
        # lm_head ops fuse this; token_terms and weighted_score apart would take two of each).
        a, b = _js_log_ratios_(logp - logq)
        score = 0.5 * logp.exp() * a  # ½ π (ℓ − log m)
        return score + 0.5 * logq.exp() * b, score

    def value_and_logit_grad(self, logp, logq, p):
        # D and π·f'(u) = ½π(ℓ − log m) share one exp and one log1p (_js_log_ratios_).
        a, b = _js_log_ratios_(logp - logq)
        ps = a.mul_(p).mul_(0.5)  # ½ π (ℓ − log m)
        d = ps + b.mul_(logq.exp()).mul_(0.5)
        d = d.sum(-1)
        return d, ps.addcmul_(p, ps.sum(-1, keepdim=True), value=-1.0)


def _js_log_ratios_(rho: Tensor) -> tuple[Tensor, Tensor]:
    """ρ = ℓ − ℓ_ref ``[..., V]`` → (ℓ − log m, ℓ_ref − log m), m = (π + π_ref)/2, from one exp
    and one log1p: with t = log 2 − log1p(e^(−|ρ|)), ℓ − log m = t + min(ρ, 0) and
    ℓ_ref − log m = t − max(ρ, 0), finite for every finite ρ. Overwrites ``rho`` (pass a
    temporary): two ``[..., V]`` results and no third buffer."""
    t = torch.log1p(torch.exp(-rho.abs())).neg_().add_(_LOG2)
    a = rho.clamp(max=0).add_(t)
    return a, t.sub_(rho.clamp_(min=0))


class TotalVariation(Divergence):
    """TV = ½ Σ abs(π − π_ref); f(u) = ½ abs(u − 1). Subgradient f'(1) = 0 (torch's sign(0))."""

    name = "tv"
    description = "½Σ|π−π_ref|, f(u)=½|u−1|; bounded by 1"

    def f_prime_at_infinity(self):
        return 0.5

    def f(self, u):
        return 0.5 * (u - 1).abs()

    def f_prime(self, u):
        return 0.5 * torch.sign(u - 1)

    def token_terms(self, logp, logq):
        return 0.5 * (logp.exp() - logq.exp()).abs()

    def weighted_score(self, logp, logq):
        return 0.5 * logp.exp() * torch.sign(logp - logq)

    def value_and_logit_grad(self, logp, logq, p):
        # One exp (π_ref); ½|π − π_ref| = ½(π − π_ref)·sign(ρ), exp being monotone.
        sign = torch.sign(logp - logq)
        d = (p - logq.exp()).mul_(sign).sum(-1).mul_(0.5)
        ps = sign.mul_(p).mul_(0.5)
        return d, ps.addcmul_(p, ps.sum(-1, keepdim=True), value=-1.0)


class Alpha(Divergence):
    """Amari α-divergence, f(u) = (u^α − αu − (1−α)) / (α(α−1)), α ∉ {0, 1}.

    α→1 gives reverse KL, α→0 forward KL. π_ref·u^α = exp(αℓ + (1−α)ℓ_ref) is computed as one
    exponential, so the term is inf (not NaN) exactly when the true value overflows (α > 1 or α < 0
    with disjoint supports).
    """

    name = "alpha"

    def __init__(self, alpha: float):
        alpha = float(alpha)
        if alpha in (0.0, 1.0) or not math.isfinite(alpha):
            raise ValueError(
                f"alpha divergence needs a finite alpha not in {{0, 1}} (got {alpha}); its limits "
                "are divergences of their own: use 'reverse_kl' for alpha→1 and 'forward_kl' for "
                "alpha→0."
            )
        self.alpha = alpha
        self.params = {"alpha": alpha}
        self.description = f"Amari α-divergence with α={alpha}"

    def f_prime_at_infinity(self):
        return math.inf if self.alpha > 1 else 1 / (1 - self.alpha)

    def f(self, u):
        a = self.alpha
        return (u.pow(a) - a * u - (1 - a)) / (a * (a - 1))

    def f_prime(self, u):
        a = self.alpha
        return (u.pow(a - 1) - 1) / (a - 1)

    def token_terms(self, logp, logq):
        a = self.alpha
        mixed = torch.exp(a * logp + (1 - a) * logq)
        return (mixed - a * logp.exp() - (1 - a) * logq.exp()) / (a * (a - 1))

    def f_over_u(self, rho):
        # The shared form would compute π_ref·(...) − (1−α)π_ref with π_ref = e^(−ρ) = inf at
        # ρ ≪ 0 (inf − inf). Instead: u ≤ 1 -> e^(−ρ)·f(u) with f(u) finite (or inf for α < 0);
        # u ≥ 1 -> (u^(α−1) − α − (1−α)/u)/(α(α−1)). Each branch sees only its own half of ρ.
        a = self.alpha
        lo, hi = rho.clamp(max=0), rho.clamp(min=0)
        below = torch.exp(-lo) * self.f(lo.exp())
        above = (torch.exp((a - 1) * hi) - a - (1 - a) * torch.exp(-hi)) / (a * (a - 1))
        return torch.where(rho < 0, below, above)

    def weighted_score(self, logp, logq):
        # π·(u^(α−1) − 1)/(α−1) = (exp(αℓ + (1−α)ℓ_ref) − π)/(α−1).
        a = self.alpha
        return (torch.exp(a * logp + (1 - a) * logq) - logp.exp()) / (a - 1)

    def value_and_logit_grad(self, logp, logq, p):
        # exp(αℓ + (1−α)ℓ_ref) once for both D and π·f'(u); π is given.
        a = self.alpha
        mixed = torch.exp(a * logp + (1 - a) * logq)
        d = (mixed - a * p - (1 - a) * logq.exp()).sum(-1) / (a * (a - 1))
        ps = mixed.sub_(p).div_(a - 1)
        return d, ps.addcmul_(p, ps.sum(-1, keepdim=True), value=-1.0)


class Hellinger(Divergence):
    """Squared Hellinger Σ(√π − √π_ref)²; f(u) = (√u − 1)². Symmetric, bounded by 2."""

    name = "hellinger"
    description = "squared Hellinger Σ(√π−√π_ref)², f(u)=(√u−1)²; symmetric, bounded by 2"

    def f_prime_at_infinity(self):
        return 1.0

    def f(self, u):
        return (u.sqrt() - 1) ** 2

    def f_prime(self, u):
        return 1 - u.rsqrt()

    def token_terms(self, logp, logq):
        return ((0.5 * logp).exp() - (0.5 * logq).exp()) ** 2

    def weighted_score(self, logp, logq):
        return logp.exp() - (0.5 * (logp + logq)).exp()

    def value_and_logit_grad(self, logp, logq, p):
        # √π and √π_ref once: D = Σ(√π − √π_ref)², π·f'(u) = π − √π·√π_ref.
        sp, sq = (0.5 * logp).exp_(), (0.5 * logq).exp_()
        d = (sp - sq).square_().sum(-1)
        ps = sp.mul_(sq).neg_().add_(p)
        return d, ps.addcmul_(p, ps.sum(-1, keepdim=True), value=-1.0)


class ChiSquared(Divergence):
    """Pearson χ² = Σ (π − π_ref)²/π_ref; f(u) = (u − 1)².

    Computed as (π/√π_ref − √π_ref)², so a term is inf (not NaN) where π ≫ π_ref overflows.
    """

    name = "chi2"
    description = "Pearson χ² Σ(π−π_ref)²/π_ref, f(u)=(u−1)²; heavy penalty where π ≫ π_ref"

    def f_prime_at_infinity(self):
        return math.inf

    def f(self, u):
        return (u - 1) ** 2

    def f_prime(self, u):
        return 2 * (u - 1)

    def token_terms(self, logp, logq):
        return ((logp - 0.5 * logq).exp() - (0.5 * logq).exp()) ** 2

    def weighted_score(self, logp, logq):
        # 2π(u − 1) = 2(exp(2ℓ − ℓ_ref) − π)
        return 2 * ((2 * logp - logq).exp() - logp.exp())

    def value_and_logit_grad(self, logp, logq, p):
        # r = π/√π_ref, s = √π_ref: D = Σ(r − s)², π·f'(u) = 2(r² − π); two exps in all.
        s = (0.5 * logq).exp_()
        r = (logp - 0.5 * logq).exp_()
        d = (r - s).square_().sum(-1)
        ps = r.square_().sub_(p).mul_(2.0)
        return d, ps.addcmul_(p, ps.sum(-1, keepdim=True), value=-1.0)


class UserDivergence(Divergence):
    """A user f given by import path "pkg.mod:f" (and optionally f' as "pkg.mod:fp").

    Checked on construction: f(1) = 0, f convex on a grid, and f_prime (if given) matching a finite
    difference of f — a wrong f' would silently give the wrong gradient.
    """

    def __init__(self, path: str, f_prime: str | None = None):
        self.name = path
        self.params = {} if f_prime is None else {"f_prime": f_prime}
        self._f = _import_callable(path)
        self._fp = None if f_prime is None else _import_callable(f_prime)
        self.description = f"user f-divergence {path}" + (f" with f'={f_prime}" if f_prime else "")
        _check_user_f(self)

    def f(self, u):
        return self._f(u)

    def f_prime(self, u):
        return super().f_prime(u) if self._fp is None else self._fp(u)


def _import_callable(path: str) -> Callable:
    mod_name, _, attr = path.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"expected an import path 'pkg.module:function', got {path!r}")
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except Exception as e:  # the user's module may fail with anything while it imports
        raise ValueError(f"cannot import {path!r}: {type(e).__name__}: {e}") from e
    if not callable(obj):
        raise ValueError(f"{path!r} is not callable")
    return obj


def _check_user_f(div: Divergence) -> None:
    try:
        _check_user_f_values(div)
    except ValueError:
        raise
    except Exception as e:  # a user f that raises on a tensor: say whose f and why
        raise ValueError(
            f"{div.name}: calling f (or f_prime) on a float64 tensor of ratios u raised "
            f"{type(e).__name__}: {e}; f must map a tensor u > 0 to a tensor of f(u)"
        ) from e


def _check_user_f_values(div: Divergence) -> None:
    u = torch.logspace(-3, 3, 61, dtype=torch.float64)
    fu = div.f(u)
    f1 = float(div.f(torch.ones(1, dtype=torch.float64)))
    if not math.isclose(f1, 0.0, abs_tol=1e-8):
        raise ValueError(f"{div.name}: an f-divergence needs f(1) = 0, got f(1) = {f1}")
    # Convexity on a log grid: slopes between neighbours must not decrease.
    slopes = torch.diff(fu) / torch.diff(u)
    if (torch.diff(slopes) < -1e-8 * (1 + slopes.abs()[1:])).any():
        raise ValueError(f"{div.name}: f is not convex on [1e-3, 1e3]")
    h = 1e-6 * u
    numeric = (div.f(u + h) - div.f(u - h)) / (2 * h)
    if not torch.allclose(div.f_prime(u), numeric, rtol=1e-4, atol=1e-6):
        raise ValueError(f"{div.name}: f_prime does not match the derivative of f")


_BUILTINS: dict[str, type[Divergence]] = {
    cls.name: cls
    for cls in (ReverseKL, ForwardKL, JensenShannon, TotalVariation, Alpha, Hellinger, ChiSquared)
}


def get_divergence(name: str, **params) -> Divergence:
    """Build a divergence by name: one of DIVERGENCE_NAMES, or "pkg.mod:f" for a user f(u).

    ``alpha`` needs ``alpha=``; a user f takes an optional ``f_prime="pkg.mod:fp"`` (else autograd).
    """
    if name in _BUILTINS:
        allowed = {"alpha"} if name == "alpha" else set()
    elif ":" in name:
        allowed = {"f_prime"}
    else:
        raise ValueError(
            f"unknown divergence {name!r}; valid names: {', '.join(DIVERGENCE_NAMES)}, "
            "or a user f as an import path 'pkg.module:function'"
        )
    unexpected = sorted(set(params) - allowed)
    if unexpected:
        raise ValueError(
            f"divergence {name!r} got unexpected parameter(s) {unexpected}; "
            f"it takes {sorted(allowed) or 'none'}"
        )
    if name == "alpha":
        if "alpha" not in params:
            raise ValueError("divergence 'alpha' needs alpha=<float> (α ∉ {0, 1})")
        return Alpha(params["alpha"])
    if name in _BUILTINS:
        return _BUILTINS[name]()
    return UserDivergence(name, params.get("f_prime"))


def as_divergence(divergence: str | Divergence, **params) -> Divergence:
    """Accept a Divergence or a name (plus params) and return a Divergence."""
    if isinstance(divergence, Divergence):
        if params:
            raise ValueError("params are only accepted with a divergence name, not an instance")
        return divergence
    return get_divergence(divergence, **params)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types (MATH.md precision rule); float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_divergence(
    policy_logits: Tensor,
    ref_logits: Tensor,
    name: str | Divergence,
    mask: Tensor | None = None,
    **params,
) -> Tensor:
    """Exact per-token D(π(·|s)‖π_ref(·|s)) over the full vocabulary.

    ``policy_logits``, ``ref_logits``: ``[..., V]`` (any float dtype; upcast to fp32, float64 kept).
    ``mask``: ``[...]`` bool/0-1, True = real token. Returns ``[...]`` in the compute dtype:
    d = Σ_v π_ref(v)·f(exp(ℓ(v) − ℓ_ref(v))) in log space; masked positions are exactly 0, and
    garbage (inf/NaN) logits there reach neither the value nor the gradient. Logits of −inf
    (a token outside one model's support) give the limit terms of ``token_terms_with_support``
    (e.g. reverse KL = inf where π_ref = 0 < π). Differentiable w.r.t. ``policy_logits``.
    """
    div = as_divergence(name, **params)
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(
            f"policy and reference logits differ in shape: "
            f"{tuple(policy_logits.shape)} vs {tuple(ref_logits.shape)}"
        )
    dtype = compute_dtype(policy_logits.dtype)
    z, zq = policy_logits.to(dtype), ref_logits.to(dtype)
    if mask is not None:
        keep = mask.bool().unsqueeze(-1)
        # Replace masked rows before log_softmax: multiplying afterwards would let NaN through.
        z = torch.where(keep, z, torch.zeros((), dtype=dtype, device=z.device))
        zq = torch.where(keep, zq, torch.zeros((), dtype=dtype, device=zq.device))
    d = div.token_terms_with_support(F.log_softmax(z, -1), F.log_softmax(zq, -1)).sum(-1)
    if mask is not None:
        d = torch.where(mask.bool(), d, torch.zeros((), dtype=dtype, device=d.device))
    return d


def describe_divergences() -> list[tuple[str, str]]:
    """(name, one line) per built-in divergence, plus the user-f form, for `kltrain divergences`."""
    rows = [(n, _BUILTINS[n].description) for n in DIVERGENCE_NAMES if n != "alpha"]
    rows.insert(
        DIVERGENCE_NAMES.index("alpha"),
        (
            "alpha",
            "Amari α-divergence (needs alpha=, α∉{0,1}); α→1 reverse KL, α→0 forward KL",
        ),
    )
    rows.append(("pkg.module:f", "any convex f with f(1)=0 by import path (f_prime= optional)"))
    return rows
