"""Evaluation of a policy on held-out prompts: what ``kltrain eval`` (experiments/evaluate.py)
and ``trainer.eval_every`` report.

On held-out prompts, sample ``samples_per_prompt`` completions with the run's generation settings
(from the policy, under a fixed seed, without touching the training RNG) and measure, with the
machinery the loop uses (:func:`kltrain.rollout.generate`, :func:`kltrain.rollout.measure`, the
run's :class:`~kltrain.rewards.RewardFunction`):

- ``reward/mean`` (the weighted total) and ``reward/raw/<term>`` (each term before transforms);
- ``divergence/<name>`` (exact per-token divergence to the reference summed over a sequence's
  tokens, mean over sequences) and ``divergence/<name>_per_token`` (Σ over all tokens / number of
  tokens), for reverse KL, forward KL, JS and the run's own divergence;
- ``reference_perplexity`` = exp(−Σ log π_ref(y_t) / N) over all N sample tokens;
- ``completion/entropy_per_token`` (policy entropy, mean over tokens), ``completion/length``;
- ``diversity/distinct_{1,2,3}`` and ``diversity/self_bleu``: within each prompt's samples (on
  whitespace-separated words), then the mean over prompts (:func:`distinct_n`, :func:`self_bleu`);
- for f-DPG runs, ``fdpg/target_divergence/*`` and ``fdpg/alignment/*`` as the loop computes them
  (the run's λ; Z estimated per held-out prompt from its own samples).

Every name is the loop's metric name (README "What a run writes"), prefixed ``eval/``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from kltrain.config import RunConfig
from kltrain.data import render_prompt, split_heldout
from kltrain.divergence.functions import get_divergence
from kltrain.models.loading import Models
from kltrain.objective import LOGGED_DIVERGENCES
from kltrain.rewards import RewardFunction
from kltrain.rollout import Rollout, measure, sample_rollout

#: Prompts per generation batch (each with ``samples_per_prompt`` samples).
PROMPTS_PER_BATCH = 8
#: NLTK's ``SmoothingFunction().method1``: a zero n-gram match count counts as this much.
BLEU_EPSILON = 0.1
FDPG_KEYS = ("fdpg/target_divergence/", "fdpg/alignment/", "fdpg/log_z")


# ----------------------------------------------------------------------------------------------
# Diversity: pure functions of token lists


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[Sequence[str]], n: int) -> float:
    """Distinct-n of one prompt's samples: unique n-grams / all n-grams, pooled over the samples
    (NaN when no sample has n tokens)."""
    grams = [g for s in samples for g in ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else math.nan


def bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Sentence BLEU-``max_n`` with uniform weights (Papineni et al. 2002):
    ``BP · exp(Σ_n log p_n / max_n)``, ``p_n`` the clipped n-gram precision
    ``Σ_g min(c_hyp(g), max_ref c_ref(g)) / Σ_g c_hyp(g)``; a zero match count counts as
    ``BLEU_EPSILON`` (NLTK's smoothing method 1), an order with no hypothesis n-gram as
    ``BLEU_EPSILON / 1``. ``BP = 1`` if ``c > r`` else ``exp(1 − r/c)``, c the hypothesis length,
    r the reference length closest to c (the shorter on a tie). An empty hypothesis scores 0."""
    c = len(hypothesis)
    if c == 0 or not references:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        hyp = Counter(ngrams(hypothesis, n))
        best: Counter = Counter()
        for ref in references:
            best |= Counter(ngrams(ref, n))  # element-wise max of the counts
        matches = sum(min(k, best[g]) for g, k in hyp.items())
        total = max(sum(hyp.values()), 1)
        log_p += math.log((matches or BLEU_EPSILON) / total)
    r = min((len(ref) for ref in references), key=lambda length: (abs(length - c), length))
    bp = 1.0 if c > r else math.exp(1.0 - r / c)
    return bp * math.exp(log_p / max_n)


