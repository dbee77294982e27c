"""PPO's value function ``V(s_t)``: a linear head on final hidden states, either the policy's own
(shared trunk) or those of a separate transformer (a value model).

``s_t = (x, y_<t)`` is the state before completion token ``t``; its hidden state is the one at the
position that predicts token ``t`` (``P − 1 + t``, as ``rollout.completion_hidden``), so
``V`` is ``[B, T]`` aligned with the completion tokens. Both kinds are called the same way,
``value(rollout, rows, policy_hidden) → [b, T]``; padding positions read a zero hidden state, so
whatever the trunk holds there (even NaN) cannot reach the values or their gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AutoConfig

from kltrain.config import RunConfig
from kltrain.models.loading import disable_dropout, load_causal_lm, resolve_model
from kltrain.rollout import Rollout, completion_hidden


class ValueHead(nn.Module):
    """``V(s_t) = w·h_t + b`` on the policy's final hidden states ``h`` ``[b, T, H]`` → ``[b, T]``.

    Zero-initialised, so ``V ≡ 0`` before training (as lm-human-preferences); computed in fp32
    whatever the trunk's dtype. Gradients of the value loss reach the shared trunk through ``h``
    only with ``trunk_gradient`` (``algorithm.ppo.value_trunk_gradient``).
    """

    def __init__(self, hidden_size: int, trunk_gradient: bool = True) -> None:
        super().__init__()
        self.trunk_gradient = trunk_gradient
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def head(self, hidden: Tensor) -> Tensor:
        """``[..., H]`` → ``[...]``."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)

    def forward(self, rollout: Rollout, rows: Tensor, policy_hidden: Tensor | None) -> Tensor:
        if policy_hidden is None:
            raise ValueError("the value head needs the policy's hidden states (none were kept)")
        if not self.trunk_gradient:
            policy_hidden = policy_hidden.detach()
        return self.head(_zero_padding(policy_hidden, rollout.completion_mask[rows]))


class ValueModel(nn.Module):
    """A separate value model: its own decoder trunk (a causal LM without its lm_head) and a
    zero-initialised :class:`ValueHead`. ``V(s_t)`` from the trunk's hidden state at the position
    that predicts completion token ``t``; the policy's hidden states are not used."""

    def __init__(self, trunk: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.value_head = ValueHead(hidden_size)

    @classmethod
    def load(
        cls, name: str, dtype: str, trust_remote_code: bool, dropout: bool = False
    ) -> ValueModel:
        """``dropout``: keep the trunk's dropout (``model.dropout``); off by default."""
        lm = load_causal_lm(name, dtype, trust_remote_code)
        if not dropout:
            disable_dropout(lm)
        trunk = lm.get_decoder()
        trunk.requires_grad_(True).train()
        return cls(trunk, lm.config.get_text_config().hidden_size)

    def forward(self, rollout: Rollout, rows: Tensor, policy_hidden: Tensor | None) -> Tensor:
        del policy_hidden
        hidden = completion_hidden(
            self.trunk,
            rollout.input_ids[rows],
            rollout.attention_mask[rows],
            rollout.prompt_length,
        )
        return self.value_head.head(_zero_padding(hidden, rollout.completion_mask[rows]))


def _zero_padding(hidden: Tensor, mask: Tensor) -> Tensor:
    """[b, T, H] with exact zeros where mask [b, T] is False."""
    return torch.where(mask.bool().unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype))


def build_value_function(cfg: RunConfig) -> ValueHead | ValueModel:
    """``algorithm.ppo.value_model``: None → a head on the policy (hidden size read from the
    policy's config, no weights loaded); a model name → a separate :class:`ValueModel`."""
    trust = cfg.model.trust_remote_code
    name = cfg.algorithm.ppo.value_model
    if name is not None:
        return ValueModel.load(name, cfg.model.dtype, trust, cfg.model.dropout)
    config = AutoConfig.from_pretrained(resolve_model(cfg.model.policy), trust_remote_code=trust)
    return ValueHead(
        config.get_text_config().hidden_size,
        trunk_gradient=cfg.algorithm.ppo.value_trunk_gradient,
    )
