"""PPO with the divergence in the reward (InstructGPT, Llama 2; MATH.md "PPO with the penalty in
the reward").

Per-token rewards ``r_t = −β·d_t`` on every generated token, plus the sequence reward ``R`` on the
last one (``d_t`` the configured divergence, exact or a sampled estimator; ``β·d_t`` arrives from
the loop as ``penalty``). A value function ``V(s_t)`` (a head on the policy or a separate value
model, :mod:`kltrain.algorithms.value`) gives GAE advantages and returns:

    δ_t = r_t + γ·V(s_{t+1}) − V(s_t),   A_t = Σ_{t'≥t} (γλ)^{t'−t} δ_t',   G_t = A_t + V(s_t)

(``V`` after the last token is 0). The policy loss is the clipped surrogate of
:func:`kltrain.rl.losses.token_policy_loss` on ``A_t`` (whitened over the batch by default);
the value loss ``c_v·½·max((V − G)², (clip(V, V_old ± ε_v) − G)²)`` is added through
``hidden_loss``.
Old log-probs, reference log-probs, old values and advantages are computed once per rollout
batch; the loop runs ``algorithm.epochs`` × ``algorithm.num_minibatches`` optimizer steps on it.

Shapes: ``[B]`` per sequence, ``[B, T]`` per completion token (zero on padding).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor

from kltrain.algorithms.base import Algorithm, TrainBatch
from kltrain.algorithms.value import ValueHead, ValueModel, build_value_function
from kltrain.config import RunConfig
from kltrain.rl.advantages import assemble_token_rewards, gae, whiten
from kltrain.rl.losses import explained_variance, value_loss
from kltrain.rollout import Rollout


class Ppo(Algorithm):
    name = "ppo"

    def __init__(self, cfg: RunConfig, value: ValueHead | ValueModel | None = None):
        """``value``: the value function to train instead of the one ``algorithm.ppo`` names."""
        super().__init__(cfg)
        self.ppo = cfg.algorithm.ppo
        self.value = build_value_function(cfg) if value is None else value
        #: The head reads the policy's hidden states; a separate value model runs its own trunk.
        self.needs_policy_hidden = isinstance(self.value, ValueHead)
        self._update_sums: dict[str, float] = defaultdict(float)
        #: mean over every process's values (set by the loop in ``setup``); None: this process's
        self.global_mean: Callable[[Tensor], float] | None = None

    def setup(
        self,
        models,
        mean: Callable[[Tensor], float] | None = None,
        gather: Callable[[Tensor], Tensor] | None = None,
        process_index: int = 0,
        policy_state: Callable[[], dict[str, Tensor]] | None = None,
    ) -> None:
        """``mean`` averages a tensor over every process's entries: the advantage whitening and
        the batch metrics then use the global token statistics, identical on every process."""
        del models, gather, process_index, policy_state
        self.global_mean = mean

    @property
    def module_learning_rate(self) -> float | None:
        return self.ppo.value_learning_rate

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"value_head" if self.needs_policy_hidden else "value_model": self.value}

    # ------------------------------------------------------------------------------------------
    def prepare(self, rollout: Rollout, rewards: Tensor, penalty: Tensor | None) -> TrainBatch:
        """``rewards`` [B] sequence rewards, ``penalty`` [B, T] ``β·d_t`` (None when β = 0) →
        GAE advantages [B, T] and, in ``extras``, ``old_values``, ``returns`` and
        ``token_rewards`` [B, T]."""
        mask = rollout.completion_mask
        token_rewards = self.token_rewards(rewards, penalty, mask)
        old_values = self.old_values(rollout)
        advantages, returns = gae(token_rewards, old_values, mask, self.ppo.gamma, self.ppo.lam)
        if self.global_mean is None:  # a lone process (unit use): its own token statistics
            metrics = _batch_metrics(advantages, returns, old_values, mask)
            if self.ppo.whiten_advantages and mask.any():
                advantages = whiten(advantages, mask)
        else:  # every process calls the collectives, whether or not it has valid tokens
            metrics = _global_batch_metrics(advantages, returns, old_values, mask, self.global_mean)
            if self.ppo.whiten_advantages:
                advantages = _global_whiten(advantages, mask, self.global_mean)
        extras = {"old_values": old_values, "returns": returns, "token_rewards": token_rewards}
        return TrainBatch(rollout, advantages, extras=extras, metrics=metrics)

    def token_rewards(self, rewards: Tensor, penalty: Tensor | None, mask: Tensor) -> Tensor:
        """``r_t = −clip(β·d_t)`` on every valid token, ``+ clip(R)`` on the last one; rows with
        no valid token (invalid samples) get none. ``clip`` is ``reward_clip`` /
        ``penalty_clip`` when set. [B], [B, T] or None, [B, T] → [B, T]."""
        if penalty is None:
            penalty = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
        rewards = _clamp(rewards, self.ppo.reward_clip)
        penalty = _clamp(penalty, self.ppo.penalty_clip)
        out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        live = mask.any(dim=1)
        if live.any():
            out[live] = assemble_token_rewards(
                rewards[live].float(), penalty[live].float(), mask[live], coef=1.0
            )
        return out

    @torch.no_grad()
    def old_values(self, rollout: Rollout) -> Tensor:
        """``V(s_t)`` at sampling time [B, T] (0 at padding), in micro-batches."""
        parts = []
        rows_all = torch.arange(rollout.num_sequences, device=rollout.input_ids.device)
        for rows in rows_all.split(self.cfg.trainer.micro_batch_size):
            hidden = None if rollout.policy_hidden is None else rollout.policy_hidden[rows]
            parts.append(self.value(rollout, rows, hidden).float())
        return torch.cat(parts) * rollout.completion_mask

    # ------------------------------------------------------------------------------------------
    def hidden_loss(
        self, hidden: Tensor, batch: TrainBatch, rows: Tensor, num_tokens: int
    ) -> Tensor | None:
        """``value_coef · Σ_valid token_value_loss / num_tokens`` on the rows' current values."""
        r = batch.rollout
        values = self.value(r, rows, hidden)
        loss, stats = value_loss(
            values,
            batch.extras["old_values"][rows],
            batch.extras["returns"][rows],
            r.completion_mask[rows],
            num_tokens,
            self.ppo.value_clip_range,
        )
        self._update_sums["value/loss"] += float(loss.detach())
        self._update_sums["value/clip_fraction"] += float(stats["value_clip_fraction"])
        self._update_sums["value/mse"] += float(stats["value_mse"])
        return self.ppo.value_coef * loss

    def pop_update_sums(self) -> dict[str, float]:
        out, self._update_sums = dict(self._update_sums), defaultdict(float)
        return out


