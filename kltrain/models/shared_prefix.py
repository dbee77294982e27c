"""Shared prompt prefixes: rows of a batch that begin with the same prompt (the G completions
GRPO and RLOO sample per prompt) run that prompt through the decoder once.

A batch of B rows with U distinct prefixes of length n costs ``U·n + B·(S − n)`` token
positions instead of ``B·S``: the prefix rows fill a KV cache, whose rows are then indexed
``[U] → [B]`` so that every row reads its own prefix, and the rest of each row runs on top of
it. The attention of a later position sees the same keys and values at the same positions as in
one pass over the whole row, so the final hidden states are equal up to floating-point rounding
(other batch sizes, other summation blocks). Under autograd the row indexing's backward sums
the gradient each shared prefix receives from all the rows that read it: the gradient of the
same function.

Used where it is exact: a model whose decoder layers all cache full attention (a
``DynamicLayer`` each; sliding-window, chunked or linear-attention layers keep other state) and
that fills the cache it is given. Not on DeepSpeed ZeRO-3 partitions, nor where a backward
follows through FSDP2-sharded weights or gradient checkpointing (transformers drops the cache
of a checkpointed layer), nor inside :func:`whole_rows`. Callers fall back to the whole-row
pass when :func:`shared_prefix_cache` returns None: the same values, the prefix run per row.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from kltrain.models.logits import unwrap_causal_lm

try:  # the cache layer type (transformers ≥ 4.56 builds a DynamicCache of layers)
    from transformers.cache_utils import DynamicLayer
except ImportError:  # pragma: no cover - older layouts: no shared prefixes
    DynamicLayer = None


_WHOLE_ROWS = contextvars.ContextVar("kltrain_whole_rows", default=False)


@contextmanager
def whole_rows() -> Iterator[None]:
    """Inside the block every row runs whole (:func:`shared_prefix_cache` returns None): for an
    engine whose gradient hooks do not take a layer called twice in one forward."""
    token = _WHOLE_ROWS.set(True)
    try:
        yield
    finally:
        _WHOLE_ROWS.reset(token)


@dataclass(frozen=True)
class PrefixGroups:
    """Rows grouped by identical prefix: ``first[u]`` is the first row whose prefix is the u-th
    distinct one ``[U]``, ``of_row[b]`` the index u of row b's prefix ``[B]``."""

    first: Tensor
    of_row: Tensor


def group_prefixes(ids: Tensor, mask: Tensor) -> PrefixGroups | None:
    """``ids``, ``mask`` ``[B, n]`` (the prefix of each row, left-padded) → the groups of rows
    with equal ids and mask, or None when no two rows share one (nothing to save) or n = 0."""
    rows, n = ids.shape
    if n == 0 or rows < 2:
        return None
    key = torch.cat([ids, mask.to(ids.dtype)], dim=1)
    _, of_row = torch.unique(key, dim=0, return_inverse=True)
    distinct = int(of_row.max()) + 1
    if distinct == rows:
        return None
    first = torch.full((distinct,), rows, dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, of_row, torch.arange(rows, device=ids.device), "amin")
    return PrefixGroups(first=first, of_row=of_row)


def cache_keyword(model: torch.nn.Module) -> str:
    """The name under which this transformers version passes a KV cache to a decoder's forward
    and to ``generate``: ``cache`` (transformers ≥ 5.2x), else ``past_key_values``."""
    decoder = unwrap_causal_lm(model).get_decoder()
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _full_attention_cache(model: torch.nn.Module) -> DynamicCache | None:
    """An empty DynamicCache for ``model``, if every layer of it is a plain full-attention one."""
    if DynamicLayer is None:
        return None
    base = unwrap_causal_lm(model)
    try:
        cache = DynamicCache(config=base.config)
    except (TypeError, ValueError, KeyError):  # a config transformers cannot lay a cache out for
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return cache


def _checkpointed(model: torch.nn.Module) -> bool:
    """Whether a layer of ``model`` checkpoints (transformers' flag on each checkpointed layer,
    under which it drops the cache it is passed)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _fsdp2_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s weights are FSDP2 shards (DTensors). FSDP2 frees a layer's gathered
    weights after each call and gathers them again once per layer for the backward, so the
    backward of a layer called twice (prefix, then the rest) finds the first call's freed."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def _zero3_partitioned(model: torch.nn.Module) -> bool:
    """Whether ``model``'s weights are DeepSpeed ZeRO-3 partitions: its hooks gather and release
    each layer's weights by the order of the layers' calls, which a layer called twice per
    forward breaks (the process aborts)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def shared_prefix_cache(
    model: torch.nn.Module, ids: Tensor, mask: Tensor, position_ids: Tensor
) -> DynamicCache | None:
    """The KV cache of ``ids`` ``[B, n]`` (``mask``, ``position_ids`` alike) computed on its
    distinct rows only (:func:`group_prefixes`), then indexed back to B rows. None where no row
    repeats or sharing would not be exact (see the module docstring); with gradients enabled,
    differentiable."""
    groups = group_prefixes(ids, mask)
    if groups is None or _WHOLE_ROWS.get():
        return None
    base = unwrap_causal_lm(model)
    backward = torch.is_grad_enabled()
    if _zero3_partitioned(base) or (backward and _fsdp2_sharded(base)):
        return None
    if backward and base.training and _checkpointed(base):
        return None
    cache = _full_attention_cache(model)
    if cache is None:
        return None
    rows = groups.first
    base.get_decoder()(
        input_ids=ids[rows],
        attention_mask=mask[rows],
        position_ids=position_ids[rows],
        use_cache=True,
        **{cache_keyword(model): cache},
    )
    if cache.get_seq_length() != ids.shape[1]:  # a decoder that did not fill the cache
        return None
    cache.batch_select_indices(groups.of_row)
    return cache


def hidden_after_shared_prefix(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    prefix_length: int,
) -> Tensor | None:
    """``input_ids``, ``attention_mask``, ``position_ids`` ``[B, S]`` → the final hidden states
    ``[B, S − n, H]`` of positions ``n..S−1`` (n = ``prefix_length``), as
    ``final_hidden_states(...)[:, n:]``, with each distinct ``[:, :n]`` prefix run once. None
    when no prefix is shared or sharing would not be exact: the caller runs the whole rows."""
    n = prefix_length
    if n >= input_ids.shape[1]:  # no position after the prefix
        return None
    cache = shared_prefix_cache(model, input_ids[:, :n], attention_mask[:, :n], position_ids[:, :n])
    if cache is None:
        return None
    out = unwrap_causal_lm(model).get_decoder()(
        input_ids=input_ids[:, n:],
        attention_mask=attention_mask,
        position_ids=position_ids[:, n:],
        use_cache=True,
        **{cache_keyword(model): cache},
    )
    return out.last_hidden_state
