"""Saving and restoring the trainer's state: atomic checkpoints (every process's part of a
sharded state written by that process), resuming, setting aside an abandoned timeline, and the
stop on SIGTERM/SIGUSR1 with a complete checkpoint. A part of :class:`Trainer`
(:mod:`kltrain.training.trainer`); the file format is :mod:`kltrain.training.checkpoint`'s."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from accelerate.utils import gather_object
from safetensors.torch import save_file

from kltrain.config import to_yaml
from kltrain.training import checkpoint, deepspeed_engine, fsdp, preemption, run_folder

#: Engines whose optimizer state is sharded over the processes: checkpointed per process.
SHARDING_ENGINES = frozenset({"fsdp2", *deepspeed_engine.ENGINES.values()})


class CheckpointMixin:
    """The :class:`~kltrain.training.trainer.Trainer` methods that save, restore and resume."""

    def _set_aside_abandoned(self, resume_from: Path | None, restart: bool) -> None:
        """Keep, under ``abandoned/``, what a timeline this run does not continue left behind:
        the checkpoints newer than the one resumed and ``final/`` (moved), and the logs that are
        about to be cut back (copied); or, for a ``--resume`` restart of a run that never saved
        a checkpoint, that run's files (moved)."""
        out = self.output_dir
        if resume_from is None:
            moved = run_folder.leftover_files(out) if restart else []
            copied, why = [], "restart-without-checkpoint"
        else:
            step = self.state.step
            newer = [
                p
                for p in checkpoint.list_complete(out / "checkpoints")
                if int(p.name.removeprefix(checkpoint.PREFIX)) > step
            ]
            if not newer:
                return
            moved = [*newer, out / "final"]
            copied, why = [out / "metrics.jsonl", out / "samples.jsonl"], f"after-step-{step}"
        dest = run_folder.set_aside(out, moved, copied, why)
        if dest is not None:
            names = ", ".join(p.name for p in moved if not p.exists())
            print(f"kltrain: moved the abandoned timeline's {names} to {dest}", flush=True)

    def save_checkpoint(self, captured: dict[str, Any] | None = None) -> Path | None:
        """Checkpoint the current state, or ``captured`` (from :meth:`_capture`) with the current
        weights and optimizer when a step was abandoned before updating them."""
        captured = captured or self._capture()
        rng = [captured["rng"]]
        if self.accelerator.num_processes > 1:
            rng = gather_object(rng)
        staging = None
        model_state = self._gathered_policy_state()
        modules = self._algorithm_modules(saving=True)
        if self.engine in SHARDING_ENGINES:
            staging = self._stage_optimizer_state(captured["step"])
        self.accelerator.wait_for_everyone()
        self._saved_step = captured["step"]
        if not self.accelerator.is_main_process:
            return None
        extra = {"gradient_followed": self.regulariser.gradient.key}
        states = {
            **captured["states"],
            "world_size": self.accelerator.num_processes,
            "engine": self.engine,
        }
        return checkpoint.save(
            self.output_dir / "checkpoints",
            step=captured["step"],
            model=self.models.policy,
            modules=modules,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            states=states,
            rng=rng,
            config_text=to_yaml(self.cfg, extra),
            keep_last=self.cfg.trainer.keep_last,
            model_state=model_state,
            optimizer_staging=staging,
        )

    def _stage_optimizer_state(self, step: int) -> Path:
        """Each process writes the optimizer state of its own shards (FSDP2: DTensor locals;
        ZeRO: its flat partition's AdamW state) into a staging folder that process 0 moves into
        the checkpoint: no process's state passes through another's memory, as a gather to
        process 0 would (for a 70B policy, its whole fp32 Adam state)."""
        acc = self.accelerator
        staging = checkpoint.staging_folder(self.output_dir / "checkpoints", step)
        if acc.is_main_process:
            checkpoint.prepare_staging(staging)
        acc.wait_for_everyone()
        error = checkpoint.write_process_state(staging, acc.process_index, self._local_state())
        errors = [e for e in gather_object([(acc.process_index, error)]) if e[1] is not None]
        if errors:  # every process stops the same way; the previous checkpoint stays
            acc.wait_for_everyone()
            if acc.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
            index, why = errors[0]
            raise checkpoint.CheckpointError(
                f"could not write process {index}'s optimizer state for the checkpoint of step "
                f"{step} into {staging}: {why}; nothing was marked complete, the previous "
                f"checkpoint is kept. Free space (or fix the folder's permissions) and rerun "
                f"with --resume"
            )
        return staging

    def _capture(self) -> dict[str, Any]:
        """Everything but the weights and optimizer, as plain JSON-ready values; cheap enough to
        take at the start of every step (so that a step can be abandoned)."""
        return {
            "step": self.state.step,
            "states": {
                "trainer": {
                    **self.state.state_dict(),
                    "minibatch_generator": checkpoint.encode_state(
                        self.minibatch_generator.get_state()
                    ),
                },
                "sampler": self.sampler.state_dict(),
                "coef": self.coef.state_dict(),
                "algorithm": self.algorithm.state_dict(),
                "reward": self.reward_fn.state_dict(),
            },
            "rng": checkpoint.capture_rng(),
        }

    def _restore(self, path: Path) -> None:
        """Load a complete checkpoint over the freshly built trainer (its weights are already
        loaded: before sharding)."""
        state = checkpoint.load_state(path)
        if self.engine in SHARDING_ENGINES:  # this process's state, of its own shards
            optimizer_state = checkpoint.load_process_state(path, self.accelerator.process_index)
        else:
            optimizer_state = checkpoint.load_tensors(path / "optimizer.pt")
        if self.engine == "fsdp2":
            fsdp.load_local_optimizer_state(self.optimizer, optimizer_state)
        elif self.zero is not None:  # its AdamW over this process's flat partition
            self.zero.load_optimizer_state(self.optimizer, optimizer_state)
        else:
            self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(checkpoint.load_tensors(path / "scheduler.pt"))
        self.sampler.load_state_dict(state["sampler"])
        self.coef.load_state_dict(state["coef"])
        self.algorithm.load_state_dict(state["algorithm"])
        self.reward_fn.load_state_dict(state["reward"])
        trainer_state = state["trainer"]
        self.state.load_state_dict(trainer_state, step=int(state["step"]))
        self.minibatch_generator.set_state(
            checkpoint.decode_state(trainer_state["minibatch_generator"])
        )
        records = checkpoint.load_rng(path)
        if self.accelerator.process_index < len(records):
            checkpoint.restore_rng(records[self.accelerator.process_index])
        self._saved_step = self.state.step
        if self.accelerator.is_main_process:
            print(f"kltrain: resumed from {path} (step {self.state.step})", flush=True)

    def _check_config(self, path: Path, allow: bool) -> None:
        state = checkpoint.load_state(path)
        saved = checkpoint.load_config_dict(path) or {}
        changes = checkpoint.config_changes(saved, self.cfg.model_dump(mode="json"))
        world = state.get("world_size", 1)
        if world != self.accelerator.num_processes:
            changes.append(f"processes: {world} → {self.accelerator.num_processes}")
        saved_engine = state.get("engine", "none" if world == 1 else "ddp")
        sharded = SHARDING_ENGINES & {saved_engine, self.engine}
        if sharded and (saved_engine, world) != (self.engine, self.accelerator.num_processes):
            # the optimizer state is stored per process, of its shards: no resharding
            raise checkpoint.CheckpointError(
                f"{path} was written by {world} processes with engine {saved_engine}; this run "
                f"is {self.accelerator.num_processes} with engine {self.engine}. An FSDP2 or "
                "DeepSpeed checkpoint's optimizer state is per process: resume it with the same "
                "engine and process count (its model/ folder holds the full weights for a new run)"
            )
        if not changes:
            return
        listing = "\n  ".join(changes)
        if not allow:
            raise checkpoint.CheckpointError(
                f"resuming {path} with a config that changes the run:\n  {listing}\n"
                f"restore these values, or pass --allow-config-change to continue anyway "
                f"(the result is then not the run the checkpoint started)"
            )
        if self.accelerator.is_main_process:
            print(f"kltrain: resuming with config changes (allowed):\n  {listing}", flush=True)

    def _stop_for_signal(self, captured: dict[str, Any] | None = None) -> None:
        """Write a complete checkpoint (unless this step's already exists), requeue under SLURM
        after SIGUSR1, and raise :class:`preemption.Preempted`."""
        step = captured["step"] if captured else self.state.step
        if self._saved_step != step:
            self.save_checkpoint(captured)
        signum = self.watcher.signum or preemption.signal.SIGTERM
        requeued = preemption.requeue(signum) if self.accelerator.is_main_process else None
        where = self.output_dir / "checkpoints" / f"{checkpoint.PREFIX}{step:08d}"
        raise preemption.Preempted(signum, step, str(where), requeued)

    def save_final(self) -> None:
        weights = self._gathered_policy_state()
        saved = self._algorithm_modules(saving=True)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            final = self.output_dir / "final"
            given = {} if weights is None else {"state_dict": weights}
            self.models.policy.save_pretrained(final, safe_serialization=True, **given)
            self.models.tokenizer.save_pretrained(final)
            for name in self.algorithm.modules():
                state = saved[name] if isinstance(saved[name], dict) else saved[name].state_dict()
                save_file(state, str(final / f"{name}.safetensors"))

    def _checkpoint_note(self) -> str:
        """What a stopped run leaves to resume from, stated truthfully."""
        found = checkpoint.latest(self.output_dir / "checkpoints")
        if found is None:
            return "no checkpoint was written yet (trainer.save_every sets how often)"
        return f"the last checkpoint, {found}, is intact"
