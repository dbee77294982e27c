"""Run several tiny configs in one launch (1 process, or N under torchrun), recording each step's
sampled token ids in global sample order, for the world-size equivalence tests.

``python -m tests.helpers.world_runs SPEC.json`` or ``torchrun --nproc_per_node 2 -m
tests.helpers.world_runs SPEC.json``; SPEC is ``{"configs": [path, ...]}``. Each run writes
``token_ids.jsonl`` (one line per step: ``{"step", "ids": [[...] per global sample]}``, the
completion tokens up to and including EOS) into its ``trainer.output_dir``, besides what the
loop writes. One launch serves several runs because starting a process costs seconds here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate.utils import gather_object

from kltrain.config import load_config
from kltrain.training.distributed import exit_launched_process, leave_process_group
from kltrain.training.trainer import Trainer


def _record_token_ids(trainer: Trainer) -> None:
    """Wrap this trainer's ``make_rollout`` (an instance attribute: production code has no test
    hook) so that every rollout's completion ids are gathered in global sample order."""
    original = trainer.make_rollout
    out = Path(trainer.output_dir) / "token_ids.jsonl"

    def make_rollout(clock=None):
        rollout = original(clock)
        ids = [
            row[mask].tolist()
            for row, mask in zip(rollout.completion_ids, rollout.completion_mask, strict=True)
        ]
        if trainer.accelerator.num_processes > 1:
            ids = gather_object(ids)  # rank order = global sample order (contiguous shares)
        if trainer.accelerator.is_main_process:
            with out.open("a") as f:
                f.write(json.dumps({"step": trainer.state.step + 1, "ids": ids}) + "\n")
        return rollout

    trainer.make_rollout = make_rollout


def _algorithm(trainer: Trainer):
    return trainer.algorithm.modules().items()


def _local(p) -> int:
    """Elements this process holds: an FSDP2 DTensor's shard, a ZeRO-3 partition, else all."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.numel()
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def _full(p) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def _record_module_shards(trainer: Trainer) -> None:
    """``modules.json``: per algorithm module (its trainable parameters) and for a separate
    reference, the elements this process holds and their full count (a module the engine shards
    holds about 1/world of them)."""
    shares = {}
    modules = {n: [p for p in m.parameters() if p.requires_grad] for n, m in _algorithm(trainer)}
    if trainer.models.reference is not None:
        modules["reference"] = list(trainer.models.reference.parameters())
    for name, params in modules.items():
        shares[name] = {"local": sum(map(_local, params)), "full": sum(map(_full, params))}
    shares = gather_object([shares]) if trainer.accelerator.num_processes > 1 else [shares]
    if trainer.accelerator.is_main_process:  # the run folder exists once fit() starts
        Path(trainer.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(trainer.output_dir) / "modules.json").write_text(json.dumps(shares))


def main(spec_path: str) -> None:
    torch.use_deterministic_algorithms(True)
    spec = json.loads(Path(spec_path).read_text())
    for config in spec["configs"]:
        trainer = Trainer(load_config(config))
        _record_token_ids(trainer)
        _record_module_shards(trainer)
        trainer.fit()
    leave_process_group()
    exit_launched_process()


if __name__ == "__main__":
    main(sys.argv[1])
