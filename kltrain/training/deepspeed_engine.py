"""DeepSpeed ZeRO-2 (optimizer state and gradients partitioned over the processes) for the
policy's training forward, as an Accelerate DeepSpeed config asks for it
(``configs/accelerate/deepspeed_zero2.yaml``). ZeRO-3 is refused, by name.

kltrain calls ``deepspeed.initialize`` itself rather than going through ``accelerator.prepare``:
Accelerate's DeepSpeed ``backward`` runs ``engine.step()`` inside it, which leaves no place for
kltrain's own accumulation over micro-batches and its skip of an update with a non-finite loss;
and on a CPU machine Accelerate (asked with ``cpu=True`` for a gloo group) drops DeepSpeed
silently. The process group stays Accelerate's (gloo on CPU, NCCL on GPUs); DeepSpeed joins it.

What the engine is given and why:

- The torch AdamW kltrain builds (DeepSpeed's own Adam types compile C++ first), holding the
  policy's trainable parameters and the algorithm's modules (PPO's value head, its own learning
  rate) as separate param groups; the engine wraps one module holding both
  (:class:`TrainedModules`: DeepSpeed refuses an optimizer parameter outside the wrapped module),
  so ZeRO-2 partitions and reduces the value head with the policy. kltrain's lr scheduler drives
  that AdamW's param groups, which ZeRO-2 keeps.
- ``managed_gradient_accumulation: false``: each ``backward`` reduces its micro-batch's
  gradient into this process's partition (ZeRO-2) and accumulates; ``step`` is the boundary.
  The number of micro-batches per update varies (the largest share of a minibatch over the
  processes), so no fixed ``gradient_accumulation_steps`` describes it.
- Gradients are SUMMED over processes: kltrain's losses are already divided by the step's global
  token count; DeepSpeed averages over the processes, so :meth:`Zero2.backward` multiplies the
  loss by the world size (× and ÷ it: exact for powers of 2, one rounding otherwise) and passes
  ``scale_wrt_gas=False``.
- Clipping is DeepSpeed's (``gradient_clipping``, the global norm over all partitions), set from
  ``trainer.max_grad_norm``; an Accelerate file that sets another value is refused, naming both.
  The norm is read back from ``engine.get_global_grad_norm()``.
- A non-finite gradient norm: DeepSpeed's ZeRO-2 step itself skips the update and clears the
  gradients (its overflow path, taken for an fp32 model too); the norm then reads ``inf``. A
  non-finite loss whose gradient happens to be finite is sent down the same path by one extra
  backward that makes a gradient NaN (:meth:`Zero2.step`), so nothing is applied either way.
- fp32 only (``mixed_precision: no``, ``model.dtype: fp32``): DeepSpeed's bf16/fp16 cast the
  module and keep fp32 master partitions beside it, which generation, scoring, the chunked
  lm_head kernels and kltrain's checkpoints (the model's weights are the master weights) do not
  expect yet.
- Checkpoints: each process's AdamW state over its flat fp32 partition (plain tensors); resuming
  needs the same engine and process count, the model weights are loaded before the engine is
  built (its fp32 master partitions are those weights: fp32).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import parse_flag_from_env
from torch import Tensor

from kltrain.config import ConfigError

ENGINE = "deepspeed_zero2"


def requested() -> bool:
    """Whether the launch asked for DeepSpeed (``accelerate launch`` with a DeepSpeed config sets
    ``ACCELERATE_USE_DEEPSPEED``), whatever engine Accelerate then formed."""
    return parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


def requested_stage() -> int | None:
    """The ZeRO stage the launch asked for (``ACCELERATE_DEEPSPEED_ZERO_STAGE``), or None."""
    value = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return int(value) if value not in (None, "") else None


def check_stage(stage: int | None) -> None:
    """Only ZeRO-2 runs; ZeRO-3 (and 0/1) are refused naming the stage."""
    if stage == 2:
        return
    why = {
        3: "ZeRO-3 is not supported yet: it partitions the parameters, and kltrain reads the "
        "lm_head weight outside forward (chunked divergence) and all weights for generation and "
        "scoring, which are not wired to gather them",
    }.get(stage, f"ZeRO stage {stage} is not supported")
    raise ConfigError(
        f"DeepSpeed zero_stage: {stage} in the Accelerate config: {why}. ZeRO-2 is supported "
        "(configs/accelerate/deepspeed_zero2.yaml), as are FSDP2 (configs/accelerate/fsdp.yaml) "
        "and DDP"
    )


@dataclass(frozen=True)
class Zero2Settings:
    """What kltrain takes from Accelerate's DeepSpeed plugin (its ``deepspeed_config`` keys)."""

    config: dict[str, Any]  # the engine's DeepSpeed config

    @classmethod
    def from_accelerate(
        cls,
        mixed_precision: str,
        max_grad_norm: float | None,
        micro_batch_size: int,
        world: int,
        model_dtype: str = "fp32",
        hidden_size: int | None = None,
    ) -> Zero2Settings:
        """Read the plugin Accelerate builds from the launch's environment; refuse what kltrain
        does not honour (rather than run without it)."""
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin()
        check_stage(plugin.zero_stage)
        if mixed_precision != "no":
            raise ConfigError(
                f"mixed_precision: {mixed_precision} in the Accelerate config; under DeepSpeed "
                "kltrain runs fp32 only (set mixed_precision: no; FSDP2 supports bf16)"
            )
        if model_dtype != "fp32":
            raise ConfigError(
                f"model.dtype: {model_dtype} under DeepSpeed ZeRO-2: kltrain runs it in fp32 only "
                "(it keeps fp32 master weights beside a bf16/fp16 model); set model.dtype: fp32"
            )
        ds = plugin.deepspeed_config
        zero = ds.get("zero_optimization", {})
        for key in ("offload_optimizer", "offload_param"):
            device = zero.get(key, {}).get("device", "none")
            if device not in (None, "none"):
                raise ConfigError(
                    f"{key}_device: {device} in the Accelerate config: offload is not supported "
                    "under kltrain's DeepSpeed engine (it needs DeepSpeed's CPU Adam); set none"
                )
        accumulation = ds.get("gradient_accumulation_steps", 1)
        if accumulation not in (1, "auto", None):
            raise ConfigError(
                f"gradient_accumulation_steps: {accumulation} in the Accelerate config; kltrain "
                "accumulates itself (trainer.micro_batch_size splits each update): set it to 1"
            )
        clipping = _clipping(ds.get("gradient_clipping"), max_grad_norm)
        config = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": 1,
            "train_batch_size": micro_batch_size * world,
            "managed_gradient_accumulation": False,
            "gradient_clipping": clipping,
            "zero_optimization": {**zero, "stage": 2, **_bucket_sizes(zero, hidden_size)},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": False},
            "fp16": {"enabled": False},
            "steps_per_print": 2**62,  # no progress lines of DeepSpeed's own
        }
        return cls(config=config)


