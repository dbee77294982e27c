"""FSDP2 (torch's ``fully_shard``) for the policy and the reference, as an Accelerate FSDP config
asks for it (``configs/accelerate/fsdp.yaml``: ``fsdp_version: 2``).

Layout: every decoder block is its own FSDP unit (all-gathered for its forward and backward,
resharded after); the root unit is the module whose ``forward`` is the training forward
(:class:`kltrain.training.distributed.PolicyHidden`) and holds the rest: embeddings, final norm
and lm_head. The chunked lm_head loss applies the lm_head weight *outside* any forward; it finds
it unsharded because the root unit keeps its parameters gathered from its forward until its
gradient is reduce-scattered at the end of backward (torch's default for the root). That is the
"gather the lm_head once per micro-batch" design: V×H extra memory while a micro-batch runs, no
change to the kernels, no per-chunk communication.

Everything that reads weights outside the training forward (generation, the scoring passes,
held-out evaluation) runs inside :func:`gathered`: all units unsharded once, kept so for the
whole phase, resharded on exit. Peak memory there is a full copy of the weights (as DDP holds
all the time); optimizer state and gradients stay sharded. Decoding with per-layer gathers at
every token would save that memory at one all-gather per block per token; not built.

Gradients are SUMMED across processes (the losses are already divided by the step's global token
count), as the DDP path does.

Accelerate 1.16 forms FSDP only on accelerators (``distributed_type: FSDP`` becomes MULTI_CPU on
a CPU machine, silently); kltrain applies ``fully_shard`` itself from the same plugin settings on
every device, so the path the CPU tests run is the one GPUs run.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate.utils import parse_flag_from_env
from torch import Tensor
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from kltrain.config import ConfigError

#: Accelerate's mixed-precision names → the dtype FSDP2 all-gathers and computes in.
_PARAM_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def requested() -> bool:
    """Whether the launch asked for FSDP (``accelerate launch --config_file fsdp.yaml`` or
    ``--use_fsdp`` sets ``ACCELERATE_USE_FSDP``), whatever engine Accelerate then formed."""
    return parse_flag_from_env("ACCELERATE_USE_FSDP")


@dataclass(frozen=True)
class Fsdp2Settings:
    """What kltrain takes from Accelerate's FSDP plugin (its ``fsdp_*`` config keys)."""

    reshard_after_forward: bool
    layer_class_names: tuple[str, ...] | None  # fsdp_transformer_layer_cls_to_wrap
    param_dtype: torch.dtype | None  # mixed_precision: compute/all-gather dtype, fp32 master
    offload_params: bool

    @classmethod
    def from_accelerate(cls, mixed_precision: str) -> Fsdp2Settings:
        """Read the plugin Accelerate builds from the launch's environment; refuse what kltrain
        does not honour (rather than run without it)."""
        from accelerate.utils import FullyShardedDataParallelPlugin
        from torch.distributed.fsdp import CPUOffloadPolicy

        plugin = FullyShardedDataParallelPlugin()
        if plugin.fsdp_version != 2:
            raise ConfigError(
                f"fsdp_version: {plugin.fsdp_version} in the Accelerate config; kltrain runs "
                "FSDP2 only: set fsdp_version: 2 (configs/accelerate/fsdp.yaml)"
            )
        refused = {
            "fsdp_activation_checkpointing": (
                plugin.activation_checkpointing,
                "use kltrain's model.gradient_checkpointing: true instead",
            ),
            "fsdp_cpu_ram_efficient_loading": (
                plugin.cpu_ram_efficient_loading,
                "every process loads the weights, then they are sharded",
            ),
        }
        for key, (value, instead) in refused.items():
            if value:
                raise ConfigError(f"{key}: true in the Accelerate config: not supported; {instead}")
        if mixed_precision not in _PARAM_DTYPES:
            raise ConfigError(
                f"mixed_precision: {mixed_precision} in the Accelerate config; under FSDP2 "
                f"kltrain supports {', '.join(_PARAM_DTYPES)}"
            )
        names = plugin.transformer_cls_names_to_wrap
        return cls(
            reshard_after_forward=bool(plugin.reshard_after_forward),
            layer_class_names=tuple(names) if names else None,
            param_dtype=_PARAM_DTYPES[mixed_precision],
            offload_params=isinstance(plugin.cpu_offload, CPUOffloadPolicy),
        )


def decoder_blocks(model: torch.nn.Module, class_names: tuple[str, ...] | None) -> list:
    """The modules that become their own FSDP unit: those of ``class_names`` (the config's
    ``fsdp_transformer_layer_cls_to_wrap``), else of the model's ``_no_split_modules``."""
    names = class_names or tuple(_no_split_modules(model))
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        found = sorted({type(m).__name__ for m in model.modules() if "Layer" in type(m).__name__})
        raise ConfigError(
            f"fsdp_transformer_layer_cls_to_wrap: {', '.join(names) or '(unset)'} matches no "
            f"module of {type(model).__name__}; its blocks are: {', '.join(found) or 'none'}"
        )
    return blocks


def _no_split_modules(model: torch.nn.Module) -> list[str]:
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return list(names)
    return []


