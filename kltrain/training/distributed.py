"""Process-group set-up: build the Accelerator so that every launcher forms ONE group, and refuse
to run when the processes that were started did not join it.

Why this exists: with ``Accelerator(cpu=False)`` on a machine without CUDA, Accelerate 1.x ignores
``WORLD_SIZE`` (it only forms a CPU group when told ``cpu=True``), so ``torchrun
--nproc_per_node 2 -m kltrain fit`` used to start two unrelated single-process runs writing the
same run folder. And ``accelerate launch --cpu --num_processes 2`` always takes Accelerate's
single-process launcher (``simple_launcher``): it starts one process that cannot know two were
asked for. ``kltrain fit --num-processes N`` and the commands in the README avoid both.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
from contextlib import AbstractContextManager, nullcontext
from typing import NoReturn

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import Tensor

from kltrain.config import ConfigError, RunConfig
from kltrain.rl.reduction import Reduced, finish
from kltrain.training import deepspeed_engine, fsdp

#: Environment variables through which launchers announce the number of processes they started
#: (torchrun/Accelerate: WORLD_SIZE; MPI launchers: the others, as Accelerate reads them).
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class ProcessGroupError(ConfigError):
    """The processes a launcher started did not form one process group."""


def use_cpu(device: str) -> bool:
    """``trainer.device`` → Accelerate's ``cpu`` flag. ``auto`` means CUDA when there is one, else
    the CPU, and on the CPU a multi-process launch must say ``cpu=True`` to get a gloo group."""
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """The run's Accelerator; raises :class:`ProcessGroupError` if the launched processes did not
    all join its process group (before anything is written)."""
    log_with = "wandb" if cfg.tracking.wandb.mode != "disabled" else None
    refuse_requested_deepspeed()
    acc = Accelerator(cpu=use_cpu(cfg.trainer.device), log_with=log_with)
    check_process_group(acc.num_processes, launched_world_size())
    check_engine(acc.distributed_type.value)
    if fsdp.requested() and acc.num_processes == 1 and not dist.is_initialized():
        raise ProcessGroupError(
            "the Accelerate config asks for FSDP but this is one process without a process "
            "group: launch 2 or more (`kltrain fit CONFIG --num-processes N --accelerate-config "
            "configs/accelerate/fsdp.yaml`), or drop the FSDP config to train on one process"
        )
    if deepspeed_engine.requested() and acc.num_processes == 1:
        raise ProcessGroupError(
            f"the Accelerate config asks for DeepSpeed ZeRO-{deepspeed_engine.requested_stage()} "
            "but this is one process: launch 2 or more (`kltrain fit CONFIG --num-processes N "
            "--accelerate-config configs/accelerate/deepspeed_zero2.yaml` or "
            "deepspeed_zero3.yaml), or drop it to train on one process"
        )
    return acc


#: Accelerate engines the loop runs on: none (1 process), DDP (CPU gloo / GPU NCCL), FSDP
#: (version 2; also asked for on a CPU machine, where Accelerate reports MULTI_CPU) and DeepSpeed
#: ZeRO-2/3 (on GPUs Accelerate reports DEEPSPEED, on a CPU machine MULTI_CPU; kltrain builds the
#: engine itself, :mod:`kltrain.training.deepspeed_engine`).
SUPPORTED_ENGINES = ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP", "DEEPSPEED")


def check_engine(distributed_type: str) -> None:
    """Refuse an engine the loop is not wired to (e.g. Megatron-LM) before it wraps the policy;
    DeepSpeed's stage is checked from the launch (:func:`refuse_requested_deepspeed`)."""
    if distributed_type == "DEEPSPEED":
        deepspeed_engine.check_stage(deepspeed_engine.requested_stage())
    if distributed_type not in SUPPORTED_ENGINES:
        raise ProcessGroupError(
            f"Accelerate engine {distributed_type} is not supported by kltrain's loop yet "
            f"(supported: {', '.join(SUPPORTED_ENGINES)}); launch with "
            f"configs/accelerate/ddp.yaml, fsdp.yaml or multinode.yaml, or "
            f"`kltrain fit CONFIG --num-processes N`"
        )


def refuse_requested_deepspeed() -> None:
    """A launch that asked for DeepSpeed (``ACCELERATE_USE_DEEPSPEED``, set by ``accelerate
    launch`` from a DeepSpeed config) with another stage than ZeRO-2 or ZeRO-3 (0, 1, none named)
    is refused before the Accelerator exists, naming the stage: on a CPU machine Accelerate drops
    DeepSpeed silently and the run would otherwise train data-parallel."""
    if deepspeed_engine.requested():
        deepspeed_engine.check_stage(deepspeed_engine.requested_stage())