def self_bleu(samples: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Self-BLEU of one prompt's samples (Zhu et al. 2018): the mean over samples of the BLEU of
    each against all the others as references (higher: less diverse). NaN for < 2 samples."""
    if len(samples) < 2:
        return math.nan
    scores = [bleu(s, samples[:i] + samples[i + 1 :], max_n) for i, s in enumerate(samples)]
    return sum(scores) / len(scores)


def diversity(groups: Sequence[Sequence[str]]) -> dict[str, float]:
    """Per prompt (each group: that prompt's completion texts, split on whitespace), then the
    mean over prompts (NaN values, e.g. too-short samples, left out)."""
    words = [[list(t.split()) for t in group] for group in groups]
    out = {
        f"diversity/distinct_{n}": _nanmean([distinct_n(w, n) for w in words]) for n in (1, 2, 3)
    }
    out["diversity/self_bleu"] = _nanmean([self_bleu(w) for w in words])
    return out


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


# ----------------------------------------------------------------------------------------------
# Evaluating a policy


@dataclass
class EvalData:
    """The prompts to evaluate on: the dataset and the row indices to use, and where they came
    from (for eval.json)."""

    dataset: Any
    indices: list[int]
    source: str


@dataclass
class _Sums:
    """Running sums over the evaluated samples (float64)."""

    n_seq: int = 0
    n_tok: int = 0
    reward: float = 0.0
    valid: int = 0

    def __post_init__(self) -> None:
        self.per_seq: dict[str, float] = {}
        self.per_tok: dict[str, float] = {}
        self.terms: dict[str, float] = {}
        self.fdpg: dict[str, float] = {}
        self.groups: list[list[str]] = []
        self.fdpg_batches = 0


@torch.no_grad()
def evaluate_policy(
    models: Models,
    cfg: RunConfig,
    data: EvalData,
    *,
    samples_per_prompt: int,
    seed: int,
    reward_fn: RewardFunction,
    algorithm=None,
    progress: bool = True,
) -> dict[str, float]:
    """Metrics (names without the ``eval/`` prefix) of the current policy on ``data``.

    Sampling runs under ``torch.random.fork_rng`` seeded with ``seed``: the result is a function
    of (weights, prompts, seed) and the caller's RNG streams are left as they were. The reward
    transforms' statistics and an f-DPG algorithm's state are restored afterwards."""
    reward_state = copy.deepcopy(reward_fn.state_dict())
    algo_state = copy.deepcopy(algorithm.state_dict()) if algorithm is not None else None
    divergences = {n: get_divergence(n) for n in LOGGED_DIVERGENCES}
    divergences[cfg.kl.divergence] = get_divergence(cfg.kl.divergence, **cfg.kl.divergence_params())
    device = next(models.policy.parameters()).device
    sums = _Sums()
    batches = [
        data.indices[i : i + PROMPTS_PER_BATCH]
        for i in range(0, len(data.indices), PROMPTS_PER_BATCH)
    ]
    devices = [device] if device.type == "cuda" else []
    was_training = models.policy.training
    models.policy.eval()  # dropout off: the policy as it samples
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for batch in tqdm(batches, desc="eval", disable=not progress, dynamic_ncols=True):
                rollout = _rollout(models, cfg, data.dataset, batch, samples_per_prompt)
                measure(
                    rollout,
                    models,
                    list(divergences.values()),
                    micro_batch_size=cfg.trainer.micro_batch_size,
                    chunk_size=cfg.kl.chunk_size,
                    keep_ref_hidden=False,
                    proposal=models.policy if _offline(cfg) else None,
                )
                _accumulate(sums, rollout, divergences, data.dataset, reward_fn, algorithm)
    finally:
        models.policy.train(was_training)
        reward_fn.load_state_dict(reward_state)
        if algorithm is not None:
            algorithm.load_state_dict(algo_state)
    return _finish(sums)


def _offline(cfg: RunConfig) -> bool:
    return (
        cfg.algorithm.name == "fdpg"
        and cfg.algorithm.fdpg is not None
        and cfg.algorithm.fdpg.proposal == "offline"
    )


def _rollout(models: Models, cfg: RunConfig, dataset, indices: list[int], k: int) -> Rollout:
    """k samples of each prompt in ``indices`` from the policy, as the loop's make_rollout."""
    seq_indices = [i for i in indices for _ in range(k)]
    prompts = [dataset[i]["prompt"] for i in seq_indices]
    texts = [
        render_prompt(models.tokenizer, p, cfg.data.chat_template, cfg.data.system_prompt)
        for p in prompts
    ]
    return sample_rollout(
        models,
        texts,
        prompts,
        seq_indices,
        k,
        cfg.generation,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        batch_size=cfg.trainer.generation_batch_size,
    )


def _accumulate(sums: _Sums, rollout: Rollout, divergences, dataset, reward_fn, algorithm) -> None:
    mask = rollout.completion_mask
    stats = {k: v.double() * mask for k, v in rollout.stats.items()}
    sums.n_seq += rollout.num_sequences
    sums.n_tok += int(mask.sum())
    for name in divergences:
        _add(sums.per_seq, name, float(stats[name].sum()))
    _add(sums.per_tok, "ref_nll", -float(stats["ref_logprobs"].sum()))
    _add(sums.per_tok, "entropy", float(stats["entropy"].sum()))
    _add(sums.per_seq, "length", float(mask.sum()))
    columns = {
        name: [dataset[i][name] for i in rollout.prompt_indices]
        for name in dataset.column_names
        if name != "prompt"
    }
    result = reward_fn(rollout.prompts, rollout.completions, step=0, columns=columns)
    valid = ~result.invalid
    sums.valid += int(valid.sum())
    sums.reward += float(result.total.double()[valid].sum())
    for term, values in result.raw.items():
        _add(sums.terms, term, float(values.double()[valid].sum()))
    k = rollout.num_sequences // len(set(rollout.group_ids.tolist()))
    sums.groups += [rollout.completions[i : i + k] for i in range(0, rollout.num_sequences, k)]
    if algorithm is not None:
        rollout.rewards_per_term = dict(result.per_term)
        # Z is kept per prompt key: held-out prompts get keys of their own ("eval:<row>"), so
        # none starts from the estimate of the training prompt that has the same row number
        keyed = dataclasses.replace(
            rollout, prompt_indices=[f"eval:{i}" for i in rollout.prompt_indices]
        )
        batch = algorithm.prepare(keyed, result.total.to(mask.device, torch.float32), None)
        for key, value in batch.metrics.items():
            if key.startswith(FDPG_KEYS):
                _add(sums.fdpg, key, float(value))
        sums.fdpg_batches += 1


def _add(store: dict[str, float], key: str, value: float) -> None:
    store[key] = store.get(key, 0.0) + value


def _finish(sums: _Sums) -> dict[str, float]:
    n_seq, n_tok = max(sums.n_seq, 1), max(sums.n_tok, 1)
    out = {
        "reward/mean": sums.reward / max(sums.valid, 1),
        "reward/invalid": float(sums.n_seq - sums.valid),
    }
    out.update({f"reward/raw/{t}": v / max(sums.valid, 1) for t, v in sums.terms.items()})
    for name, total in sums.per_seq.items():
        if name == "length":
            out["completion/length"] = total / n_seq
            continue
        out[f"divergence/{name}"] = total / n_seq
        out[f"divergence/{name}_per_token"] = total / n_tok
    out["reference_perplexity"] = math.exp(sums.per_tok["ref_nll"] / n_tok)
    out["completion/entropy_per_token"] = sums.per_tok["entropy"] / n_tok
    out.update(diversity(sums.groups))
    out.update({k: v / sums.fdpg_batches for k, v in sums.fdpg.items()})
    out["samples"] = float(sums.n_seq)
    return out


# ----------------------------------------------------------------------------------------------
# Which prompts


def training_eval_data(cfg: RunConfig, full_dataset) -> EvalData:
    """The held-out split the loop evaluates on every ``trainer.eval_every`` steps."""
    _, held = split_heldout(full_dataset, cfg.data)
    return EvalData(full_dataset, held, f"{cfg.data.prompts} (data.heldout_prompts)")