def shard(root: torch.nn.Module, model: torch.nn.Module, settings: Fsdp2Settings) -> None:
    """``fully_shard`` the decoder blocks of ``model`` (inside ``root``), then ``root``; in
    place. Gradients reduce-scatter as a SUM (divide factor 1, plain SUM collectives: gloo has
    no PREMUL_SUM)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    kwargs = {
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=settings.param_dtype,
            reduce_dtype=torch.float32 if settings.param_dtype else None,
        ),
        "offload_policy": CPUOffloadPolicy() if settings.offload_params else OffloadPolicy(),
    }
    for block in decoder_blocks(model, settings.layer_class_names):
        fully_shard(block, reshard_after_forward=settings.reshard_after_forward, **kwargs)
    fully_shard(root, **kwargs)  # the root keeps its parameters gathered through backward
    for unit in units(root):
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    _BLOCKS_RESHARD[root] = settings.reshard_after_forward


#: root unit → whether its blocks reshard after forward (restored by :func:`gathered`).
_BLOCKS_RESHARD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def units(root: torch.nn.Module) -> list[FSDPModule]:
    """Every FSDP unit under ``root`` (``root`` included when it is one)."""
    return [m for m in root.modules() if isinstance(m, FSDPModule)]


def is_sharded(module: torch.nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def is_sharded_param(param: Tensor) -> bool:
    return isinstance(param, DTensor)


@contextmanager
def gathered(*roots: torch.nn.Module, blocks: bool = True) -> Iterator[None]:
    """Inside: every unit of the sharded ``roots`` holds its full parameters (one all-gather per
    unit on entry, none per forward); resharded on exit. ``blocks=False`` gathers the root units
    only (embeddings, final norm, lm_head). Every process must enter it (collective)."""
    roots = tuple(r for r in roots if is_sharded(r))
    entered: list[FSDPModule] = []
    held: list[tuple[FSDPModule, bool]] = []
    try:
        for root in roots:
            for unit in units(root) if blocks else [root]:
                if unit is not root:  # a block's forward would otherwise reshard it
                    held.append((unit, _BLOCKS_RESHARD.get(root, True)))
                    unit.set_reshard_after_forward(False, recurse=False)
                unit.unshard()
                entered.append(unit)
        yield
    finally:
        for unit in entered:
            unit.reshard()
        for unit, reshard_after in held:
            unit.set_reshard_after_forward(reshard_after, recurse=False)


@contextmanager
def gradient_sync(root: torch.nn.Module, sync: bool) -> Iterator[None]:
    """For every micro-batch of an optimizer step but the last, keep the gradients unsharded
    and local (no reduce-scatter); the last one reduces the sum once."""
    if sync or not is_sharded(root):
        yield
        return
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def local(t: Tensor) -> Tensor:
    """This process's shard of a DTensor; any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def clip_gradients(grads: list[Tensor], max_norm: float) -> float:
    """Scale ``grads`` (sharded DTensors and plain tensors, e.g. PPO's value head) in place to
    a global ‖g‖₂ of at most ``max_norm`` (inf: no clipping); returns ‖g‖₂ before clipping. The
    sharded part's norm is reduced over the processes (the norm of a DTensor is a partial sum
    until ``full_tensor``); the coefficient is torch's, ``max_norm / (‖g‖ + 1e-6)`` capped at 1."""
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    parts = []
    if sharded:
        norm = torch.nn.utils.get_total_norm(sharded)
        parts.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if plain:
        parts.append(torch.nn.utils.get_total_norm(plain))
    total = float(torch.linalg.vector_norm(torch.stack([p.double() for p in parts])))
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


# ----------------------------------------------------------------------------------------------
# Checkpoints: full weights (portable, loadable by transformers), optimizer state per process


def full_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """The model's full weights on the CPU of process 0 (empty elsewhere); every process must
    call it (it all-gathers each shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def full_module_state(module: torch.nn.Module) -> dict[str, Tensor]:
    """:func:`full_state_dict` holding each tied parameter once (under its first name), as
    ``safetensors.torch.save_model`` writes a module and ``load_model`` reads it back: an
    algorithm's sharded module (PPO's value model, f-DPG's proposal of a tied-embedding model)
    is checkpointed as a state dict. Every process must call it."""
    first: dict[int, str] = {}
    duplicates = set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            duplicates.add(name)
        first.setdefault(id(param), name)
    return {k: v for k, v in full_state_dict(module).items() if k not in duplicates}


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded tensor replaced by this process's shard
    (plain tensors: loadable with ``weights_only=True``)."""
    state = optimizer.state_dict()
    state["state"] = {
        index: {k: local(v).clone() if isinstance(v, DTensor) else v for k, v in s.items()}
        for index, s in state["state"].items()
    }
    return state


def load_local_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of :func:`local_optimizer_state` on the same world size: load, then make each
    shard-shaped state tensor of a sharded parameter a DTensor laid out like the parameter (the
    optimizer's update mixes them)."""
    optimizer.load_state_dict(state)
    for param, param_state in optimizer.state.items():
        if not isinstance(param, DTensor):
            continue
        for key, value in param_state.items():
            if isinstance(value, Tensor) and not isinstance(value, DTensor) and value.dim():
                param_state[key] = DTensor.from_local(
                    value, param.device_mesh, param.placements, run_check=False
                )
