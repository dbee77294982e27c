"""DeepSpeed ZeRO-2 (optimizer state and gradients partitioned over the processes) and ZeRO-3
(the parameters partitioned too) for the policy's training forward, as an Accelerate DeepSpeed
config asks for it (``configs/accelerate/deepspeed_zero2.yaml``, ``deepspeed_zero3.yaml``).

kltrain calls ``deepspeed.initialize`` itself rather than going through ``accelerator.prepare``:
Accelerate's DeepSpeed ``backward`` runs ``engine.step()`` inside it, which leaves no place for
kltrain's own accumulation over micro-batches and its skip of an update with a non-finite loss;
and on a CPU machine Accelerate (asked with ``cpu=True`` for a gloo group) drops DeepSpeed
silently. The process group stays Accelerate's (gloo on CPU, NCCL on GPUs); DeepSpeed joins it.

What the engine is given and why (both stages):

- The torch AdamW kltrain builds (DeepSpeed's own Adam types compile C++ first), holding the
  policy's trainable parameters and the algorithm's modules (PPO's value head, its own learning
  rate) as separate param groups; the engine wraps one module holding both
  (:class:`TrainedModules`: DeepSpeed refuses an optimizer parameter outside the wrapped module),
  so ZeRO partitions and reduces the value head with the policy. kltrain's lr scheduler drives
  that AdamW's param groups, which DeepSpeed keeps.
- ``managed_gradient_accumulation: false``: each ``backward`` reduces its micro-batch's
  gradient into this process's partition and accumulates; ``step`` is the boundary. The number
  of micro-batches per update varies (the largest share of a minibatch over the processes), so
  no fixed ``gradient_accumulation_steps`` describes it.
- Gradients are SUMMED over processes: kltrain's losses are already divided by the step's global
  token count; DeepSpeed averages over the processes, so :meth:`ZeroEngine.backward` multiplies
  the loss by the world size (× and ÷ it: exact for powers of 2, one rounding otherwise) and
  passes ``scale_wrt_gas=False``.
- Clipping is DeepSpeed's (``gradient_clipping``, the global norm over all partitions), set from
  ``trainer.max_grad_norm``; an Accelerate file that sets another value is refused, naming both.
  The norm is read back from ``engine.get_global_grad_norm()``.
- A non-finite gradient norm: DeepSpeed's step itself skips the update and clears the gradients
  (ZeRO-2's overflow path; ZeRO-3's invalid-norm check, both taken for an fp32 model too); the
  norm then reads ``inf``. A non-finite loss whose gradient happens to be finite is sent down the
  same path by one extra backward that makes a gradient NaN (:meth:`ZeroEngine.step`), so
  nothing is applied either way.
- fp32 only (``mixed_precision: no``, ``model.dtype: fp32``): DeepSpeed's bf16/fp16 cast the
  module and keep fp32 master partitions beside it, which generation, scoring, the chunked
  lm_head kernels and kltrain's checkpoints (the model's weights are the master weights) do not
  expect yet. Offload is refused (it needs DeepSpeed's compiled CPU Adam).

ZeRO-3: each process holds 1/N of every parameter above ``stage3_param_persistence_threshold``
elements (10 × hidden size unless the file sets it, as Accelerate's ``auto``); outside a module's
forward/backward such a parameter holds 0 elements. What kltrain does about it:

- The training forward's chunked lm_head loss applies the lm_head weight outside the decoder's
  forward: it runs inside the forward of :class:`LmHeadCall` (a submodule of the engine's module
  without parameters of its own), with the lm_head weight and bias registered as its external
  parameters, so ZeRO-3 gathers them for that forward and its backward. DeepSpeed releases an
  external parameter only when the step partitions every parameter: one all-gather of V×H per
  optimizer step, held (V×H extra memory) through the update's micro-batches. Tied embeddings
  are one parameter, used by the embedding and by :class:`LmHeadCall`, its gradient the sum of
  both uses.
- Generation, the scoring passes (old log-probs, reference, PPO's values) and held-out
  evaluation run inside :meth:`ZeroEngine.gathered`: DeepSpeed's own
  ``unwrap_model_for_generation`` (all parameters gathered once on entry, the engine's
  per-module hooks removed so that no forward gathers or releases anything, hooks re-registered
  and the parameters partitioned again on exit). Peak memory there is a full copy of the
  weights, as DDP holds all the time. Generation never uses ``synced_gpus``.
- A separate reference is partitioned with the policy: it is a frozen submodule of the engine's
  module (:class:`TrainedModules`, no gradient, no optimizer state), so ZeRO-3 splits it like
  the rest; the scoring passes read it inside :meth:`ZeroEngine.gathered`, and the exact
  divergence in the loss reads its lm_head inside :class:`LmHeadCall` (registered as an
  external parameter, as the policy's). With LoRA one model serves both roles (adapters
  disabled). Under ZeRO-2 the reference stays whole (ZeRO-2 does not partition parameters).
  f-DPG's offline proposal stays whole on every process (its replacement by the policy loads
  the gathered policy weights into it).
- Weight prefetching is off (``stage3_prefetch_bucket_size: 0``; a file that sets another value
  is refused): DeepSpeed prefetches along the module order it traced, and one process whose
  trace diverged (a module run on one process and not on another) would stop prefetching while
  the others go on, so that their all-gathers no longer pair up. kltrain runs the same modules
  in the same order on every process (a micro-batch with no valid token included), but the
  prefetching path is not tested; each parameter is gathered when its module runs.
- ``zero3_init_flag`` is refused (every process loads the full model, then the engine partitions
  it): building the model inside ``deepspeed.zero.Init`` is not wired into model loading.
- ``zero3_save_16bit_model`` (``stage3_gather_16bit_weights_on_model_save``) is refused: kltrain
  writes the full fp32 weights to ``model/`` and ``final/`` itself (gathered onto process 0,
  :meth:`ZeroEngine.full_state_dict`), whatever that key says.

Checkpoints: each process's AdamW state over its flat fp32 partition (plain tensors; ZeRO-3:
taken through the optimizer's ``state_dict``, which puts the partitions back into the AdamW's
param groups for the moment); resuming needs the same engine and process count, the model
weights are loaded before the engine is built (its fp32 master partitions are those weights).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import parse_flag_from_env
from torch import Tensor

from kltrain.config import ConfigError

#: The engine name (state.json, config.yaml, ``engine`` in the logs) per ZeRO stage.
ENGINES = {2: "deepspeed_zero2", 3: "deepspeed_zero3"}
ENGINE = ENGINES[2]
ENGINE_ZERO3 = ENGINES[3]


def requested() -> bool:
    """Whether the launch asked for DeepSpeed (``accelerate launch`` with a DeepSpeed config sets
    ``ACCELERATE_USE_DEEPSPEED``), whatever engine Accelerate then formed."""
    return parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


def requested_stage() -> int | None:
    """The ZeRO stage the launch asked for (``ACCELERATE_DEEPSPEED_ZERO_STAGE``), or None."""
    value = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return int(value) if value not in (None, "") else None


def requested_engine() -> str:
    """The engine name of the stage the launch asked for (checked: 2 or 3)."""
    stage = requested_stage()
    check_stage(stage)
    return ENGINES[stage]


def check_stage(stage: int | None) -> None:
    """ZeRO-2 and ZeRO-3 run; any other stage (0, 1, none named) is refused naming it."""
    if stage in ENGINES:
        return
    raise ConfigError(
        f"DeepSpeed zero_stage: {stage} in the Accelerate config: ZeRO stage {stage} is not "
        "supported. ZeRO-2 and ZeRO-3 are (configs/accelerate/deepspeed_zero2.yaml, "
        "deepspeed_zero3.yaml), as are FSDP2 (configs/accelerate/fsdp.yaml) and DDP"
    )


@dataclass(frozen=True)
class ZeroSettings:
    """What kltrain takes from Accelerate's DeepSpeed plugin (its ``deepspeed_config`` keys)."""

    config: dict[str, Any]  # the engine's DeepSpeed config

    @property
    def stage(self) -> int:
        return int(self.config["zero_optimization"]["stage"])

    @classmethod
    def from_accelerate(
        cls,
        mixed_precision: str,
        max_grad_norm: float | None,
        micro_batch_size: int,
        world: int,
        model_dtype: str = "fp32",
        hidden_size: int | None = None,
    ) -> ZeroSettings:
        """Read the plugin Accelerate builds from the launch's environment; refuse what kltrain
        does not honour (rather than run without it)."""
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin()
        stage = plugin.zero_stage
        check_stage(stage)
        name = f"ZeRO-{stage}"
        if mixed_precision != "no":
            raise ConfigError(
                f"mixed_precision: {mixed_precision} in the Accelerate config; under DeepSpeed "
                "kltrain runs fp32 only (set mixed_precision: no; FSDP2 supports bf16)"
            )
        if model_dtype != "fp32":
            raise ConfigError(
                f"model.dtype: {model_dtype} under DeepSpeed {name}: kltrain runs it in fp32 only "
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
        if stage == 3:
            _check_zero3(plugin, zero)
        clipping = _clipping(ds.get("gradient_clipping"), max_grad_norm)
        sizes = _bucket_sizes(zero, hidden_size, stage)
        config = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": 1,
            "train_batch_size": micro_batch_size * world,
            "managed_gradient_accumulation": False,
            "gradient_clipping": clipping,
            "zero_optimization": {**zero, "stage": stage, **sizes},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": False},
            "fp16": {"enabled": False},
            "steps_per_print": 2**62,  # no progress lines of DeepSpeed's own
        }
        return cls(config=config)


