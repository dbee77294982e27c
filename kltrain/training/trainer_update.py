"""The update phase of a step: a :class:`TrainBatch` becomes optimizer updates. Minibatches are
drawn from one permutation of the step's global rows; each micro-batch's loss is summed over its
valid tokens and divided by the step's global token count (so micro-batching, accumulation and
world size leave the update unchanged), through the chunked lm_head path. A part of
:class:`Trainer` (:mod:`kltrain.training.trainer`)."""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import nullcontext

import torch
from torch import Tensor

from kltrain.algorithms import TrainBatch
from kltrain.divergence.lm_head import TokenChunk, fused_token_loss
from kltrain.models.cpu_linear import onednn_linears
from kltrain.models.logits import lm_head_params
from kltrain.rollout import tempered
from kltrain.training import distributed, fsdp
from kltrain.training.trainer_checkpoints import SHARDING_ENGINES

#: Per-token statistics summed inside the lm_head kernel over this process's tokens (each
#: already divided by the global token count), so the processes' sums add up to the global value.
LOCAL_TOKEN_SUMS = ("clip_fraction", "approx_kl_old", "importance_ratio_mean")


class UpdateMixin:
    """The :class:`~kltrain.training.trainer.Trainer` methods of the update phase."""

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
            sync = distributed.sync_context(self.policy_forward, sync=start == starts[-1])
            with sync, self._training_rows():
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
        # oneDNN's linear where the weights stay put (not FSDP2/DeepSpeed): models/cpu_linear.py
        sharded = self.engine in SHARDING_ENGINES
        with nullcontext() if sharded else onednn_linears(policy, with_grad=True):
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
