"""The regulariser of ``reward − β·D(π‖π_ref)``: which divergence, how it is estimated per token,
where it is placed (loss, reward or both), and which gradient that pair follows (MATH.md).

Shapes: ``[B, T]`` per-token tensors of a rollout (zero on padding), ``[n]`` the flattened valid
tokens of one chunk inside the lm_head kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kltrain.config import ConfigError, KLConfig, RunConfig
from kltrain.divergence.estimators import GradientFollowed, estimate
from kltrain.divergence.functions import Divergence, get_divergence
from kltrain.divergence.importance import resolve_importance_ratio, weighted_term

#: Divergences every run logs, exactly over the vocabulary, so runs are comparable on one axis.
LOGGED_DIVERGENCES = ("reverse_kl", "forward_kl", "js")


@dataclass(frozen=True)
class Regulariser:
    divergence: Divergence
    estimator: str  # "exact" or a sampled estimator name
    placement: str  # "loss" | "reward" | "both"
    gradient: GradientFollowed
    importance_ratio: str = "off"  # the resolved form: "off" | "on" | "detached" (importance.py)

    @property
    def in_loss(self) -> bool:
        return self.placement in ("loss", "both")

    @property
    def in_reward(self) -> bool:
        return self.placement in ("reward", "both")

    @property
    def exact(self) -> bool:
        return self.estimator == "exact"

    @property
    def metric_name(self) -> str:
        """Key of the trained per-token quantity in the metrics: ``<divergence>/<estimator>``."""
        return f"{self.divergence.name}/{self.estimator}"

    def reward_penalty(self, stats: dict[str, Tensor]) -> Tensor:
        """Per-token ``d_t`` for the reward, from the rollout's stats ([B, T], no gradient)."""
        if self.exact:
            return stats[self.divergence.name]
        return estimate(
            self.estimator, stats["logprobs"], stats["ref_logprobs"], self.divergence
        ).detach()

    def loss_term(
        self,
        logprobs: Tensor,
        ref_logprobs: Tensor,
        exact: Tensor | None,
        old_logprobs: Tensor | None = None,
    ) -> Tensor:
        """Per-token ``d_t`` for the loss, differentiable ([n]): the exact divergence computed in
        the lm_head kernel, or the estimator on the sampled token's log-probs, weighted by
        ``w = π_θ/π_old`` (``old_logprobs``, sampling time) in the resolved ``importance_ratio``
        form."""
        if self.exact:
            assert exact is not None, "exact divergence requested but not computed"
            return exact
        g = estimate(self.estimator, logprobs, ref_logprobs, self.divergence)
        if self.importance_ratio == "off":
            return g
        assert old_logprobs is not None, "the importance ratio needs the sampling-time log-probs"
        return weighted_term(g, logprobs, old_logprobs, self.importance_ratio)


def optimizer_steps_per_batch(cfg: RunConfig) -> int:
    """Optimizer steps each rollout batch feeds: above 1, all but the first are off-policy."""
    return cfg.algorithm.epochs * cfg.algorithm.num_minibatches


def build_regulariser(kl: KLConfig, optimizer_steps_per_batch: int = 1) -> Regulariser:
    """Resolve ``kl.*`` and refuse a pair whose gradient is not that of ``kl.divergence``
    unless ``kl.accept_gradient`` names it (MATH.md, "Which gradient each pair follows").

    ``optimizer_steps_per_batch`` (``algorithm.epochs × num_minibatches``): above 1 every step
    but a batch's first is off-policy, which decides ``kl.importance_ratio: auto`` and the label.
    """
    divergence = get_divergence(kl.divergence, **kl.divergence_params())
    off_policy = optimizer_steps_per_batch > 1
    _check_ratio_applies(kl)
    mode, followed = resolve_importance_ratio(
        kl.importance_ratio,
        kl.estimator,
        kl.placement,
        divergence,
        off_policy,
        kl.accept_gradient,
    )
    where = (
        f"kl.estimator={kl.estimator} with kl.placement={kl.placement} "
        f"(kl.importance_ratio={kl.importance_ratio}, resolved to {mode}; "
        f"{'off' if off_policy else 'on'}-policy: {optimizer_steps_per_batch} optimizer step(s) "
        f"per rollout batch)"
    )
    if not followed.is_gradient_of(divergence.name) and kl.accept_gradient != followed.key:
        raise ConfigError(
            f"{where} under kl.divergence={divergence.name} follows {followed.key!r}, not a "
            f"gradient of {divergence.name}: {followed.explanation}. Choose another pair or "
            f"kl.importance_ratio (`kltrain divergences` lists them), or set "
            f"kl.accept_gradient={followed.key!r} to train with it anyway."
        )
    if kl.accept_gradient is not None and kl.accept_gradient != followed.key:
        raise ConfigError(
            f"kl.accept_gradient={kl.accept_gradient!r} does not match what this run follows "
            f"({followed.key!r}: {where}); remove it or set it to {followed.key!r}"
        )
    return Regulariser(divergence, kl.estimator, kl.placement, followed, mode)


def _check_ratio_applies(kl: KLConfig) -> None:
    """An explicit ratio where nothing is weighted would be silently ignored: refuse it."""
    if kl.importance_ratio in ("auto", "off"):
        return
    if kl.estimator == "exact" or kl.placement == "reward":
        raise ConfigError(
            f"kl.importance_ratio={kl.importance_ratio} weights a sampled estimator in the loss, "
            f"but kl.estimator={kl.estimator} with kl.placement={kl.placement} has none (the exact "
            "divergence needs no ratio at a visited state; the reward penalty is fixed at "
            "sampling time and corrected by the policy-gradient surrogate's own ratio). Use "
            "kl.importance_ratio=auto or off."
        )
