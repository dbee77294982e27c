"""How the trainer's models meet the engine (one process, DDP, FSDP2, DeepSpeed ZeRO-2/3):
wrapping and sharding them, gathering full weights for generation and saving, summing and
clipping gradients, and the reductions across processes. A part of :class:`Trainer`
(:mod:`kltrain.training.trainer`), kept apart so that the loop reads as the loop."""

from __future__ import annotations

import dataclasses
import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from kltrain.algorithms import TrainBatch
from kltrain.config import ConfigError
from kltrain.models.logits import lm_head_params
from kltrain.models.shared_prefix import whole_rows
from kltrain.rl.reduction import max_of
from kltrain.rollout import completion_hidden
from kltrain.training import deepspeed_engine, distributed, fsdp


class EngineMixin:
    """The :class:`~kltrain.training.trainer.Trainer` methods that know which engine runs."""

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
        driving that AdamW's param groups. ZeRO-3: a separate reference is partitioned in the
        same engine (frozen: no gradient, no optimizer state), and the lm_head weights the loss
        reads (the policy's and the reference's; under LoRA the same base weight) are gathered
        for it."""
        cfg, acc = self.cfg, self.accelerator
        settings = deepspeed_engine.ZeroSettings.from_accelerate(
            acc.mixed_precision,
            cfg.trainer.max_grad_norm,
            cfg.trainer.micro_batch_size,
            acc.num_processes,
            cfg.model.dtype,
            getattr(self.models.policy.config, "hidden_size", None),
        )
        frozen = {}  # ZeRO-3: a separate reference partitioned with the policy
        if settings.stage == 3 and self.models.reference is not None:
            frozen["reference"] = self.models.reference
        root = deepspeed_engine.TrainedModules(
            self.policy_forward, self.algorithm.modules(), frozen
        )
        lm_head = list(lm_head_params(self.models.policy))
        with self.models.reference_context():  # LoRA: the policy's base weight, else its own
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

    def _gathered_policy_state(self) -> dict[str, Tensor] | None:
        """The policy's full weights on process 0 for a checkpoint or ``final/`` where they are
        sharded (FSDP2, ZeRO-3: a collective, every process calls it; empty or None elsewhere);
        None where the module's own state dict holds them."""
        if self.engine == "fsdp2":
            return fsdp.full_state_dict(self.models.policy)
        if self.zero is not None and self.zero.stage == 3:
            return self.zero.full_state_dict(self.models.policy, self.accelerator.is_main_process)
        return None

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

    def _training_rows(self) -> AbstractContextManager:
        """The training forward under DeepSpeed runs every row whole, prompts included
        (``kltrain.models.shared_prefix.whole_rows``): with ZeRO-2, a prompt run once for the
        rows that share it gave another gradient than one process did (the equivalence runs of
        tests/test_world_size.py), and ZeRO-3's parameter hooks abort on a layer called twice."""
        return whole_rows() if self.zero_requested else nullcontext()

    def _head_call(self, hidden: Tensor, fn) -> Tensor:
        """``fn(hidden)``, where ``fn`` may read the lm_head weights: under ZeRO-3 inside the
        engine's :class:`~kltrain.training.deepspeed_engine.LmHeadCall`, which gathers them."""
        return fn(hidden) if self.zero is None else self.zero.head_call(hidden, fn)

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

    def _clip_gradients(self) -> float:
        max_norm = self.cfg.trainer.max_grad_norm
        grads = [p for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        limit = max_norm if max_norm else float("inf")
        if self.engine == "fsdp2":  # sharded gradients: the norm is reduced over processes
            return fsdp.clip_gradients([p.grad for p in grads], limit)
        return clip_grad_norm(grads, limit)

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

    def _local_state(self) -> dict[str, Any]:
        """This process's optimizer state: of its shards (FSDP2: DTensor locals; ZeRO: its flat
        partition's AdamW state)."""
        if self.engine == "fsdp2":
            return fsdp.local_optimizer_state(self.optimizer)
        if self.zero is not None:
            return self.zero.optimizer_state(self.optimizer)
        return self.optimizer.state_dict()


def _has_sharded_params(module: torch.nn.Module) -> bool:
    return any(fsdp.is_sharded_param(p) for p in module.parameters())


def clip_grad_norm(params: list[Tensor], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm)``, bit for bit, without its multiply of
    every gradient by 1.0 when the norm is within ``max_norm`` (torch multiplies regardless, to
    spare a GPU a host sync; the caller reads the norm anyway). Returns the total 2-norm. A NaN
    norm leaves the gradients as they are, where torch would make them all NaN: the trainer
    discards a step with a non-finite norm either way."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if bool(max_norm / (norm + 1e-6) < 1.0):  # torch's own coefficient, clamped at 1 below
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)
