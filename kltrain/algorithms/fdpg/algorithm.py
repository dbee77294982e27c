"""f-DPG (Go et al. 2023): minimise ``D_f(π_θ‖p)`` toward a target ``p = π_ref·exp(s)/Z``.

The divergence is the objective, so the loop adds no ``β·D(π‖π_ref)`` (``uses_regulariser``).
Gradient (MATH.md, f-DPG), for y ~ q (the proposal: the policy at sampling time by default):

    ∇_θ D_f(π_θ‖p) = E_{y~q}[ ω(y) f'(u(y)) ∇_θ log π_θ(y) ],   u = π_θ(y)/p(y),  ω = π_θ/q,
    log u = log π_θ(y) − log π_ref(y) − s(y) + log Z(x).

Each sequence gets the advantage ``A = −ω·(f'(u) − b)`` on every completion token, b the mean
``f'`` of the other samples of its prompt (leave-one-out: unbiased, since E_q[ω ∇log π] = 0); the
loop's plain policy gradient ``−A·∇ℓ_t`` summed over tokens is then ``−A·∇log π(y)``. ``Z(x)`` per
prompt comes from :class:`kltrain.algorithms.fdpg.partition.LogPartitionEstimate` with log-weights
``log w = log π_ref(y) + s(y) − log q(y)``; sequence log-probs are sums of the rollout's per-token
``logprobs`` / ``ref_logprobs`` / ``proposal_logprobs`` over the completion mask.

``proposal: policy`` (default): q = π_θ at sampling time, ω = 1. ``proposal: offline`` (DPG's
offline variant, Parshakova et al. 2019; Khalifa et al. 2021, Algorithm 1): q is a frozen copy of
the policy (initially the starting policy) that generates the samples; after each batch the
importance-sampled ``D(π_θ‖p) = E_q[ω·t(u)]`` is compared with q's own estimate
``D(q‖p) = E_q[t(u_q)]`` on the same samples (``t`` the control-variate terms of the
diagnostics, D = ``proposal_divergence``, TV by default), and q ← π_θ when the policy's is lower.

Shapes: ``[B]`` per sequence, ``[B, T]`` per completion token.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from kltrain.algorithms.base import Algorithm, TrainBatch
from kltrain.algorithms.fdpg.partition import LogPartitionEstimate
from kltrain.algorithms.fdpg.targets import (
    TargetError,
    constraint_log_score,
    constraint_values,
    distinct_n,
    divergence_terms,
    effective_sample_fraction,
    f_prime_of_log_ratio,
    feature_matrix,
    fit_lambdas,
    leave_one_out_mean,
    log_z_stderr,
)
from kltrain.config import DIAGNOSED_DIVERGENCES, FdpgConfig, RunConfig
from kltrain.divergence.functions import Divergence, get_divergence
from kltrain.rollout import Rollout

#: q ← π needs the policy's estimate below q's by more than this fraction of q's (2^-20, 16
#: fp32 roundings of the per-token log-probs both estimates come from). At a tie in exact
#: arithmetic, as at the first step where π = q, rounding decided, and differently on each
#: engine and batch layout; a real improvement is orders of magnitude larger.
PROPOSAL_TIE_RTOL = 2.0**-20


def gradient_description(cfg: RunConfig) -> tuple[str, str]:
    """(``gradient_followed`` for config.yaml, the console line) of an fdpg run."""
    fd = cfg.algorithm.fdpg or FdpgConfig()
    key = f"sequence {cfg.kl.divergence} to target {fd.target}"
    target = {
        "rlhf": f"π_ref·exp(R/β), β={cfg.kl.coef}",
        "constraint": f"π_ref·b_ε, ε={fd.epsilon}",
        "moments": f"π_ref·exp(λ·φ), E_p[φ]={fd.moments}",
    }[fd.target]
    return key, f"minimises D_f(π‖p), f={cfg.kl.divergence}, p ∝ {target} (full gradient)"


class Fdpg(Algorithm):
    name = "fdpg"
    uses_regulariser = False

    @classmethod
    def describe_objective(cls, cfg: RunConfig, regulariser) -> tuple[str, str]:
        del regulariser  # the loop adds no β·D(π‖π_ref): D is the objective
        return gradient_description(cfg)

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.settings: FdpgConfig = cfg.algorithm.fdpg or FdpgConfig()
        self.divergence = get_divergence(cfg.kl.divergence, **cfg.kl.divergence_params())
        self.coef = cfg.kl.coef  # β of the rlhf target p ∝ π_ref·exp(R/β)
        self.log_z = LogPartitionEstimate(self.settings.z_rate)
        lambdas = self.settings.lambdas
        self.lambdas = None if lambdas is None else torch.tensor(lambdas, dtype=torch.float64)
        self.fit_buffer: deque = deque(maxlen=self.settings.refit_window)
        self.steps = 0
        self.refit_failures = 0
        self.fitted = self.lambdas is not None
        self.diagnosed = self._diagnosed_divergences()
        self.offline = self.settings.proposal == "offline"
        self.proposal: torch.nn.Module | None = None  # the frozen q (offline, once set up)
        self._policy_state: Callable[[], dict[str, Tensor]] | None = None  # q ← π reads it
        self.proposal_updates = 0
        self.global_mean: Callable[[Tensor], float] = lambda v: float(v.double().mean())
        #: all processes' rows of a tensor, concatenated in process order (identity on 1)
        self.gather: Callable[[Tensor], Tensor] = lambda t: t
        self.gathers = False
        self.process_index = 0

    # ------------------------------------------------------------------------------------------
    def setup(
        self,
        models,
        mean: Callable[[Tensor], float] | None = None,
        gather: Callable[[Tensor], Tensor] | None = None,
        process_index: int = 0,
        policy_state: Callable[[], dict[str, Tensor]] | None = None,
    ) -> None:
        """Offline proposal: q = a frozen copy of the (already placed) policy. ``mean`` averages
        a [B] tensor over every process's samples, so all processes take the same decision.
        ``gather`` concatenates every process's rows ([B] or [B, T], padded) in process order:
        each process then computes Z, λ, the advantages and every metric on the whole step's
        samples (identical everywhere) and keeps its own rows ``process_index·B …``.
        ``policy_state``: how q ← π reads the policy's weights (every process takes the same
        decision, so all enter it where it is a collective)."""
        if mean is not None:
            self.global_mean = mean
        if gather is not None:
            self.gather, self.gathers, self.process_index = gather, True, process_index
        if self.offline:
            self._policy_state = policy_state or models.policy.state_dict
            self.proposal = copy.deepcopy(models.policy).eval().requires_grad_(False)

    def sampling_model(self, models) -> torch.nn.Module:
        return self.proposal if self.proposal is not None else models.policy

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {"proposal": self.proposal} if self.proposal is not None else {}

    def _diagnosed_divergences(self) -> dict[str, Divergence]:
        """Forward KL, reverse KL, TV, JS and the trained f; toward a hard constraint (p = 0
        somewhere) those with f'(∞) = ∞ are left out: their value is ∞ while π violates it."""
        out = {n: get_divergence(n) for n in DIAGNOSED_DIVERGENCES}
        out[self.divergence.name] = self.divergence
        hard = self.settings.target == "constraint" and self.settings.epsilon == 0
        return {n: d for n, d in out.items() if not hard or d.f_prime_at_infinity() < float("inf")}

    # ------------------------------------------------------------------------------------------
    def prepare(self, rollout: Rollout, rewards: Tensor, penalty: Tensor | None) -> TrainBatch:
        del penalty  # uses_regulariser is False: D_f(π‖p) is the objective itself
        self.steps += 1
        local_mask = rollout.completion_mask
        rollout_here, rollout = rollout, self._whole_step(rollout)
        rewards = self.gather(rewards)
        mask = rollout.completion_mask
        log_pi = (rollout.stats["logprobs"].double() * mask).sum(dim=1)  # π at sampling time
        log_ref = (rollout.stats["ref_logprobs"].double() * mask).sum(dim=1)
        log_q = log_pi  # the proposal that generated the samples
        if self.offline:
            log_q = (rollout.stats["proposal_logprobs"].double() * mask).sum(dim=1)
        keys = list(rollout.prompt_indices)
        score, metrics = self.log_scores(rollout, rewards, log_ref - log_q, keys)
        log_w = log_ref + score - log_q  # log of π_ref·e^s / q: Z's importance weights
        log_z = self.log_z.update(keys, log_w).to(log_w.device)
        violated = torch.isneginf(score)
        log_u = torch.where(violated, torch.inf, log_pi - log_ref - score + log_z)
        weight = torch.exp(log_pi - log_q)  # ω = π/q (1 on-policy)
        pseudo, clipped = self.pseudo_reward(log_u)
        baseline = self.baseline(pseudo, weight if self.offline else None)
        seq_adv = -weight * (pseudo - baseline)
        first = self.process_index * local_mask.shape[0]  # this process's rows of the step
        mine = seq_adv[first : first + local_mask.shape[0]]
        advantages = (mine.unsqueeze(1) * local_mask).float()
        metrics.update(self.diagnostics(rollout, log_u, log_w, keys, pseudo, clipped, weight))
        if self.offline:
            log_u_q = torch.where(violated, torch.inf, log_q - log_ref - score + log_z)
            metrics.update(self.update_proposal(log_u, log_u_q, weight, log_pi - log_q))
        metrics["advantage/mean"] = float(seq_adv.mean())
        metrics["advantage/std"] = float(seq_adv.std(unbiased=False)) if len(keys) > 1 else 0.0
        return TrainBatch(rollout_here, advantages, metrics=metrics)

    def _whole_step(self, rollout: Rollout) -> Rollout:
        """The step's samples of every process as one rollout (only the fields f-DPG reads:
        per-token log-probs, masks, ids, prompt keys, reward terms); this one on 1 process."""
        if not self.gathers:
            return rollout
        names = ["logprobs", "ref_logprobs"] + (["proposal_logprobs"] if self.offline else [])
        keys = self.gather(torch.tensor(rollout.prompt_indices, device=rollout.input_ids.device))
        ids = self.gather(rollout.completion_ids)
        return Rollout(
            prompt_indices=keys.tolist(),
            group_ids=torch.zeros(0),
            prompts=[],
            completions=[],
            input_ids=ids,  # prompt_length 0: completion_ids is the whole of input_ids
            attention_mask=torch.zeros(0),
            completion_mask=self.gather(rollout.completion_mask),
            prompt_length=0,
            stats={n: self.gather(rollout.stats[n]) for n in names},
            rewards_per_term={k: self.gather(v) for k, v in rollout.rewards_per_term.items()},
        )

    def log_scores(
        self, rollout: Rollout, rewards: Tensor, log_w0: Tensor, keys: list
    ) -> tuple[Tensor, dict[str, float]]:
        """The target's log-score s [B] (float64) and its alignment metrics; for ``moments``,
        fits λ first when due (``log_w0 = log π_ref − log π`` the samples' IS weights)."""
        target = self.settings.target
        if target == "rlhf":
            return rewards.double() / self.coef, {"fdpg/alignment/reward": float(rewards.mean())}
        per_term = {k: v.to(log_w0.device) for k, v in rollout.rewards_per_term.items()}
        if target == "constraint":
            b = constraint_values(per_term)
            score = constraint_log_score(b, self.settings.epsilon)
            return score, {"fdpg/alignment/constraint": float(b.mean())}
        phi = feature_matrix(per_term)
        self._maybe_fit(phi, log_w0, keys)
        metrics = {}
        mu = self.settings.moments
        errors = []
        for k, label in enumerate(per_term):
            mean = float(phi[:, k].mean())
            metrics[f"fdpg/alignment/moment/{label}"] = mean
            metrics[f"fdpg/lambda/{label}"] = float(self.lambdas[k])
            errors.append(abs(mean - mu[k]))
        metrics["fdpg/alignment/moment_error"] = max(errors)
        metrics["fdpg/refit_failures"] = float(self.refit_failures)
        return phi @ self.lambdas.to(phi.device), metrics

    def _maybe_fit(self, phi: Tensor, log_w0: Tensor, keys: list) -> None:
        """Fit λ on the first batch (unless given), then every ``refit_every`` steps on the last
        ``refit_window`` batches (grouped by prompt); a new λ is a new target, so Z restarts.

        A fit whose moments the samples cannot reach keeps the current λ (counted in
        ``fdpg/refit_failures``); before the first success that is λ = 0 (p = π_ref) and the fit
        is retried every step. Without ``refit_every`` there is no retry: the error stands."""
        self.fit_buffer.append((phi.cpu(), log_w0.cpu(), torch.tensor(keys)))
        every = self.settings.refit_every
        if self.fitted and not (every and self.steps % every == 0):
            return
        phis, log_ws, groups = (torch.cat(parts) for parts in zip(*self.fit_buffer))
        try:
            lambdas = fit_lambdas(phis, log_ws, groups, self.settings.moments, init=self.lambdas)
        except TargetError:
            if not every and not self.fitted:
                raise
            self.refit_failures += 1
            if self.lambdas is None:
                self.lambdas = torch.zeros(phi.shape[1], dtype=torch.float64)
            return
        self.lambdas, self.fitted = lambdas, True
        self.log_z = LogPartitionEstimate(self.settings.z_rate)

    def pseudo_reward(self, log_u: Tensor) -> tuple[Tensor, Tensor]:
        """``f'(u)`` [B] with, if ``weight_clip`` = c, the weight ``p/π = 1/u`` clipped at c
        (``log u ≥ −log c``); returns (pseudo-reward, clipped [B] bool)."""
        clip = self.settings.weight_clip
        clipped = torch.zeros_like(log_u, dtype=torch.bool)
        if clip is not None:
            floor = -torch.log(torch.tensor(clip, dtype=torch.float64))
            clipped = log_u < floor
            log_u = torch.where(clipped, floor.to(log_u.device), log_u)
        return f_prime_of_log_ratio(self.divergence, log_u), clipped

    def baseline(self, pseudo: Tensor, weight: Tensor | None = None) -> Tensor:
        """Leave-one-out mean of ``f'`` within each prompt's k samples (or 0); with importance
        weights ω, the ω-weighted mean of the others (an estimate of E_π[f'], still independent
        of the sample itself)."""
        k = self.cfg.algorithm.num_generations
        if self.settings.baseline == "none":
            return torch.zeros_like(pseudo)
        if weight is None:
            return leave_one_out_mean(pseudo, k)
        num = leave_one_out_mean(weight * pseudo, k)
        den = leave_one_out_mean(weight, k)
        return torch.where(den > 0, num / den.clamp_min(1e-300), 0.0)

    def update_proposal(
        self, log_u: Tensor, log_u_q: Tensor, weight: Tensor, log_weight: Tensor
    ) -> dict[str, float]:
        """DPG's rule: q ← π when the importance-sampled ``D(π‖p)`` (``proposal_divergence``)
        is below q's own on the same samples, both averaged over every process's samples, by more
        than rounding (:data:`PROPOSAL_TIE_RTOL`)."""
        d = self.diagnosed[self.settings.proposal_divergence]
        d_policy = self.global_mean(weight * divergence_terms(d, log_u))
        d_proposal = self.global_mean(divergence_terms(d, log_u_q))
        if d_policy < d_proposal - PROPOSAL_TIE_RTOL * abs(d_proposal):
            self.proposal_updates += 1
            if self.proposal is not None:
                self.proposal.load_state_dict(self._policy_state())
        return {
            "fdpg/proposal_updates": float(self.proposal_updates),
            "fdpg/proposal_divergence": d_proposal,
            "fdpg/policy_divergence": d_policy,
            "fdpg/proposal_ess": effective_sample_fraction(log_weight),
        }

    # ------------------------------------------------------------------------------------------
    def diagnostics(
        self,
        rollout: Rollout,
        log_u: Tensor,
        log_w: Tensor,
        keys: list,
        pseudo,
        clipped,
        weight: Tensor,
    ) -> dict[str, float]:
        """Divergences to the target (weighted by ω = π/q), Z, effective sample size, clipping,
        distinct-n."""
        out = {
            f"fdpg/target_divergence/{name}": float((weight * divergence_terms(d, log_u)).mean())
            for name, d in self.diagnosed.items()
        }
        by_key: dict[Any, list[int]] = {}
        for i, key in enumerate(keys):
            by_key.setdefault(key, []).append(i)
        log_zs = torch.tensor([self.log_z.get(k) for k in by_key], dtype=torch.float64)
        finite = log_zs[torch.isfinite(log_zs)]
        out["fdpg/log_z"] = float(finite.mean()) if finite.numel() else float("-inf")
        out["fdpg/log_z_spread"] = float(finite.std(unbiased=False)) if finite.numel() else 0.0
        batches = [log_w[torch.tensor(rows, device=log_w.device)] for rows in by_key.values()]
        out["fdpg/ess"] = sum(effective_sample_fraction(w) for w in batches) / len(batches)
        errs = [log_z_stderr(w) for w in batches]
        errs = [e for e in errs if e != float("inf")]
        out["fdpg/log_z_stderr"] = sum(errs) / len(errs) if errs else 0.0
        out["fdpg/pseudo_reward_mean"] = float(pseudo.mean())
        out["fdpg/pseudo_reward_std"] = float(pseudo.std(unbiased=False))
        if self.settings.weight_clip is not None:
            out["fdpg/clipped_fraction"] = float(clipped.double().mean())
        for n in (1, 2, 3):
            out[f"diversity/distinct_{n}"] = distinct_n(
                rollout.completion_ids, rollout.completion_mask, n
            )
        return out

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Z, λ, the fit's window of past batches and every counter: all a refit after a resume
        needs to see what it would have seen without one (the tensors go to the checkpoint's
        tensor file)."""
        lambdas = None if self.lambdas is None else self.lambdas.tolist()
        window = [
            {"phi": phi.clone(), "log_w0": log_w0.clone(), "keys": keys.clone()}
            for phi, log_w0, keys in self.fit_buffer
        ]
        return {
            "log_z": self.log_z.state_dict(),
            "lambdas": lambdas,
            "fitted": self.fitted,
            "steps": self.steps,
            "refit_failures": self.refit_failures,
            "fit_buffer": window,
            "proposal_updates": self.proposal_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_z.load_state_dict(state["log_z"])
        lambdas = state["lambdas"]
        self.lambdas = None if lambdas is None else torch.tensor(lambdas, dtype=torch.float64)
        self.fitted = bool(state["fitted"])
        self.steps = int(state["steps"])
        # checkpoints written before these were saved lack them (their resume restarts the window)
        self.refit_failures = int(state.get("refit_failures", 0))
        window = state.get("fit_buffer", [])
        self.fit_buffer = deque(
            ((e["phi"], e["log_w0"], e["keys"]) for e in window), maxlen=self.settings.refit_window
        )
        self.proposal_updates = int(state.get("proposal_updates", 0))