def engine(acc: Accelerator) -> str:
    """The engine this run trains with: ``fsdp2``, ``deepspeed_zero2``, ``deepspeed_zero3``,
    ``ddp`` or ``none`` (one process)."""
    if acc.num_processes > 1 and (fsdp.requested() or acc.distributed_type.value == "FSDP"):
        return "fsdp2"
    if acc.num_processes > 1 and deepspeed_engine.requested():
        return deepspeed_engine.requested_engine()
    return "ddp" if acc.num_processes > 1 else "none"


def launched_world_size() -> int:
    """The number of processes the launcher says it started (1 when none says)."""
    for name in WORLD_SIZE_VARIABLES:
        value = os.environ.get(name)
        if value:
            return int(value)
    return 1


def check_process_group(joined: int, launched: int) -> None:
    if joined != launched:
        raise ProcessGroupError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but this one "
            f"joined a process group of {joined}; refusing to run {launched} unrelated copies "
            f"into one run folder. On a CPU machine use trainer.device=auto or cpu; launch with "
            f"`kltrain fit CONFIG --num-processes {launched}` or `torchrun --nproc_per_node "
            f"{launched} -m kltrain fit CONFIG`"
        )


def describe(acc: Accelerator) -> str:
    """One console line: the world size, backend and device of this run."""
    backend = acc.state.backend if acc.num_processes > 1 else "none"
    return (
        f"kltrain: world_size {acc.num_processes} (engine {engine(acc)}, backend "
        f"{backend}, device {acc.device.type})"
    )


def launch_command(
    num_processes: int,
    argv: list[str],
    port: int | None = None,
    accelerate_config: str | None = None,
) -> list[str]:
    """The command ``kltrain fit --num-processes N`` runs: Accelerate's multi-process launcher
    (torchrun underneath; ``--multi_gpu`` is its name for it, on a CPU machine the processes form
    a gloo group), each process running ``python -m kltrain`` with ``argv`` (the flags removed).
    With ``accelerate_config`` (e.g. configs/accelerate/fsdp.yaml) the engine and precision are
    that file's; ``num_processes`` still overrides its count."""
    engine_args = (
        ["--config_file", accelerate_config]
        if accelerate_config
        else ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    )
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *engine_args,
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--main_process_port",
        str(port or free_port()),
        "-m",
        "kltrain",
        *argv,
    ]


def leave_process_group() -> bool:
    """At the end of a launched process: wait for every process, then close the group, so that no
    process exits while a peer still holds its connections open (NCCL warns of a group never
    destroyed). True when there was a group to leave."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    dist.destroy_process_group()
    return True


def exit_launched_process(code: int = 0) -> NoReturn:
    """End a process of a multi-process launch that has left its group: Python's exit handlers
    run (trackers flush, logs close), stdio is flushed, then ``os._exit(code)``.

    Why not a normal exit: about 1 launch in 90 on CPU (3 of 275 repeated test launches, and
    twice in CI, DDP, ZeRO-3 and ``kltrain fit`` alike) aborted after the run had written
    everything: ``terminate called without an active exception`` with no Python frame, a
    native thread still joinable while the interpreter tore down. The launcher then reports
    the finished run as failed (exit 134/SIGABRT). Skipping only that native teardown keeps
    every Python-level clean-up."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def free_port() -> int:
    """A free local TCP port for the rendezvous (the default 29500 collides between runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reduce_metrics(acc: Accelerator, metrics: dict[str, float | Reduced]) -> dict[str, float]:
    """Finish every :class:`Reduced` metric over all processes: one all-reduce (sum) of all the
    additive parts concatenated, one (max) of the max parts; plain floats pass through (they are
    already global)."""
    tagged = {k: v for k, v in metrics.items() if isinstance(v, Reduced)}
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, Reduced)}
    for kind_is_max in (False, True):
        names = [k for k, v in tagged.items() if (v.kind == "max") == kind_is_max]
        if not names:
            continue
        parts = [tagged[k].parts.to(acc.device, torch.float64) for k in names]
        flat = torch.cat(parts)
        if acc.num_processes > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.MAX if kind_is_max else dist.ReduceOp.SUM)
        for name, piece in zip(names, flat.split([p.numel() for p in parts]), strict=True):
            out[name] = finish(tagged[name].kind, piece.cpu())
    return {k: out[k] for k in metrics}  # the caller's order


class PolicyHidden(torch.nn.Module):
    """The policy's training forward as a module, so that the engine wraps it: completion hidden
    states ``[B, T, H]`` (``rollout.completion_hidden``) without the ``[B, T, V]`` logits. The
    lm_head weight is a parameter of this module (DDP reduces its gradient) although the chunked
    loss applies it outside ``forward``."""

    def __init__(self, policy: torch.nn.Module, hidden_fn):
        super().__init__()
        self.policy = policy
        self._hidden_fn = hidden_fn

    def forward(self, input_ids: Tensor, attention_mask: Tensor, prompt_length: int) -> Tensor:
        return self._hidden_fn(self.policy, input_ids, attention_mask, prompt_length)


def prepare_policy(
    acc: Accelerator, policy_hidden: PolicyHidden, settings: fsdp.Fsdp2Settings | None = None
) -> torch.nn.Module:
    """``accelerator.prepare`` the training forward: unchanged on one process (bit-exact with
    calling the policy directly), DDP over the process group otherwise, its gradient buckets
    all-reduced with a SUM (the losses are already divided by the step's global token count, so
    the processes' gradients add up to the global one; DDP's default would divide by the world
    size). With FSDP2 ``settings``: sharded in place (:func:`fsdp.shard`, gradients SUMMED too)."""
    if settings is not None:
        shard_and_init(policy_hidden, settings, acc.device)
        return policy_hidden
    prepared = acc.prepare(policy_hidden)
    if isinstance(prepared, torch.nn.parallel.DistributedDataParallel):
        prepared.register_comm_hook(state=None, hook=_sum_hook)
    return prepared


def _sum_hook(state, bucket):  # no annotations: DDP compares them as objects, not strings
    """DDP communication hook: SUM the bucket (dist.GradBucket) → Future[Tensor]."""
    del state
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def shard_and_init(
    hidden: PolicyHidden, settings: fsdp.Fsdp2Settings, device: torch.device
) -> None:
    """FSDP2-shard a :class:`PolicyHidden` root (the policy's, or the reference's, which is then
    never trained) and run its first forward, a one-token one: torch picks the root unit at the
    first forward, and generation and scoring call the model inside the root, not the root."""
    fsdp.shard(hidden, hidden.policy, settings)
    one = torch.ones(1, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        hidden(one, one, 1)
    # the root keeps its parameters gathered after a forward: free them, so that the module's
    # registered parameters (what the optimizer is given) are the shards
    hidden.reshard()


def sync_context(model: torch.nn.Module, sync: bool) -> AbstractContextManager:
    """For every micro-batch of an optimizer step but the last: DDP's ``no_sync`` (it then
    reduces the accumulated gradient once, bucketed and overlapped with the last backward), or
    FSDP2's gradient-sync switch (one reduce-scatter of the accumulated gradient)."""
    if fsdp.is_sharded(model):
        return fsdp.gradient_sync(model, sync)
    if sync or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return nullcontext()
    return model.no_sync()


