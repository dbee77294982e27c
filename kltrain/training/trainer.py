"""The Accelerate loop: the one place that knows about processes and devices.

One step: sample this process's share of the step's prompts → generate k completions each →
measure per-token statistics (policy, reference, exact divergences) → score → advantages →
optimise (micro-batches, losses normalised by the step's *global* valid-token count, gradients
summed across processes) → update β → log (metrics reduced across processes, files written by the
main process only) → checkpoint.

Resuming (``trainer.resume`` / ``kltrain fit --resume``) rebuilds everything from the config, then
loads a checkpoint over it (:meth:`Trainer._restore`): the run continues bit for bit. SIGTERM and
SIGUSR1 stop the run at the next safe point with a complete checkpoint
(:mod:`kltrain.training.preemption`).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import shutil
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from safetensors.torch import save_file
from torch import Tensor
from transformers import get_scheduler

from kltrain.algorithms import TrainBatch, make_algorithm
from kltrain.config import ConfigError, RunConfig, prompts_per_process, to_yaml
from kltrain.data import (
    PromptSampler,
    load_prompts,
    process_share,
    render_prompt,
    split_heldout,
)
from kltrain.divergence.functions import get_divergence
from kltrain.divergence.lm_head import TokenChunk, fused_token_loss
from kltrain.evaluation import evaluate_policy, training_eval_data
from kltrain.models.loading import Models, load_models, refuse_fp16_on_cpu
from kltrain.models.logits import lm_head_params
from kltrain.models.sampling import sample_seed
from kltrain.objective import LOGGED_DIVERGENCES, build_regulariser, optimizer_steps_per_batch
from kltrain.prompt_length import count_truncated, screen_long_prompts
from kltrain.rewards import RewardFunction
from kltrain.rl.coef import make_coef
from kltrain.rl.reduction import max_of
from kltrain.rollout import Rollout, completion_hidden, measure, sample_rollout, tempered
from kltrain.training import checkpoint, deepspeed_engine, distributed, fsdp, preemption, run_folder
from kltrain.training.tracking import RunLogger, StepResult

#: Engines whose optimizer state is sharded over the processes: checkpointed per process.
SHARDING_ENGINES = frozenset({"fsdp2", *deepspeed_engine.ENGINES.values()})
#: Per-token statistics summed inside the lm_head kernel over this process's tokens (each
#: already divided by the global token count), so the processes' sums add up to the global value.
LOCAL_TOKEN_SUMS = ("clip_fraction", "approx_kl_old", "importance_ratio_mean")


class TrainingStopped(RuntimeError):
    """The run stopped itself (a guard fired); the message says at which step and why."""


class _StepAbandoned(Exception):
    """A stop signal arrived before the step's first optimizer update: the step is dropped and
    the checkpoint records the state from before it."""


@dataclass
class TrainerState:
    step: int = 0
    consecutive_skips: int = 0
    skipped_steps: int = 0
    wandb_run_id: str = field(default_factory=lambda: secrets.token_hex(4))

    def state_dict(self) -> dict[str, Any]:
        return {
            "consecutive_skips": self.consecutive_skips,
            "skipped_steps": self.skipped_steps,
            "wandb_run_id": self.wandb_run_id,
        }

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        self.step = step
        self.consecutive_skips = int(state["consecutive_skips"])
        self.skipped_steps = int(state["skipped_steps"])
        self.wandb_run_id = str(state["wandb_run_id"])


class Trainer:
    """Build everything a config names, then ``fit()``.

    ``resume`` (default ``trainer.resume``): ``"auto"`` or a checkpoint/run folder to continue;
    ``allow_config_change`` lets a resume proceed although run-changing config fields differ."""

    def __init__(
        self,
        cfg: RunConfig,
        accelerator: Accelerator | None = None,
        resume: str | None = None,
        allow_config_change: bool = False,
        overwrite: bool = False,
        config_path: str | None = None,
    ):
        resume = resume or cfg.trainer.resume
        resume_from = None
        if resume:
            run_dir, resume_from = checkpoint.find_resume(resume, cfg.trainer.output_dir)
            cfg = cfg.model_copy(deep=True)
            cfg.trainer.output_dir = str(run_dir)
        self.cfg = cfg
        self.accelerator = accelerator or distributed.make_accelerator(cfg)
        acc = self.accelerator
        self.engine = distributed.engine(acc)
        if acc.is_main_process:
            print(distributed.describe(acc), flush=True)
        set_seed(cfg.seed, device_specific=True)  # per-process RNG (dropout); sampling: per sample
        self.output_dir = _shared_output_dir(cfg, acc)
        run_folder.check_writable(self.output_dir)
        if not resume:
            _refuse_existing_checkpoints(self.output_dir)
        if resume_from is None:
            run_folder.check_fresh_start(self.output_dir, config_path, overwrite or bool(resume))
        refuse_fp16_on_cpu(cfg.model, acc.device.type)
        self.regulariser = build_regulariser(cfg.kl, optimizer_steps_per_batch(cfg))
        prompts_per_process(cfg, acc.num_processes)  # the step's prompts split evenly: check now
        _check_minibatches(cfg, acc.num_processes)
        with _process_zero_random_init(cfg.seed, acc.process_index):
            self.models: Models = load_models(cfg.model)
        self.models.policy.to(acc.device)
        if self.models.reference is not None:
            self.models.reference.to(acc.device)
        self.full_dataset = load_prompts(cfg.data)
        train, self.heldout = split_heldout(self.full_dataset, cfg.data)  # never trained on
        self.dataset = screen_long_prompts(train, self.models.tokenizer, cfg.data)
        self.sampler = PromptSampler(len(self.dataset), seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.reward_fn = RewardFunction(
            cfg.reward, device=acc.device, trust_remote_code=cfg.model.trust_remote_code
        )
        adaptive = cfg.kl.adaptive
        self.coef = make_coef(
            cfg.kl.coef,
            adaptive.target if adaptive else None,
            adaptive.horizon if adaptive else None,
        )
        self.algorithm = make_algorithm(cfg)
        many = acc.num_processes > 1
        self.algorithm.setup(
            self.models,
            mean=self._mean,
            gather=(lambda t: distributed.gather_rows(acc, t)) if many else None,
            process_index=acc.process_index,
            policy_state=self._policy_state,
        )
        for module in self._algorithm_modules().values():
            module.to(acc.device)
        if resume_from is not None:  # before any sharding: the files hold the full weights
            self._check_config(resume_from, allow_config_change)
            checkpoint.load_model(resume_from, self.models.policy)
            checkpoint.load_modules(resume_from, self._algorithm_modules())
        self._prepare_models()
        groups = self._param_groups()  # after sharding: the optimizer holds the shards
        self.params = [p for group in groups for p in group["params"]]
        # the algorithm's replicated modules (e.g. a value head): their gradients are summed in
        # one collective per update; a sharded value model's are the engine's (reduce-scatter)
        self.module_params = [
            p for group in groups[1:] for p in group["params"] if not fsdp.is_sharded_param(p)
        ]
        self.minibatch_generator = torch.Generator().manual_seed(cfg.seed)
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=cfg.trainer.learning_rate,
            betas=cfg.trainer.adam_betas,
            weight_decay=cfg.trainer.weight_decay,
            fused=_fused_adamw(groups),
        )
        self.scheduler = get_scheduler(
            cfg.trainer.lr_schedule,
            self.optimizer,
            num_warmup_steps=cfg.trainer.warmup_steps,
            num_training_steps=cfg.trainer.max_steps,
        )
        if self.zero_requested:  # after the weights were loaded (resume)
            self._build_zero()
        logged = {n: get_divergence(n) for n in LOGGED_DIVERGENCES}
        logged[self.regulariser.divergence.name] = self.regulariser.divergence
        self.measured_divergences = list(logged.values())
        self.state = TrainerState()
        self.logger = RunLogger(cfg, self.output_dir, acc)
        self.watcher = preemption.SignalWatcher()
        self._saved_step: int | None = None
        self._truncated_prompts = 0  # this process's samples whose prompt was cut, this step
        self._ratio_max = 0.0  # max w_t = π_θ/π_old over the current step's updates
        self._before_step: dict[str, Any] | None = None
        self.resumed_from = resume_from
        if resume_from is not None:
            self._restore(resume_from)
        if acc.is_main_process:  # every check passed: only now is anything in the folder moved
            self._set_aside_abandoned(resume_from, restart=bool(resume) and not overwrite)
        acc.wait_for_everyone()

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

    def _prepare_models(self) -> None:
        """The policy's training forward goes through the engine (DDP: bucketed gradient SUM;
        FSDP2: the policy and a separate reference sharded, gradients reduce-scattered as a SUM;
        PPO's value model sharded like the policy, f-DPG's offline proposal like the reference);
        the algorithm's replicated trainable modules (a value head) are reduced in one collective
        per update."""
        acc, settings = self.accelerator, None
        if self.engine == "fsdp2":
            settings = fsdp.Fsdp2Settings.from_accelerate(acc.mixed_precision)
            if settings.param_dtype is not None and self.cfg.model.dtype != "fp32":
                raise ConfigError(
                    f"mixed_precision: {acc.mixed_precision} (Accelerate config) computes in it "
                    f"over fp32 master weights; model.dtype is {self.cfg.model.dtype}: set "
                    "model.dtype: fp32, or mixed_precision: no"
                )
        hidden = distributed.PolicyHidden(self.models.policy, completion_hidden)
        self.zero: deepspeed_engine.ZeroEngine | None = None  # DeepSpeed: built with the optimizer
        self.zero_requested = self.engine in deepspeed_engine.ENGINES.values()
        self.policy_forward = (
            hidden if self.zero_requested else distributed.prepare_policy(acc, hidden, settings)
        )
        self.reference_forward = None
        if settings is not None and self.models.reference is not None:
            self.reference_forward = distributed.PolicyHidden(
                self.models.reference, completion_hidden
            )
            distributed.shard_and_init(self.reference_forward, settings, acc.device)
        if settings is not None:  # PPO's separate value model: its trunk sharded like the policy
            for module in self.algorithm.modules().values():
                trunk = getattr(module, "trunk", None)
                if trunk is not None:
                    fsdp.shard(module, trunk, settings)
        self.frozen_forwards = []  # f-DPG's offline proposal: sharded like the reference
        if settings is not None:
            for module in self.algorithm.frozen_modules().values():
                frozen = distributed.PolicyHidden(module, completion_hidden)
                distributed.shard_and_init(frozen, settings, acc.device)
                self.frozen_forwards.append(frozen)

    def _build_zero(self) -> None:
        """DeepSpeed ZeRO-2/3 around the training forward and the AdamW (all param groups: the
        algorithm's modules are partitioned and reduced with the policy); the scheduler keeps
        driving that AdamW's param groups. ZeRO-3: the lm_head weights the loss reads (the
        policy's; under LoRA the reference's, the same base weight) are gathered for it."""
        cfg, acc = self.cfg, self.accelerator
        settings = deepspeed_engine.ZeroSettings.from_accelerate(
            acc.mixed_precision,
            cfg.trainer.max_grad_norm,
            cfg.trainer.micro_batch_size,
            acc.num_processes,
            cfg.model.dtype,
            getattr(self.models.policy.config, "hidden_size", None),
        )
        root = deepspeed_engine.TrainedModules(self.policy_forward, self.algorithm.modules())
        lm_head = list(lm_head_params(self.models.policy))
        if self.models.reference is None:  # LoRA: the reference is the policy's base model
            with self.models.reference_context():
                lm_head += lm_head_params(self.models.reference_model)
        self.zero = deepspeed_engine.ZeroEngine(
            root, self.optimizer, settings, acc.num_processes, lm_head=lm_head
        )
        self.policy_forward = self.zero.engine

    def _full_weights(self, blocks: bool = True) -> AbstractContextManager:
        """Inside: the sharded models' full weights (FSDP2, ZeRO-3; all processes enter it); a
        no-op for DDP, ZeRO-2 and one process."""
        if self.zero is not None:
            return self.zero.gathered()
        roots = (self.policy_forward, self.reference_forward, *self.frozen_forwards)
        return fsdp.gathered(*roots, blocks=blocks)

    def _policy_state(self) -> dict[str, Tensor]:
        """The policy's weights as a copy of it loads them (f-DPG's q ← π): under ZeRO-3
        gathered whole (a collective), else the module's own state dict (FSDP2: its shards,
        which the proposal, sharded alike, loads shard onto shard)."""
        if self.zero is not None and self.zero.stage == 3:
            with self.zero.full_parameters():
                return {k: v.detach().clone() for k, v in self.models.policy.state_dict().items()}
        return self.models.policy.state_dict()

    def _param_groups(self) -> list[dict[str, Any]]:
        """The policy's trainable parameters at ``trainer.learning_rate``, then the algorithm's
        modules (e.g. PPO's value head) at the algorithm's own rate where it sets one."""
        policy = [p for p in self.models.policy.parameters() if p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": policy}]
        module_lr = self.algorithm.module_learning_rate
        for module in self.algorithm.modules().values():
            params = [p for p in module.parameters() if p.requires_grad]
            groups.append(
                {"params": params} if module_lr is None else {"params": params, "lr": module_lr}
            )
        return groups

    def _algorithm_modules(self, saving: bool = False) -> dict[str, Any]:
        """Everything the algorithm owns that a checkpoint holds: trainable and frozen. ``saving``
        (every process calls it: a collective under FSDP2 and ZeRO-3, and only the main process's
        result holds the gathered weights): under DeepSpeed the trainable ones as copies owning
        their storage (ZeRO-2 made their parameters views into its flat buffer, which
        safetensors refuses to write), under ZeRO-3 their gathered full weights; an
        FSDP2-sharded one (PPO's value model, f-DPG's proposal) as its full state dict."""
        trainable: dict[str, Any] = self.algorithm.modules()
        if saving and self.zero is not None:
            main = self.accelerator.is_main_process
            trainable = self.zero.full_module_copies(trainable, main)
        modules = {**trainable, **self.algorithm.frozen_modules()}
        if saving and self.engine == "fsdp2":
            modules = {
                name: fsdp.full_module_state(m) if _has_sharded_params(m) else m
                for name, m in modules.items()
            }
        return modules

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train for ``trainer.max_steps`` steps; returns the run summary."""
        cfg = self.cfg
        self.logger.start(
            self.regulariser,
            first_step=self.state.step,
            run_id=self.state.wandb_run_id,
            world_size=self.accelerator.num_processes,
            engine=self.engine,
        )
        try:
            with self.watcher:
                while self.state.step < cfg.trainer.max_steps:
                    try:
                        result = self.train_step()
                    except _StepAbandoned:
                        self._stop_for_signal(self._before_step)
                    if _every(cfg.trainer.eval_every, self.state.step):
                        result.metrics.update(self.evaluate_heldout())
                    self.logger.log_step(result)
                    if _due(cfg.trainer.save_every, self.state.step, cfg.trainer.max_steps):
                        self.save_checkpoint()
                    if self.state.step < cfg.trainer.max_steps and self._stop_requested():
                        self._stop_for_signal()  # (after the last step, finishing is quicker)
            self.save_final()
        except BaseException:
            self.logger.finish(completed=False)  # no summary, no "wrote": the run did not finish
            raise
        return self.logger.finish()

    def train_step(self) -> StepResult:
        clock = _Clock()
        step = self.state.step + 1
        self._before_step = self._capture()
        with self._full_weights():  # generation and scoring passes read every weight
            rollout = self.make_rollout(clock)
        self._abandon_if_stopping()
        rewards, reward_metrics = self.score(rollout, step)
        clock.lap("time/score_seconds")
        self._abandon_if_stopping()
        trained = self._trained_per_sequence(rollout)
        self._check_divergence_limit(step, trained)
        penalty = None
        if self.algorithm.uses_regulariser and self.regulariser.in_reward and self.coef.value > 0:
            penalty = self.coef.value * self.regulariser.reward_penalty(rollout.stats)
        batch = self.algorithm.prepare(rollout, rewards, penalty)
        update_metrics = self.optimise(batch, step)
        clock.lap("time/optimise_seconds")
        metrics = {
            **reward_metrics,
            **self._divergence_metrics(rollout),
            **distributed.reduce_metrics(self.accelerator, batch.metrics),
            **update_metrics,
            "data/truncated_prompts": float(self._global_count(self._truncated_prompts)),
        }
        if self.algorithm.uses_regulariser:  # under f-DPG, kl.* names the objective instead
            metrics[f"train/{self.regulariser.metric_name}"] = trained
            metrics["train/coef"] = self.coef.value
        if update_metrics["train/applied"] and math.isfinite(trained):
            self.coef.update(trained, n_steps=self._global_count(rollout.num_sequences))
        self.state.step = step
        metrics.update(clock.laps)
        metrics["time/step_seconds"] = clock.total()
        return StepResult(step, metrics, rollout, rewards)

    def evaluate_heldout(self) -> dict[str, float]:
        """``eval/*`` on the held-out split (``trainer.eval_every``), as ``kltrain eval`` computes
        them, on the main process; the training RNG, reward statistics and algorithm state are
        left as they were. f-DPG figures only with one process and an on-policy proposal (their
        estimates reduce across processes; an offline proposal could be replaced)."""
        metrics: dict[str, float] = {}
        with self._full_weights():  # (every process gathers; the main one evaluates)
            if self.accelerator.is_main_process:
                metrics = self._evaluate_on_main()
        self.accelerator.wait_for_everyone()
        return {f"eval/{k}": v for k, v in metrics.items()}

    def _evaluate_on_main(self) -> dict[str, float]:
        fd = self.cfg.algorithm.fdpg
        on_policy = self.cfg.algorithm.name == "fdpg" and (fd is None or fd.proposal == "policy")
        single = self.accelerator.num_processes == 1
        return evaluate_policy(
            self.models,
            self.cfg,
            training_eval_data(self.cfg, self.full_dataset),
            samples_per_prompt=self.cfg.algorithm.num_generations,
            seed=self.cfg.seed,
            reward_fn=self.reward_fn,
            algorithm=self.algorithm if on_policy and single else None,
            progress=False,
        )

    # ------------------------------------------------------------------------------------------
    def make_rollout(self, clock: _Clock | None = None) -> Rollout:
        cfg, acc = self.cfg, self.accelerator
        k = cfg.algorithm.num_generations
        global_indices = self.sampler.next_batch(cfg.trainer.prompts_per_step)
        indices = process_share(global_indices, acc.process_index, acc.num_processes)
        seq_indices = [i for i in indices for _ in range(k)]  # contiguous groups of k
        prompts = [self.dataset[i]["prompt"] for i in seq_indices]
        texts = [
            render_prompt(self.models.tokenizer, p, cfg.data.chat_template, cfg.data.system_prompt)
            for p in prompts
        ]
        self._truncated_prompts = count_truncated(
            self.models.tokenizer, texts, cfg.data.max_prompt_tokens
        )
        sampler = self.algorithm.sampling_model(self.models)
        # The policy's hidden states recorded while it samples: measure() then skips its forward.
        sampled_hidden: list[Tensor] | None = [] if sampler is self.models.policy else None
        rollout = sample_rollout(
            self.models,
            texts,
            prompts,
            seq_indices,
            k,
            cfg.generation,
            max_prompt_tokens=cfg.data.max_prompt_tokens,
            batch_size=cfg.trainer.generation_batch_size,
            model=sampler,
            seeds=self._sample_seeds(len(texts)),
            hidden_out=sampled_hidden,
        )
        if clock:
            clock.lap("time/generate_seconds")
        measure(
            rollout,
            self.models,
            self.measured_divergences,
            micro_batch_size=cfg.trainer.micro_batch_size,
            chunk_size=cfg.kl.chunk_size,
            keep_ref_hidden=self._regularised_in_loss() and self.regulariser.exact,
            keep_policy_hidden=self.algorithm.needs_policy_hidden,
            proposal=None if sampler is self.models.policy else sampler,
            temperature=cfg.generation.temperature,
            sampled_hidden=sampled_hidden[0] if sampled_hidden else None,
        )
        if clock:
            clock.lap("time/measure_seconds")
        return rollout

    def _sample_seeds(self, num_local: int) -> list[int]:
        """One sampling seed per local sample, from (seed, step, global sample index): process
        r's samples are the global samples ``r·num_local … (r+1)·num_local − 1`` (contiguous
        shares of the step's prompts, k samples each), so every world size draws the same ones."""
        step = self.state.step + 1
        first = self.accelerator.process_index * num_local
        return [sample_seed(self.cfg.seed, step, first + i) for i in range(num_local)]

    def score(self, rollout: Rollout, step: int) -> tuple[Tensor, dict[str, float]]:
        """Sequence rewards [B]. Invalid samples (``reward.on_invalid: skip``) get their
        completion mask cleared: the algorithms then leave them out of the loss and out of every
        baseline, and the reward metrics average the valid samples only."""
        columns = {
            name: [self.dataset[i][name] for i in rollout.prompt_indices]
            for name in self.dataset.column_names
            if name != "prompt"
        }
        many = self.accelerator.num_processes > 1  # whitening over every process's samples
        gather = partial(distributed.gather_values, self.accelerator) if many else None
        result = self.reward_fn(
            rollout.prompts, rollout.completions, step=step, columns=columns, gather=gather
        )
        rewards = result.total.to(self.accelerator.device, torch.float32)
        rollout.rewards_per_term = dict(result.per_term)
        invalid = result.invalid.to(rewards.device)
        rewards = torch.where(invalid, torch.zeros_like(rewards), rewards)
        rollout.completion_mask[invalid] = False
        metrics = {
            "reward/mean": self._mean(rewards[~invalid]),
            "reward/std": self._std(rewards[~invalid]),
            "reward/invalid": self._global_count(int(invalid.sum())),
        }
        valid = ~invalid
        for name, values in result.per_term.items():  # after transforms, before weights
            metrics[f"reward/{name}"] = self._mean(values.to(rewards.device)[valid].float())
        for name, values in result.raw.items():  # before transforms (e.g. before whitening)
            metrics[f"reward/raw/{name}"] = self._mean(values.to(rewards.device)[valid].float())
        return rewards, metrics

    # ------------------------------------------------------------------------------------------
    def optimise(self, batch: TrainBatch, step: int) -> dict[str, float]:
        """``algorithm.epochs`` passes over the batch, each split into ``num_minibatches``
        shuffled minibatches; each minibatch is one optimizer step."""
        algo = self.cfg.algorithm
        sums: dict[str, float] = defaultdict(float)
        skipped = 0
        self._ratio_max = torch.zeros((), dtype=torch.float64, device=self.accelerator.device)
        # a sharded reference's lm_head, read by the exact divergence in the loss: gathered once
        with fsdp.gathered(self.reference_forward, blocks=False):
            for rows, num_micro in self._minibatches(batch.rollout.num_sequences):
                ok = self._optimizer_step(batch, rows, num_micro, sums, step)
                skipped += 0 if ok else 1
        passes = algo.epochs * algo.num_minibatches
        for key in LOCAL_TOKEN_SUMS:  # this process's tokens only: add up the processes
            sums[key] = self._sum_across(sums[key])
        out = {f"train/{k}": v / passes for k, v in sums.items()}
        for name, total in self.algorithm.pop_update_sums().items():
            out[name] = self._sum_across(total) / passes
        out["train/importance_ratio_max"] = self._max_across(self._ratio_max)
        out["train/skipped"] = float(skipped)
        out["train/skipped_total"] = float(self.state.skipped_steps)
        out["train/applied"] = float(passes - skipped)
        out["train/lr"] = self.scheduler.get_last_lr()[0]
        if skipped < passes:  # the schedule (and β) advance only for a step that updated
            self.scheduler.step()
        return out

    def _minibatches(self, num_sequences: int) -> list[tuple[Tensor, int]]:
        """Each optimizer step's rows of this process's ``num_sequences`` and the number of
        micro-batches every process runs for it. The step's sequences are split over the
        *global* batch (one permutation of all processes' sequences per epoch, from the
        minibatch generator, the same on every process), so every world size takes the same
        minibatches; a process holding fewer of a minibatch's rows runs empty micro-batches to
        keep the engine's collectives paired."""
        algo, acc = self.cfg.algorithm, self.accelerator
        rank, total = acc.process_index, num_sequences * acc.num_processes
        size, micro = total // algo.num_minibatches, self.cfg.trainer.micro_batch_size
        out = []
        for _ in range(algo.epochs):
            order = torch.arange(total)
            if algo.num_minibatches > 1:
                order = torch.randperm(total, generator=self.minibatch_generator)
            for global_rows in order.split(size):
                owner = global_rows // num_sequences  # contiguous shares: process r's rows
                counts = torch.bincount(owner, minlength=acc.num_processes)
                num_micro = max(1, -(-int(counts.max()) // micro))
                out.append((global_rows[owner == rank] - rank * num_sequences, num_micro))
        return out

    def _optimizer_step(
        self, batch: TrainBatch, rows: Tensor, num_micro: int, sums: dict, step: int
    ) -> bool:
        mask = batch.rollout.completion_mask[rows]
        num_tokens = max(self._global_count(int(mask.sum())), 1)
        loss_total = torch.zeros((), device=self.accelerator.device)
        micro = self.cfg.trainer.micro_batch_size
        starts = range(0, num_micro * micro, micro)
        for start in starts:
            if self.accelerator.num_processes == 1 and not mask[start : start + micro].any():
                continue  # every sample invalid (reward.on_invalid: skip): no loss, no gradient
            part = rows[start : start + micro]
            with distributed.sync_context(self.policy_forward, sync=start == starts[-1]):
                loss = self._micro_batch_loss(batch, part, num_tokens, sums)
                if self.zero is None:
                    loss.backward()
                else:
                    self.zero.backward(loss)
            loss_total += loss.detach()
        if self.zero is not None:  # DeepSpeed reduces, clips and steps (skips) in one call
            loss_value = self._sum_across(loss_total)
            grad_norm = self.zero.step(discard=not math.isfinite(loss_value))
        else:
            distributed.all_reduce_gradients(self.accelerator, self.module_params)
            grad_norm = self._clip_gradients()
            loss_value = self._sum_across(loss_total)
        sums["loss"] += loss_value
        sums["grad_norm"] += grad_norm
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            if self.zero is None:
                self.optimizer.step()
            self._check_weights_finite(step)
            self.state.consecutive_skips = 0
        else:
            self._record_skip(step, "loss" if not math.isfinite(loss_value) else "gradient norm")
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def _micro_batch_loss(self, batch: TrainBatch, rows: Tensor, num_tokens: int, sums) -> Tensor:
        """Σ over this micro-batch's valid tokens of the per-token loss, divided by the step's
        global token count: micro-batching, accumulation and world size leave the sum unchanged."""
        r, reg = batch.rollout, self.regulariser
        policy = self.models.policy
        if rows.numel() == 0:  # another process's share of the minibatch is larger: one masked
            rows = torch.zeros(1, dtype=torch.long)  # row keeps the collectives paired
            mask = torch.zeros(1, r.completion_mask.shape[1], dtype=torch.bool)
        else:
            mask = r.completion_mask[rows]
        hidden = self.policy_forward(r.input_ids[rows], r.attention_mask[rows], r.prompt_length)
        if not mask.any():  # the engine's collectives pair up only if every process backwards
            loss = self._head_call(
                hidden, lambda h: h.sum() * 0.0 + lm_head_params(policy)[0].sum() * 0.0
            )
            return loss + self._no_token_hidden_loss(hidden, batch, rows, num_tokens)
        old = r.stats["logprobs"][rows][mask]
        ref_lp = r.stats["ref_logprobs"][rows][mask]
        adv = batch.advantages[rows][mask]
        coef = self.coef.value
        in_loss = self._regularised_in_loss()
        exact_in_loss = reg.exact and in_loss

        def loss_fn(chunk: TokenChunk) -> Tensor:
            sl = chunk.index
            per_token, stats = self.algorithm.token_loss(chunk.logprobs, old[sl], adv[sl])
            if in_loss:
                d = reg.loss_term(chunk.logprobs, ref_lp[sl], chunk.divergence, old[sl])
                per_token = per_token + coef * d
            # float64 tensors, no host sync per chunk: read once per step in optimise()
            sums["clip_fraction"] += stats["clipped"].sum().double() / num_tokens
            sums["approx_kl_old"] += stats["approx_kl"].sum().double() / num_tokens
            self._log_importance_ratio(chunk.logprobs.detach() - old[sl], sums, num_tokens)
            return per_token.sum() / num_tokens

        temperature = self.cfg.generation.temperature  # train π^(1/T), the sampled distribution

        def head_loss(policy_hidden: Tensor) -> Tensor:  # reads the lm_head weights
            weight, bias = lm_head_params(policy)
            _, bias = tempered(None, bias, temperature)
            ref_hidden = ref_weight = ref_bias = None
            if exact_in_loss:
                ref_hidden = tempered(r.ref_hidden[rows][mask], None, temperature)[0]
                with self.models.reference_context():
                    ref_weight, ref_bias = lm_head_params(self.models.reference_model)
                _, ref_bias = tempered(None, ref_bias, temperature)
            return fused_token_loss(
                tempered(policy_hidden, None, temperature)[0],
                weight,
                r.completion_ids[rows][mask],
                loss_fn,
                ref_hidden=ref_hidden,
                ref_weight=ref_weight,
                divergence=reg.divergence if exact_in_loss else None,
                chunk_size=self.cfg.kl.chunk_size,
                policy_bias=bias,
                ref_bias=ref_bias,
            )

        loss = self._head_call(hidden[mask], head_loss)
        extra = self.algorithm.hidden_loss(hidden, batch, rows, num_tokens)
        return loss if extra is None else loss + extra

    def _no_token_hidden_loss(
        self, hidden: Tensor, batch: TrainBatch, rows: Tensor, num_tokens: int
    ) -> Tensor | float:
        """The algorithm's hidden-state loss (PPO's value loss) over no valid token: exactly 0,
        its gradient and metrics exactly 0, but its modules run forward and backward as on the
        processes whose micro-batch has tokens. DeepSpeed reduces (ZeRO-3 also gathers) the
        value head's parameters with the policy's; a process that skipped them crashed the run
        ("Received data size doesn't match expected size" from gloo)."""
        r = batch.rollout
        none = dataclasses.replace(r, completion_mask=torch.zeros_like(r.completion_mask))
        masked = dataclasses.replace(batch, rollout=none)
        extra = self.algorithm.hidden_loss(hidden, masked, rows, num_tokens)
        return 0.0 if extra is None else extra

    def _head_call(self, hidden: Tensor, fn) -> Tensor:
        """``fn(hidden)``, where ``fn`` may read the lm_head weights: under ZeRO-3 inside the
        engine's :class:`~kltrain.training.deepspeed_engine.LmHeadCall`, which gathers them."""
        return fn(hidden) if self.zero is None else self.zero.head_call(hidden, fn)

    def _log_importance_ratio(self, log_w: Tensor, sums: dict, num_tokens: int) -> None:
        """w_t = π_θ/π_old at the chunk's tokens [n]: its token mean (summed like the other
        token metrics) and its running max, so a run shows how far off-policy its updates went."""
        w = torch.exp(log_w.double())  # tensors: read once per step, no host sync per chunk
        sums["importance_ratio_mean"] += w.sum() / num_tokens
        if w.numel():
            self._ratio_max = torch.maximum(self._ratio_max, w.max())

    def _regularised_in_loss(self) -> bool:
        reg = self.regulariser
        return self.algorithm.uses_regulariser and reg.in_loss and self.coef.value > 0

    # ------------------------------------------------------------------------------------------
    # Distributed helpers: the only process-aware code.
    def _clip_gradients(self) -> float:
        max_norm = self.cfg.trainer.max_grad_norm
        grads = [p for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        limit = max_norm if max_norm else float("inf")
        if self.engine == "fsdp2":  # sharded gradients: the norm is reduced over processes
            return fsdp.clip_gradients([p.grad for p in grads], limit)
        return float(torch.nn.utils.clip_grad_norm_(grads, limit))

    def _sum_across(self, value: Tensor | float) -> float:
        t = torch.as_tensor(value, dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="sum"))

    def _max_across(self, value: Tensor | float) -> float:
        t = torch.as_tensor(value, dtype=torch.float64).reshape(1)
        return distributed.reduce_metrics(self.accelerator, {"max": max_of(t)})["max"]

    def _global_count(self, n: int) -> int:
        return int(self._sum_across(float(n)))

    def _mean(self, values: Tensor) -> float:
        total = self._sum_across(values.double().sum())
        return total / max(self._global_count(values.numel()), 1)

    def _std(self, values: Tensor) -> float:
        mean = self._mean(values)
        return math.sqrt(max(self._mean((values.double() - mean) ** 2), 0.0))

    # ------------------------------------------------------------------------------------------
    def _trained_per_sequence(self, rollout: Rollout) -> float:
        """Mean over sequences of Σ_t d_t for the trained quantity (what β is adapted toward)."""
        d = self.regulariser.reward_penalty(rollout.stats) * rollout.completion_mask
        return self._mean(d.sum(dim=1))

    def _divergence_metrics(self, rollout: Rollout) -> dict[str, float]:
        mask = rollout.completion_mask
        tokens = max(self._global_count(int(mask.sum())), 1)
        out = {"completion/length": self._mean(rollout.completion_lengths().double())}
        for div in self.measured_divergences:
            d = rollout.stats[div.name] * mask
            out[f"divergence/{div.name}"] = self._mean(d.sum(dim=1))
            out[f"divergence/{div.name}_per_token"] = self._sum_across(d.sum()) / tokens
        entropy = rollout.stats["entropy"] * mask
        out["completion/entropy_per_token"] = self._sum_across(entropy.sum()) / tokens
        return out

    def _record_skip(self, step: int, quantity: str) -> None:
        self.state.consecutive_skips += 1
        self.state.skipped_steps += 1
        limit = self.cfg.trainer.max_consecutive_skips
        print(
            f"kltrain: step {step}: non-finite {quantity}; optimizer update skipped "
            f"({self.state.consecutive_skips} in a row, {self.state.skipped_steps} in all)",
            flush=True,
        )
        if self.state.consecutive_skips >= limit:
            raise TrainingStopped(
                f"step {step}: non-finite {quantity} in {limit} consecutive optimizer updates "
                f"(trainer.max_consecutive_skips={limit}); stopping ({self._checkpoint_note()})"
            )

    def _check_weights_finite(self, step: int) -> None:
        """A finite loss and gradient norm can still give non-finite weights (fp16 overflow in
        the optimizer): stop before they are sampled from or saved. Cheap: one fp32 sum per
        tensor (a NaN or ±inf anywhere makes it non-finite; no weight is large enough to overflow
        an fp32 sum), one device sync; the per-element search runs only on failure."""
        if self.zero is not None:  # ZeRO-3: this process's partition
            local = self.zero.local_weights(self.params)
        else:  # sharded: this process's part
            local = [fsdp.local(p.detach()) for p in self.params]
        sums = torch.stack([p.sum(dtype=torch.float32) for p in local])
        finite = bool(sums.isfinite().all())
        if self.engine in ("fsdp2", deepspeed_engine.ENGINE_ZERO3):  # the same branch everywhere
            finite = self._sum_across(0.0 if finite else 1.0) == 0.0
        if finite:
            return
        names = {id(p): n for n, p in self.models.policy.named_parameters()}
        bad = next(
            (p for p, t in zip(self.params, local, strict=True) if not bool(t.isfinite().all())),
            self.params[0],  # (on another process)
        )
        raise TrainingStopped(
            f"step {step}: the optimizer update made the weights non-finite (first: "
            f"{names.get(id(bad), 'an algorithm module parameter')}, model.dtype="
            f"{self.cfg.model.dtype}); stopping without saving them ({self._checkpoint_note()})"
        )

    def _checkpoint_note(self) -> str:
        """What a stopped run leaves to resume from, stated truthfully."""
        found = checkpoint.latest(self.output_dir / "checkpoints")
        if found is None:
            return "no checkpoint was written yet (trainer.save_every sets how often)"
        return f"the last checkpoint, {found}, is intact"

    def _check_divergence_limit(self, step: int, value: float) -> None:
        limit = self.cfg.kl.max
        if limit is not None and value > limit:
            raise TrainingStopped(
                f"step {step}: {self.regulariser.metric_name} per sequence is {value:.4g}, above "
                f"kl.max={limit}; stopping before this step's update ({self._checkpoint_note()})"
            )

    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self, captured: dict[str, Any] | None = None) -> Path | None:
        """Checkpoint the current state, or ``captured`` (from :meth:`_capture`) with the current
        weights and optimizer when a step was abandoned before updating them."""
        captured = captured or self._capture()
        rng = [captured["rng"]]
        if self.accelerator.num_processes > 1:
            rng = gather_object(rng)
        model_state = staging = None
        if self.engine == "fsdp2":  # a collective: the full weights, gathered to process 0
            model_state = fsdp.full_state_dict(self.models.policy)
        elif self.zero is not None and self.zero.stage == 3:  # likewise
            main = self.accelerator.is_main_process
            model_state = self.zero.full_state_dict(self.models.policy, main)
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

    def _local_state(self) -> dict[str, Any]:
        """This process's optimizer state: of its shards (FSDP2: DTensor locals; ZeRO: its flat
        partition's AdamW state)."""
        if self.engine == "fsdp2":
            return fsdp.local_optimizer_state(self.optimizer)
        if self.zero is not None:
            return self.zero.optimizer_state(self.optimizer)
        return self.optimizer.state_dict()

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

    # ------------------------------------------------------------------------------------------
    # Preemption
    def _stop_requested(self) -> bool:
        """Whether any process received a stop signal (all processes agree on the answer)."""
        flag = 1.0 if self.watcher.requested else 0.0
        if self.accelerator.num_processes > 1:
            flag = self._sum_across(flag)
        return flag > 0

    def _abandon_if_stopping(self) -> None:
        if self._stop_requested():
            raise _StepAbandoned

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
        main = self.accelerator.is_main_process
        weights = fsdp.full_state_dict(self.models.policy) if self.engine == "fsdp2" else None
        if self.zero is not None and self.zero.stage == 3:  # a collective
            weights = self.zero.full_state_dict(self.models.policy, main)
        saved = self._algorithm_modules(saving=True)
        self.accelerator.wait_for_everyone()
        if main:
            final = self.output_dir / "final"
            given = {} if weights is None else {"state_dict": weights}
            self.models.policy.save_pretrained(final, safe_serialization=True, **given)
            self.models.tokenizer.save_pretrained(final)
            for name in self.algorithm.modules():
                state = saved[name] if isinstance(saved[name], dict) else saved[name].state_dict()
                save_file(state, str(final / f"{name}.safetensors"))


class _Clock:
    """Wall-clock laps of one step, for the time/* metrics."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.start


def _has_sharded_params(module: torch.nn.Module) -> bool:
    return any(fsdp.is_sharded_param(p) for p in module.parameters())


def _every(every: int, step: int) -> bool:
    return every > 0 and step % every == 0


def _due(every: int, step: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def _process_zero_random_init(seed: int, process_index: int) -> AbstractContextManager:
    """Inside: the random parts of a model built from files (LoRA's A matrices) come out as on
    process 0, whose generator ``set_seed(seed, device_specific=True)`` seeded with ``seed``.
    DDP would broadcast process 0's weights anyway; FSDP2 shards each process's own copy, so
    without this a LoRA policy would start as a mix of the processes' inits."""
    if process_index == 0:
        return nullcontext()  # process 0 draws from its own stream: runs stay as they were
    return _seeded(seed)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _refuse_existing_checkpoints(output_dir: Path) -> None:
    """A fresh start must not mix its files and checkpoints with an earlier run's."""
    found = checkpoint.latest(output_dir / "checkpoints")
    if found is not None:
        raise ConfigError(
            f"trainer.output_dir={output_dir} already holds checkpoints of a run (newest: "
            f"{found.name}); pass --resume (trainer.resume=auto) to continue it, or choose "
            f"another trainer.output_dir"
        )


def _check_minibatches(cfg: RunConfig, world_size: int) -> None:
    """The step's sequences (all processes') split into ``algorithm.num_minibatches`` equal
    parts."""
    prompts_per_process(cfg, world_size)  # (the even split over processes: its own message)
    total = cfg.trainer.prompts_per_step * cfg.algorithm.num_generations
    n = cfg.algorithm.num_minibatches
    if total % n:
        raise ConfigError(
            f"algorithm.num_minibatches={n} does not divide the step's {total} sequences "
            f"(trainer.prompts_per_step × algorithm.num_generations); use a divisor of {total}"
        )


def _fused_adamw(groups: list[dict[str, Any]]) -> bool | None:
    """Fused AdamW (one kernel over all parameters) where torch has it: the same update as the
    per-parameter loop, in ~4× less time on CPU for the 135M-parameter embedded model (its
    optimizer step is otherwise over a second of each update). None (torch's default) elsewhere."""
    params = [p for group in groups for p in group["params"]]
    fusable = {"cpu", "cuda", "mps", "xpu"}
    ok = bool(params) and all(p.is_floating_point() and p.device.type in fusable for p in params)
    return True if ok else None


def _shared_output_dir(cfg: RunConfig, acc: Accelerator) -> Path:
    """Resolve the run folder once, on the main process, so every process agrees on it."""
    holder = [str(cfg.resolved_output_dir()) if acc.is_main_process else None]
    if acc.num_processes > 1:
        broadcast_object_list(holder)
    return Path(holder[0])  # created by the first write, after every check has passed