def _clamp(x: Tensor, bound: float | None) -> Tensor:
    return x if bound is None else x.clamp(-bound, bound)


def _global_batch_metrics(
    advantages: Tensor, returns: Tensor, values: Tensor, mask: Tensor, mean
) -> dict[str, float]:
    """:func:`_batch_metrics` over every process's valid tokens (token-weighted global means;
    population variances as ``mean((x − mean x)²)``)."""
    m = mask.bool()
    a, g, v = (x.detach().double()[m] for x in (advantages, returns, values))

    def var(x: Tensor) -> float:
        return mean((x - mean(x)) ** 2)

    var_g = var(g)
    a_mean = mean(a)
    return {
        "advantage/mean": a_mean,
        "advantage/std": math.sqrt(max(mean((a - a_mean) ** 2), 0.0)),
        "value/returns_mean": mean(g),
        "value/values_mean": mean(v),
        "value/explained_variance": 1.0 - var(g - v) / var_g if var_g > 0 else float("nan"),
    }


def _global_whiten(x: Tensor, mask: Tensor, mean, eps: float = 1e-8) -> Tensor:
    """:func:`kltrain.rl.advantages.whiten` with the mean and population variance over every
    process's valid entries: ``(x − μ)/sqrt(σ² + eps)``, 0 on padding. [B, T] → [B, T]."""
    valid = x.detach().double()[mask.bool()]
    mu = mean(valid)
    var = mean((valid - mu) ** 2)
    out = (x.detach().double() - mu) / math.sqrt(var + eps)
    return torch.where(mask.bool(), out, 0.0).to(x.dtype)


def _batch_metrics(advantages: Tensor, returns: Tensor, values: Tensor, mask: Tensor) -> dict:
    """Token means over the valid tokens (before advantage whitening) and the explained variance
    ``1 − Var[G − V]/Var[G]`` of the values the rollout was scored with."""
    m = mask.bool()
    if not m.any():
        return {}

    def mean(x: Tensor) -> float:
        return float(x[m].double().mean())

    return {
        "advantage/mean": mean(advantages),
        "advantage/std": float(advantages[m].double().std(unbiased=False)),
        "value/returns_mean": mean(returns),
        "value/values_mean": mean(values),
        "value/explained_variance": float(explained_variance(values, returns, m)),
    }
