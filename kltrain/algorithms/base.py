"""What every algorithm provides to the loop: advantages from a scored rollout, and the per-token
policy loss evaluated inside the lm_head kernel.

Shapes: ``[B]`` per sequence, ``[B, T]`` per completion token (zero on padding), ``[n]`` the
flattened valid tokens of one lm_head chunk.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from kltrain.config import RunConfig
from kltrain.rl.losses import token_policy_loss
from kltrain.rl.reduction import Reduced, mean_of, std_of
from kltrain.rollout import Rollout


@dataclass
class TrainBatch:
    """A rollout ready for optimisation."""

    rollout: Rollout
    advantages: Tensor  # [B, T]
    extras: dict[str, Tensor] = field(default_factory=dict)  # algorithm-specific, [B] or [B, T]
    #: advantage statistics etc.: a float is this process's value; a :class:`Reduced` is reduced
    #: over all processes by the loop (once per step, with every other tagged metric).
    metrics: dict[str, float | Reduced] = field(default_factory=dict)


class Algorithm(ABC):
    """An RL algorithm is (advantages, per-token policy loss); the loop does everything else."""

    name: ClassVar[str]
    #: Whether ``β·D(π‖π_ref)`` from ``kl.*`` is added by the loop (f-DPG makes D the objective).
    uses_regulariser: ClassVar[bool] = True
    #: Whether the rollout keeps the policy's completion hidden states (``rollout.policy_hidden``).
    needs_policy_hidden: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.clip_range = cfg.algorithm.clip_range

    @abstractmethod
    def prepare(self, rollout: Rollout, rewards: Tensor, penalty: Tensor | None) -> TrainBatch:
        """``rewards`` [B] sequence rewards; ``penalty`` [B, T] the per-token reward penalty
        ``β·d_t`` when the divergence is placed in the reward (else None)."""

    def token_loss(
        self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """[n] per-token policy loss (clipped surrogate; plain policy gradient on-policy) and
        detached per-token stats ("clipped", "approx_kl", "ratio")."""
        return token_policy_loss(logprobs, old_logprobs, advantages, self.clip_range)

    @classmethod
    def describe_objective(cls, cfg: RunConfig, regulariser) -> tuple[str, str]:
        """(the key recorded as ``gradient_followed``, one console line): which gradient the run
        follows. By default that of the ``kl.*`` regulariser; f-DPG, whose objective is the
        divergence to a target, says so instead."""
        del cfg
        g = regulariser.gradient
        ratio = regulariser.importance_ratio
        weighted = "" if ratio == "off" else f", importance ratio {ratio}"
        line = (
            f"{regulariser.metric_name} in the {regulariser.placement}{weighted}: follows the "
            f"{g.key} gradient ({g.explanation})"
        )
        return g.key, line

    def hidden_loss(
        self, hidden: Tensor, batch: TrainBatch, rows: Tensor, num_tokens: int
    ) -> Tensor | None:
        """Extra loss on the policy's completion hidden states [b, T, H] (e.g. PPO's value head),
        normalised by the global token count; None when the algorithm has none."""
        del hidden, batch, rows, num_tokens
        return None

    def pop_update_sums(self) -> dict[str, float]:
        """Metrics ``hidden_loss`` accumulated over this step's optimizer passes, by full metric
        name, each a sum over passes of ``Σ_valid stat / num_tokens`` (the loop sums them across
        processes and divides by the number of passes); resets them."""
        return {}

    @property
    def module_learning_rate(self) -> float | None:
        """Learning rate of ``modules()`` (None: ``trainer.learning_rate``)."""
        return None

    def modules(self) -> dict[str, torch.nn.Module]:
        """Trainable modules the algorithm owns (e.g. a value head), by name: the loop moves
        them to the device, optimises them with the policy and saves them as safetensors."""
        return {}

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """Modules the algorithm owns but never optimises (e.g. f-DPG's offline proposal), by
        name: the loop moves them to the device and saves them in checkpoints, nothing more."""
        return {}

    def setup(
        self,
        models,
        mean: Callable[[Tensor], float] | None = None,
        gather: Callable[[Tensor], Tensor] | None = None,
        process_index: int = 0,
        policy_state: Callable[[], dict[str, Tensor]] | None = None,
    ) -> None:
        """Called once by the loop with the placed ``Models`` (before ``modules()`` are read);
        ``mean`` averages a [B] tensor over every process's samples; on several processes,
        ``gather`` concatenates every process's rows in process order and ``process_index``
        says which rows are this process's; ``policy_state`` reads the policy's weights as a
        state dict another copy of it can load (a collective where they are partitioned, ZeRO-3;
        default ``models.policy.state_dict()``)."""
        del models, mean, gather, process_index, policy_state

    def sampling_model(self, models) -> torch.nn.Module:
        """The model that generates the rollouts (default: the policy)."""
        return models.policy

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


class GroupBaselineAlgorithm(Algorithm):
    """RLOO and GRPO: k samples per prompt; the baseline comes from the other samples.

    With the divergence in the reward, token t's return is ``R − Σ_{t'≥t} β·d_t'`` (reward-to-go,
    MATH.md). The baseline b and scale s come from the sequence totals ``G = R − Σ_t β·d_t``, so
    ``A_t = (G − b)/s + (Σ_{t'<t} β·d_t')/s``: the penalties before t are not charged to token t.
    """

    @abstractmethod
    def baseline_and_scale(
        self, totals: Tensor, group_size: int, valid: Tensor
    ) -> tuple[Tensor, Tensor]:
        """[B] sequence totals in contiguous groups of ``group_size``, [B] bool valid samples →
        (baseline [B], scale [B]); invalid samples must not enter any baseline."""

    def prepare(self, rollout: Rollout, rewards: Tensor, penalty: Tensor | None) -> TrainBatch:
        mask = rollout.completion_mask
        if penalty is None:
            penalty = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
        penalty = penalty * mask
        totals = rewards - penalty.sum(dim=1)
        valid = mask.any(dim=1)  # the loop clears the mask of samples whose reward is invalid
        baseline, scale = self.baseline_and_scale(totals, self.cfg.algorithm.num_generations, valid)
        earlier = torch.cumsum(penalty, dim=1) - penalty  # Σ_{t'<t} β·d_t'
        seq_adv = (totals - baseline) / scale
        advantages = (seq_adv.unsqueeze(1) + earlier / scale.unsqueeze(1)) * mask
        shown = seq_adv[valid]
        return TrainBatch(
            rollout,
            advantages,
            metrics={"advantage/mean": mean_of(shown), "advantage/std": std_of(shown)},
        )