#: Elements per flattened all-reduce of :func:`all_reduce_gradients` (DDP's default bucket is
#: 25 MiB; this is 100 MiB of fp32): the copy made to flatten never exceeds one bucket.
BUCKET_ELEMENTS = 25 * 2**20


def all_reduce_gradients(
    acc: Accelerator, params: list[torch.nn.Parameter], bucket: int = BUCKET_ELEMENTS
) -> None:
    """SUM the gradients of ``params`` (trainable modules outside the engine-wrapped policy:
    PPO's value head, or under DDP its separate value model) across processes, in flattened
    collectives of at most ``bucket`` elements per dtype (a larger parameter alone); a missing
    gradient counts as zero (every process must contribute the same shapes, in order)."""
    if acc.num_processes == 1 or not params:
        return
    for dtype in sorted({p.dtype for p in params}, key=str):
        group, size = [], 0
        for p in [p for p in params if p.dtype == dtype]:
            if group and size + p.numel() > bucket:
                _all_reduce_flat(group)
                group, size = [], 0
            group.append(p)
            size += p.numel()
        _all_reduce_flat(group)


def _all_reduce_flat(group: list[torch.nn.Parameter]) -> None:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for p, piece in zip(group, flat.split([g.numel() for g in grads]), strict=True):
        p.grad = piece.view_as(p).clone()


def gather_rows(acc: Accelerator, t: Tensor) -> Tensor:
    """Every process's rows of ``t`` ([B] or [B, T, ...], same B everywhere) concatenated in
    process order; dimension 1 padded with zeros (False) to the longest process's."""
    x = t.to(acc.device)
    is_bool = x.dtype == torch.bool
    if is_bool:  # gloo gathers no bool tensors
        x = x.to(torch.uint8)
    if x.dim() > 1:
        x = acc.pad_across_processes(x, dim=1, pad_index=0)
    out = acc.gather(x.contiguous())
    return out.bool() if is_bool else out


def gather_values(acc: Accelerator, x: Tensor) -> Tensor:
    """Every process's ``x`` (1-D, any length, also 0) concatenated in process order, as float64
    on the CPU: for statistics that must be those of one process holding every sample (process
    order is global sample order: contiguous shares)."""
    from accelerate.utils import gather_object

    values = gather_object([x.detach().double().cpu().tolist()])
    return torch.tensor([v for part in values for v in part], dtype=torch.float64)
