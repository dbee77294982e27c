"""The regulariser of ``reward − β·D(π‖π_ref)``: which divergence, how it is estimated per token,
where it is placed (loss, reward or both), and which gradient that pair follows (MATH.md).

Shapes: ``[B, T]`` per-token tensors of a rollout (zero on padding), ``[n]`` the flattened valid
tokens of one chunk inside the lm_head kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kltrain.config import ConfigError, KLConfig
from kltrain.divergence.estimators import GradientFollowed, estimate, gradient_followed
from kltrain.divergence.functions import Divergence, get_divergence

#: Divergences every run logs, exactly over the vocabulary, so runs are comparable on one axis.
LOGGED_DIVERGENCES = ("reverse_kl", "forward_kl", "js")


@dataclass(frozen=True)
class Regulariser:
    divergence: Divergence
    estimator: str  # "exact" or a sampled estimator name
    placement: str  # "loss" | "reward" | "both"
    gradient: GradientFollowed

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

    def loss_term(self, logprobs: Tensor, ref_logprobs: Tensor, exact: Tensor | None) -> Tensor:
        """Per-token ``d_t`` for the loss, differentiable ([n]): the exact divergence computed in
        the lm_head kernel, or the estimator on the sampled token's log-probs."""
        if self.exact:
            assert exact is not None, "exact divergence requested but not computed"
            return exact
        return estimate(self.estimator, logprobs, ref_logprobs, self.divergence)


def build_regulariser(kl: KLConfig) -> Regulariser:
    """Resolve ``kl.*`` and refuse a pair whose gradient is not that of ``kl.divergence``
    unless ``kl.accept_gradient`` names it (MATH.md, "Which gradient each pair follows")."""
    divergence = get_divergence(kl.divergence, **kl.divergence_params())
    followed = gradient_followed(kl.estimator, kl.placement, divergence)
    if not followed.is_gradient_of(divergence.name) and kl.accept_gradient != followed.key:
        raise ConfigError(
            f"kl.estimator={kl.estimator} with kl.placement={kl.placement} under "
            f"kl.divergence={divergence.name} follows {followed.key!r}, not a gradient of "
            f"{divergence.name}: {followed.explanation} Choose another pair (`kltrain divergences` "
            f"lists them), or set kl.accept_gradient={followed.key!r} to train with it anyway."
        )
    if kl.accept_gradient is not None and kl.accept_gradient != followed.key:
        raise ConfigError(
            f"kl.accept_gradient={kl.accept_gradient!r} does not match what this run follows "
            f"({followed.key!r}); remove it or set it to {followed.key!r}"
        )
    return Regulariser(divergence, kl.estimator, kl.placement, followed)