def _check_zero3(plugin, zero: dict[str, Any]) -> None:
    """ZeRO-3 keys kltrain does not honour, refused by name (module docstring: why)."""
    if plugin.zero3_init_flag:
        raise ConfigError(
            "zero3_init_flag: true in the Accelerate config: kltrain does not build the model "
            "inside deepspeed.zero.Init (every process loads the full model, then the ZeRO-3 "
            "engine partitions it); set zero3_init_flag: false"
        )
    if zero.get("stage3_gather_16bit_weights_on_model_save"):
        raise ConfigError(
            "zero3_save_16bit_model: true (stage3_gather_16bit_weights_on_model_save) in the "
            "Accelerate config: kltrain runs fp32 and always writes the full fp32 weights to "
            "model/ and final/ itself; set zero3_save_16bit_model: false"
        )
    prefetch = zero.get("stage3_prefetch_bucket_size", "auto")
    if prefetch not in ("auto", 0):
        raise ConfigError(
            f"stage3_prefetch_bucket_size: {prefetch} in the DeepSpeed config: kltrain runs "
            "ZeRO-3 without prefetching (untested: a process whose traced module order diverged "
            "would stop prefetching alone, and the all-gathers would no longer pair up across "
            "processes); set 0 or auto"
        )


def _bucket_sizes(zero: dict[str, Any], hidden_size: int | None, stage: int) -> dict[str, int]:
    """The sizes (elements) the file leaves unset or ``auto``, as Accelerate's ``auto`` fills
    them: gradient reduce and (ZeRO-2) weight all-gather buckets hidden_size²; ZeRO-3 keeps
    parameters of at most 10 × hidden_size elements whole on every process (norms, biases, a
    value head). DeepSpeed's own bucket default, 5e8 elements (2 GB buffers in fp32), made tiny
    runs ~9× slower on this CPU (27 s vs 3 s for six 2-step runs on 2 processes, nearly all of
    it system time). ZeRO-3's prefetch is off (0; :func:`_check_zero3`)."""
    out: dict[str, int] = {}
    if stage == 3:
        out["stage3_prefetch_bucket_size"] = 0
    if not hidden_size:
        return out
    sizes = {"reduce_bucket_size": hidden_size * hidden_size}
    if stage == 2:
        sizes["allgather_bucket_size"] = hidden_size * hidden_size
    else:
        sizes["stage3_param_persistence_threshold"] = 10 * hidden_size
    out.update({k: v for k, v in sizes.items() if zero.get(k, "auto") == "auto"})
    return out


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


