"""The logits path: ``final_hidden_states(model, ...) @ lm_head_params(model)`` reproduces
``model(...).logits``, so the trainer can apply the output layer in chunks without
materialising ``[B, T, V]`` logits."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from transformers import PreTrainedModel

from kltrain.models.errors import ModelError


def unwrap_causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (its LoRA layers stay in place)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "get_decoder") or not hasattr(base, "get_output_embeddings"):
        raise ModelError(
            f"{type(model).__name__} is not a transformers causal LM (or a peft model around one); "
            "pass the unwrapped model (e.g. accelerator.unwrap_model(model))"
        )
    return base


def final_hidden_states(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor | None = None,
) -> Tensor:
    """input_ids, attention_mask [B, T] → final hidden states [B, T, H] (after the final norm,
    before lm_head). `position_ids` [B, T] defaults to what `model(...)` uses (0..T-1)."""
    decoder = unwrap_causal_lm(model).get_decoder()
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    return out.last_hidden_state


@contextmanager
def last_position_hidden(model: torch.nn.Module) -> Iterator[list[Tensor]]:
    """Record, for every decoder forward inside the block, the final hidden state of its last
    position ([B, 1, H], after the final norm): under ``generate`` with a KV cache, forward k
    is the one whose logits sample token k, so their concatenation is the completion's
    :func:`final_hidden_states` (up to fp32 rounding: the cache computes the same sums in
    other blocks) without a second pass over prompt and completion."""
    captured: list[Tensor] = []

    def hook(module, args, output):
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        captured.append(hidden[:, -1:].detach())

    handle = unwrap_causal_lm(model).get_decoder().register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


_LOGIT_POSTPROCESSING = {
    "final_logit_softcapping": None,  # Gemma 2/3: tanh soft-capping
    "logit_scale": None,  # Cohere: logits × scale
    "logits_scaling": 1.0,  # Granite: logits ÷ scaling
    "output_multiplier": 1.0,
}
"""Config attributes that post-process logits, with the value that makes them a no-op."""


def lm_head_params(model: torch.nn.Module) -> tuple[Tensor, Tensor | None]:
    """The output layer's weight [V, H] and bias [V] (or None): logits = hidden @ W.T + b."""
    base = unwrap_causal_lm(model)
    config = base.config.get_text_config()
    for attr, identity in _LOGIT_POSTPROCESSING.items():
        value = getattr(config, attr, identity)
        if value != identity:
            raise ModelError(
                f"{type(base).__name__} post-processes its logits ({attr}={value}), so they are "
                "not a linear function of the hidden states; kltrain's chunked lm_head path "
                "does not support this model"
            )
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise ModelError(
            f"the output layer of {type(base).__name__} is {type(head).__name__}, not a plain "
            "Linear (a LoRA on lm_head is not supported: leave it out of lora.target_modules)"
        )
    return head.weight, head.bias