def _bucket_sizes(zero: dict[str, Any], hidden_size: int | None) -> dict[str, int]:
    """The gradient reduce and weight all-gather bucket sizes (elements) the file leaves unset or
    ``auto``: hidden_size², as Accelerate's ``auto`` fills them. DeepSpeed's own default, 5e8
    elements (2 GB buffers in fp32), made tiny runs ~9× slower on this CPU (27 s vs 3 s for six
    2-step runs on 2 processes, nearly all of it system time)."""
    if not hidden_size:
        return {}
    keys = ("reduce_bucket_size", "allgather_bucket_size")
    return {k: hidden_size * hidden_size for k in keys if zero.get(k, "auto") == "auto"}


def _clipping(from_file: Any, max_grad_norm: float | None) -> float:
    """DeepSpeed's ``gradient_clipping`` (0: none) from ``trainer.max_grad_norm``; a file that
    sets another value is refused, naming both."""
    want = float(max_grad_norm) if max_grad_norm else 0.0
    if from_file in (None, "auto"):
        return want
    if float(from_file) != want:
        raise ConfigError(
            f"gradient_clipping: {from_file} in the Accelerate config but trainer.max_grad_norm="
            f"{max_grad_norm}: kltrain clips by trainer.max_grad_norm; make them equal (or remove "
            "gradient_clipping from the Accelerate file)"
        )
    return want


class TrainedModules(torch.nn.Module):
    """The one module the engine wraps: the policy's training forward (its ``forward``) and the
    algorithm's trainable modules (e.g. PPO's value head, applied to the hidden states outside
    it). DeepSpeed names every parameter it partitions from the wrapped module, so a parameter
    of the optimizer outside it is refused."""

    def __init__(self, hidden: torch.nn.Module, modules: dict[str, torch.nn.Module]):
        super().__init__()
        self.hidden = hidden
        self.algorithm_modules = torch.nn.ModuleDict(modules)

    def forward(self, *args, **kwargs) -> Tensor:
        return self.hidden(*args, **kwargs)


class Zero2:
    """The ZeRO-2 engine around the policy's training forward (module docstring)."""

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        settings: Zero2Settings,
        world: int,
    ):
        import deepspeed
        from deepspeed.runtime import constants

        if not hasattr(constants, "MANAGED_GRADIENT_ACCUMULATION"):  # an older DeepSpeed would
            raise ConfigError(  # ignore the key and reduce only every gradient_accumulation_steps
                f"DeepSpeed {deepspeed.__version__} has no managed_gradient_accumulation, which "
                "kltrain's ZeRO-2 engine needs (tested with 0.19.8): pip install -U deepspeed"
            )
        self.world = world
        self.engine, *_ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=settings.config
        )
        self._poison = next(p for p in module.parameters() if p.requires_grad)

    def backward(self, loss: Tensor) -> None:
        """Accumulate ∂loss into this process's gradient partition, summed over processes (the
        engine averages: hence × world size)."""
        self.engine.backward(loss * self.world, scale_wrt_gas=False)

    def step(self, discard: bool) -> float:
        """Clip and update (DeepSpeed's step), or with ``discard`` (a non-finite loss, the same
        on every process) leave the weights and optimizer state as they are; returns the global
        gradient norm before clipping (``inf`` when the update was skipped). Collective."""
        if discard:  # route through DeepSpeed's own skip: a NaN in a gradient makes the norm NaN
            self.engine.backward(self._poison.sum() * math.nan, scale_wrt_gas=False)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return math.inf if norm is None else float(norm)


def owned_copies(modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """Copies of ``modules`` whose tensors own their storage: ZeRO-2 turns the parameters it
    partitions into views of one flat buffer, which safetensors refuses to save (no tensor
    covers the storage). A deep copy clones each tensor (only its own elements), and keeps a
    tensor shared by two names shared. Costs one copy of the modules while a checkpoint is
    written."""
    return {name: copy.deepcopy(module) for name, module in modules.items()}