class LmHeadCall(torch.nn.Module):
    """``fn(hidden)`` run inside this module's forward. Under ZeRO-3 the lm_head weight (and
    bias) are registered as its external parameters (:meth:`ZeroEngine.__init__`), so DeepSpeed
    gathers them for this forward and for its backward: the chunked lm_head loss reads them
    inside ``fn``. No parameters of its own. ``hidden`` must be a tensor that requires grad
    (DeepSpeed hangs its post-backward release on the inputs)."""

    def forward(self, hidden: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        return fn(hidden)


class TrainedModules(torch.nn.Module):
    """The one module the engine wraps: the policy's training forward (its ``forward``), the
    algorithm's trainable modules (e.g. PPO's value head, applied to the hidden states outside
    it) and :class:`LmHeadCall`. DeepSpeed names every parameter it partitions from the wrapped
    module, so a parameter of the optimizer outside it is refused. ``frozen``: models that are
    never trained but partitioned with the rest under ZeRO-3 (a separate reference), read only
    on gathered weights or, for their lm_head, inside :class:`LmHeadCall`."""

    def __init__(
        self,
        hidden: torch.nn.Module,
        modules: dict[str, torch.nn.Module],
        frozen: dict[str, torch.nn.Module] | None = None,
    ):
        super().__init__()
        self.hidden = hidden
        self.algorithm_modules = torch.nn.ModuleDict(modules)
        self.frozen = torch.nn.ModuleDict(frozen or {})
        self.lm_head_call = LmHeadCall()

    def forward(self, *args, **kwargs) -> Tensor:
        return self.hidden(*args, **kwargs)


class ZeroEngine:
    """The ZeRO-2/3 engine around the policy's training forward (module docstring)."""

    def __init__(
        self,
        module: TrainedModules,
        optimizer: torch.optim.Optimizer,
        settings: ZeroSettings,
        world: int,
        lm_head: list[Tensor] | None = None,
    ):
        """``lm_head``: the lm_head weights and biases the loss reads (the policy's, and under
        LoRA the reference's: the same base weight), registered with :class:`LmHeadCall`."""
        import deepspeed
        from deepspeed.runtime import constants

        if not hasattr(constants, "MANAGED_GRADIENT_ACCUMULATION"):  # an older DeepSpeed would
            raise ConfigError(  # ignore the key and reduce only every gradient_accumulation_steps
                f"DeepSpeed {deepspeed.__version__} has no managed_gradient_accumulation, which "
                "kltrain's ZeRO engine needs (tested with 0.19.8): pip install -U deepspeed"
            )
        self.world = world
        self.stage = settings.stage
        if self.stage == 3 and not hasattr(_stage3(), "unwrap_model_for_generation"):
            raise ConfigError(  # (gathered(): checked before the engine is built, not mid-run)
                f"DeepSpeed {deepspeed.__version__} has no "
                "deepspeed.runtime.zero.stage3.unwrap_model_for_generation, which kltrain's "
                "ZeRO-3 generation needs (tested with 0.19.8): pip install -U deepspeed"
            )
        self.engine, *_ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=settings.config
        )
        self.module = module
        trainable = [p for p in module.parameters() if p.requires_grad]
        self._poison = trainable[0]
        if self.stage == 3:  # the poison is read inside LmHeadCall: its smallest trainable one
            self._poison = min(trainable, key=lambda p: p.ds_numel)
            registered: set[int] = set()
            for t in [*(lm_head or []), self._poison]:
                if t is not None and hasattr(t, "ds_id") and id(t) not in registered:
                    registered.add(id(t))
                    deepspeed.zero.register_external_parameter(module.lm_head_call, t)

    def head_call(self, hidden: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """``fn(hidden)`` with the lm_head weight readable: inside :class:`LmHeadCall`'s forward
        under ZeRO-3 (every process must call it as often as the others: it gathers)."""
        if self.stage == 3:
            return self.module.lm_head_call(hidden, fn)
        return fn(hidden)

    def backward(self, loss: Tensor) -> None:
        """Accumulate ∂loss into this process's gradient partition, summed over processes (the
        engine averages: hence × world size)."""
        self.engine.backward(loss * self.world, scale_wrt_gas=False)

    def step(self, discard: bool) -> float:
        """Clip and update (DeepSpeed's step), or with ``discard`` (a non-finite loss, the same
        on every process) leave the weights and optimizer state as they are; returns the global
        gradient norm before clipping (``inf`` when the update was skipped). Collective."""
        if discard:  # route through DeepSpeed's own skip: a NaN in a gradient makes the norm NaN
            poison = self._poison
            if self.stage == 3:  # a partitioned parameter is empty outside a forward: gather it
                zero = torch.zeros((), device=poison.ds_tensor.device, requires_grad=True)
                total = self.head_call(zero, lambda h: h + poison.sum())
            else:
                total = poison.sum()
            self.engine.backward(total * math.nan, scale_wrt_gas=False)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return math.inf if norm is None else float(norm)

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """Inside: every parameter of the engine's module whole on every process, and no
        DeepSpeed hook on any forward (ZeRO-3; a no-op under ZeRO-2). Collective on entry and
        exit: every process must enter it."""
        if self.stage != 3:
            yield
            return
        with _stage3().unwrap_model_for_generation(self.engine):
            yield

    def full_parameters(self) -> Any:
        """A context in which every parameter is whole without touching the hooks (for reading
        weights: checkpoints, the weights-finite check); a no-op under ZeRO-2. Collective."""
        if self.stage != 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()))

    def full_state_dict(self, model: torch.nn.Module, main: bool) -> dict[str, Tensor] | None:
        """ZeRO-3: ``model``'s full weights, on the CPU of the main process (None elsewhere), each
        storage copied once (tied weights stay tied). Collective: every process calls it."""
        with self.full_parameters():
            return _owned_state(model) if main else None

    def full_module_copies(
        self, modules: dict[str, torch.nn.Module], main: bool
    ) -> dict[str, torch.nn.Module]:
        """What a checkpoint writes for the algorithm's trainable modules: under ZeRO-2 copies
        owning their storage (:func:`owned_copies`), under ZeRO-3 their full weights gathered
        (:class:`StateHolder`; empty on the other processes). Collective under ZeRO-3."""
        if self.stage != 3:
            return owned_copies(modules) if main else {}
        with self.full_parameters():
            if not main:
                return {}
            return {name: StateHolder(_owned_state(m)) for name, m in modules.items()}

    def local_weights(self, params: list[Tensor]) -> list[Tensor]:
        """This process's part of each parameter: ZeRO-3's partition (``ds_tensor``) without its
        padding, else the parameter itself (ZeRO-2 keeps the weights whole on every process).
        A partition holds ⌈numel/N⌉ elements; the last ones' tail past ``numel`` is padding,
        never written (uninitialised memory: NaN under torch's deterministic mode)."""
        if self.stage != 3:
            return [p.detach() for p in params]
        out = []
        for p in params:
            part = p.ds_tensor.detach()
            rank = torch.distributed.get_rank(group=p.ds_process_group)
            valid = min(max(p.ds_numel - rank * part.numel(), 0), part.numel())
            out.append(part.narrow(0, 0, valid))
        return out

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """This process's AdamW state over its flat fp32 partitions (plain tensors). ZeRO-3 keeps
        the partitions out of the AdamW's param groups between steps: its ``state_dict`` puts
        them back for the moment."""
        if self.stage != 3:
            return optimizer.state_dict()
        from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT

        return self.engine.optimizer.state_dict()[OPTIMIZER_STATE_DICT]

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Inverse of :meth:`optimizer_state` (same process count). ZeRO-3: through its
        ``load_state_dict``, with the fp32 partitions it already holds (built from the loaded
        weights, so equal to the saved ones) and its own loss scaler (fp32: none)."""
        if self.stage != 3:
            optimizer.load_state_dict(state)
            return
        from deepspeed.checkpoint.constants import (
            FP32_FLAT_GROUPS,
            LOSS_SCALER,
            OPTIMIZER_STATE_DICT,
        )

        zero = self.engine.optimizer
        full = {
            LOSS_SCALER: zero.loss_scaler,
            "dynamic_loss_scale": zero.dynamic_loss_scale,
            "overflow": False,
            OPTIMIZER_STATE_DICT: state,
            FP32_FLAT_GROUPS: [t.detach().clone() for t in zero.fp32_partitioned_groups_flat],
        }
        zero.load_state_dict([full] * self.world)


def _stage3():
    from deepspeed.runtime.zero import stage3

    return stage3


class StateHolder(torch.nn.Module):
    """A module standing for another one's full weights (``state_dict()`` returns them): what
    the checkpoint writer and ``save_file`` read from a ZeRO-3 module, whose own parameters are
    partitions."""

    def __init__(self, state: dict[str, Tensor]):
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs) -> dict[str, Tensor]:
        return dict(self._state)


def _owned_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` copied to the CPU, one copy per storage (tied weights stay one
    tensor under two names, as ``save_pretrained`` expects them)."""
    copies: dict[int, Tensor] = {}
    out = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else (id(t),)
        if key not in copies:
            copies[key] = t.detach().to("cpu", copy=True)
        out[name] = copies[key]
    return out


def owned_copies(modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """Copies of ``modules`` whose tensors own their storage: ZeRO-2 turns the parameters it
    partitions into views of one flat buffer, which safetensors refuses to save (no tensor
    covers the storage). A deep copy clones each tensor (only its own elements), and keeps a
    tensor shared by two names shared. Costs one copy of the modules while a checkpoint is
    written."""
    return {name: copy.deepcopy(module) for name, module in modules.items()}
