"""Rollouts: generate completions, build masks, and compute per-token statistics once per batch.

Shapes: B sequences (prompts × samples per prompt, this process's share), P padded prompt length
(prompts are left-padded), T padded completion length (completions are right-padded), H hidden
size, N the number of valid completion tokens (``completion_mask.sum()``).

The position that predicts completion token t is ``P - 1 + t``: hidden states are taken there.
Everything computed here is computed without gradient and once per rollout batch (never once per
optimisation epoch): the policy's log-probs at sampling time ("old"), the reference's log-probs,
final hidden states (kept so the exact divergence can be trained without a second reference
forward) and the exact per-token divergences that every run logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import LogitsProcessorList

from kltrain.config import GenerationConfig
from kltrain.divergence.functions import Divergence
from kltrain.divergence.lm_head import token_stats
from kltrain.models.cpu_linear import onednn_linears
from kltrain.models.loading import Models
from kltrain.models.logits import final_hidden_states, last_position_hidden, lm_head_params
from kltrain.models.sampling import PerSampleGumbel
from kltrain.models.shared_prefix import (
    cache_keyword,
    hidden_after_shared_prefix,
    shared_prefix_cache,
)


@dataclass
class Rollout:
    """One batch of sampled completions and everything measured on it (no gradient)."""

    prompt_indices: list[int]  # [B] dataset row of each sequence
    group_ids: Tensor  # [B] long: sequences with the same id share a prompt
    prompts: list  # [B] prompts as the dataset gave them (string or messages)
    completions: list[str]  # [B] decoded completions (special tokens removed)
    input_ids: Tensor  # [B, P + T] prompt (left-padded) then completion (right-padded)
    attention_mask: Tensor  # [B, P + T]
    completion_mask: Tensor  # [B, T] bool: completion tokens up to and including the first EOS
    prompt_length: int  # P
    stats: dict[str, Tensor] = field(default_factory=dict)
    """[B, T] per-token tensors, zero on padding: "logprobs" (policy at sampling time),
    "ref_logprobs", "entropy", one exact divergence per name (e.g. "reverse_kl"), and
    "proposal_logprobs" when a model other than the policy generated the rollout."""
    ref_hidden: Tensor | None = None  # [B, T, H] reference final hidden states, when kept
    policy_hidden: Tensor | None = None  # [B, T, H] policy final hidden states, when kept
    rewards_per_term: dict[str, Tensor] = field(default_factory=dict)
    """[B] each reward term after its transforms, before its weight (set when scored)."""

    @property
    def completion_ids(self) -> Tensor:  # [B, T]
        return self.input_ids[:, self.prompt_length :]

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    def completion_lengths(self) -> Tensor:  # [B]
        return self.completion_mask.sum(dim=1)


def completion_mask_from_ids(completion_ids: Tensor, eos_token_ids: Sequence[int]) -> Tensor:
    """[B, T] → [B, T] bool: True up to and including the first EOS of each row.

    ``generate`` fills finished rows with the pad token, which is often the EOS token itself, so
    the mask comes from the first EOS, not from comparing with the pad id.
    """
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for eos in eos_token_ids:
        is_eos |= completion_ids == eos
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS strictly before t
    return eos_before == 0


@torch.no_grad()
def generate(
    models: Models,
    prompt_texts: list[str],
    *,
    max_prompt_tokens: int,
    max_new_tokens: int,
    min_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    batch_size: int,
    model: torch.nn.Module | None = None,
    seeds: Sequence[int] | None = None,
    hidden_out: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Sample one completion per prompt text, from ``model`` (default: the policy).

    ``seeds`` (one per prompt text): each completion draws from its own stream
    (:class:`kltrain.models.sampling.PerSampleGumbel`), so a sample does not depend on the
    process or the generation batch it lands in; None samples from the global torch RNG.

    Returns ``(input_ids [B, P+T], attention_mask [B, P+T], completion_mask [B, T], P)`` with a
    common P (left padding) and T (right padding) across generation micro-batches. With a list
    ``hidden_out``, also appends the sampling model's final hidden states at the positions that
    predict each completion token, ``[B, T, H]`` (zero past each row's end), recorded during
    decoding so that :func:`measure` need not run that model over the rollout again.
    """
    tok = models.tokenizer
    policy = models.policy if model is None else model
    device = next(policy.parameters()).device
    tok.truncation_side = "left"  # keep a long prompt's end: the text the completion continues
    enc = tok(
        prompt_texts,
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=max_prompt_tokens,
        add_special_tokens=False,
    )
    prompt_ids, prompt_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    eos_ids = _eos_ids(models)
    was_training = policy.training
    policy.eval()
    outputs, hiddens = [], []
    for start in range(0, len(prompt_texts), batch_size):
        sl = slice(start, start + batch_size)
        sampling = sampling_kwargs(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
        )
        if seeds is not None:  # greedy over the per-row Gumbel-perturbed, warped logits
            gumbel = PerSampleGumbel(list(seeds[sl]), temperature, top_k, top_p, device)
            sampling |= {"do_sample": False, "logits_processor": LogitsProcessorList([gumbel])}
            sampling |= {"temperature": None, "top_k": None, "top_p": None}
        recording = last_position_hidden(policy) if hidden_out is not None else nullcontext([])
        # decoding: small products, each weight read once per token; oneDNN's blocked copy
        # of the weights reads faster there (models/cpu_linear.py)
        with onednn_linears(policy, packed_rows=prompt_ids[sl].shape[0]):
            prompt_cache = _shared_prompt_cache(policy, prompt_ids[sl], prompt_mask[sl])
            with recording as steps:  # the decoding forwards only, not the prefix's
                out = policy.generate(
                    input_ids=prompt_ids[sl],
                    attention_mask=prompt_mask[sl],
                    **prompt_cache,
                    **sampling,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=eos_ids,
                    # transformers turns this on for a sharded model (an all-reduce per token,
                    # and a hang when one process generates alone); kltrain generates on
                    # gathered weights
                    synced_gpus=False,
                )
        outputs.append(out[:, prompt_ids.shape[1] :])
        if hidden_out is not None:
            hiddens.append(_stack_steps(steps, outputs[-1].shape[1]))
    policy.train(was_training)
    pad = tok.pad_token_id
    width = max(o.shape[1] for o in outputs)
    completion_ids = torch.cat(
        [torch.nn.functional.pad(o, (0, width - o.shape[1]), value=pad) for o in outputs]
    )
    completion_mask = completion_mask_from_ids(completion_ids, eos_ids)
    completion_ids = completion_ids.masked_fill(~completion_mask, pad)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask.long()], dim=1)
    if hidden_out is not None:
        padded = [torch.nn.functional.pad(h, (0, 0, 0, width - h.shape[1])) for h in hiddens]
        hidden_out.append(torch.cat(padded) * completion_mask.unsqueeze(-1))
    return input_ids, attention_mask, completion_mask, prompt_ids.shape[1]


def _shared_prompt_cache(model: torch.nn.Module, ids: Tensor, mask: Tensor) -> dict:
    """``generate``'s KV-cache argument holding the prompts' first P − 1 positions, each
    distinct prompt of the ``[b, P]`` batch run once (``shared_prefix_cache``); generate then
    runs each row's last prompt token and samples. ``{}`` (generate runs the whole prompts) when
    no prompt repeats or sharing would not be exact."""
    n = ids.shape[1] - 1
    positions = prompt_positions(mask)[:, :n]
    cache = shared_prefix_cache(model, ids[:, :n], mask[:, :n], positions)
    return {} if cache is None else {cache_keyword(model): cache}


#: Logits processors a model's own generation_config.json may switch on (e.g. a hub model's
#: ``repetition_penalty``), set to their neutral values: transformers fills every generate()
#: argument left unset from the model's file, and any of these would make the sampled
#: distribution differ from the one the loss differentiates. (A model's ``min_length`` needs no
#: entry: the ``min_new_tokens`` always passed takes precedence, and setting both makes
#: transformers warn at every generate call.)
NEUTRAL_SAMPLING = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_p": None,
    "bad_words_ids": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
}


def sample_rollout(
    models: Models,
    texts: list[str],
    prompts: list,
    prompt_indices: list[int],
    group_size: int,
    gen: GenerationConfig,
    *,
    max_prompt_tokens: int,
    batch_size: int | None = None,
    model: torch.nn.Module | None = None,
    seeds: Sequence[int] | None = None,
    hidden_out: list[Tensor] | None = None,
) -> Rollout:
    """One completion per rendered prompt ``texts[i]`` (``prompts[i]`` as the dataset holds it,
    row ``prompt_indices[i]``; contiguous groups of ``group_size`` share a prompt), sampled with
    ``generation.*`` and decoded: a :class:`Rollout` without statistics (:func:`measure` adds
    them). ``model``, ``seeds``, ``hidden_out``: as :func:`generate`."""
    input_ids, attention_mask, completion_mask, prompt_len = generate(
        models,
        texts,
        max_prompt_tokens=max_prompt_tokens,
        max_new_tokens=gen.max_new_tokens,
        min_new_tokens=gen.min_new_tokens,
        temperature=gen.temperature,
        top_k=gen.top_k,
        top_p=gen.top_p,
        batch_size=batch_size or len(texts),
        model=model,
        seeds=seeds,
        hidden_out=hidden_out,
    )
    pad = models.tokenizer.pad_token_id
    completions = models.tokenizer.batch_decode(
        input_ids[:, prompt_len:].masked_fill(~completion_mask, pad), skip_special_tokens=True
    )
    return Rollout(
        prompt_indices=prompt_indices,
        group_ids=torch.arange(len(texts) // group_size).repeat_interleave(group_size),
        prompts=prompts,
        completions=completions,
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        prompt_length=prompt_len,
    )


def sampling_kwargs(
    *, max_new_tokens: int, min_new_tokens: int, temperature: float, top_k: int, top_p: float
) -> dict:
    """The generate() arguments of kltrain's sampler: the configured ``generation.*`` values
    and every other distribution-changing processor off (:data:`NEUTRAL_SAMPLING`)."""
    return {
        **NEUTRAL_SAMPLING,
        "do_sample": True,
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": min_new_tokens,
        "temperature": temperature,
        "top_k": top_k if top_k > 0 else None,
        "top_p": top_p,
    }


def _stack_steps(steps: list[Tensor], new_tokens: int) -> Tensor:
    """One decoder forward per sampled token: [b, 1, H] × T → [b, T, H]."""
    if len(steps) != new_tokens:
        raise RuntimeError(
            f"generate ran {len(steps)} decoder forwards for {new_tokens} new tokens; the "
            "recorded hidden states cannot be matched to the tokens (pass no hidden_out)"
        )
    return torch.cat(steps, dim=1)


def _eos_ids(models: Models) -> list[int]:
    eos = models.policy.generation_config.eos_token_id
    if eos is None:
        eos = models.tokenizer.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    return [int(i) for i in ids if i is not None]


def completion_hidden(
    model, input_ids: Tensor, attention_mask: Tensor, prompt_length: int
) -> Tensor:
    """[B, P+T] → [B, T, H]: the final hidden state at each position that predicts a completion
    token (position ``P - 1 + t`` predicts token ``t``)."""
    # positions counted from the first real token, as generate() numbers them under left padding
    position_ids = prompt_positions(attention_mask)
    # Rows sharing a prompt run its first P - 1 positions once (and not the last position,
    # which predicts no completion token); else every row runs whole.
    ids, att, pos = input_ids[:, :-1], attention_mask[:, :-1], position_ids[:, :-1]
    shared = hidden_after_shared_prefix(model, ids, att, pos, prompt_length - 1)
    if shared is not None:
        return shared
    hidden = final_hidden_states(model, input_ids, attention_mask, position_ids=position_ids)
    return hidden[:, prompt_length - 1 : -1]


def prompt_positions(attention_mask: Tensor) -> Tensor:
    """[B, S] → [B, S] position ids counted from each row's first real token (0 on the left
    padding), as ``generate`` numbers a left-padded batch."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def measure(
    rollout: Rollout,
    models: Models,
    divergences: Sequence[Divergence],
    *,
    micro_batch_size: int,
    chunk_size: int,
    keep_ref_hidden: bool,
    keep_policy_hidden: bool = False,
    proposal: torch.nn.Module | None = None,
    temperature: float = 1.0,
    sampled_hidden: Tensor | None = None,
) -> None:
    """Fill ``rollout.stats`` (and ``ref_hidden`` / ``policy_hidden`` if asked, zero on
    padding) in micro-batches of sequences; with a ``proposal`` model other than the policy (the
    one that generated the rollout), also its per-token "proposal_logprobs". Every statistic is
    of the tempered models (logits/``temperature``, :func:`tempered`); the kept hidden states
    are not scaled.

    ``sampled_hidden`` ``[B, T, H]``: the policy's final hidden states recorded while it
    generated the rollout (``generate(hidden_out=...)``); given, the policy's forward pass here
    is skipped."""
    policy_w, policy_b = lm_head_params(models.policy)
    with models.reference_context():
        ref_w, ref_b = lm_head_params(models.reference_model)
    _, policy_b = tempered(None, policy_b, temperature)
    _, ref_b = tempered(None, ref_b, temperature)
    parts: list[dict[str, Tensor]] = []
    ref_hiddens, policy_hiddens = [], []
    with onednn_linears(models.policy, models.reference_model, proposal):
        for start in range(0, rollout.num_sequences, micro_batch_size):
            sl = slice(start, start + micro_batch_size)
            ids, att = rollout.input_ids[sl], rollout.attention_mask[sl]
            mask = rollout.completion_mask[sl]
            if sampled_hidden is None:
                h = completion_hidden(models.policy, ids, att, rollout.prompt_length)
            else:
                h = sampled_hidden[sl]
            with models.reference_context():
                h_ref = completion_hidden(models.reference_model, ids, att, rollout.prompt_length)
            flat = token_stats(
                tempered(h[mask], None, temperature)[0],
                policy_w,
                rollout.completion_ids[sl][mask],
                ref_hidden=tempered(h_ref[mask], None, temperature)[0],
                ref_weight=ref_w,
                divergences=divergences,
                chunk_size=chunk_size,
                policy_bias=policy_b,
                ref_bias=ref_b,
            )
            if proposal is not None:
                q_w, q_b = lm_head_params(proposal)
                h_q = completion_hidden(proposal, ids, att, rollout.prompt_length)
                q_h, q_b = tempered(h_q[mask], q_b, temperature)
                q_stats = token_stats(
                    q_h,
                    q_w,
                    rollout.completion_ids[sl][mask],
                    chunk_size=chunk_size,
                    policy_bias=q_b,
                )
                flat["proposal_logprobs"] = q_stats["logprobs"]
            parts.append({k: scatter_tokens(v, mask) for k, v in flat.items()})
            if keep_ref_hidden:
                ref_hiddens.append(h_ref * mask.unsqueeze(-1))
            if keep_policy_hidden:
                policy_hiddens.append(h * mask.unsqueeze(-1))
    rollout.stats = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    rollout.ref_hidden = torch.cat(ref_hiddens) if keep_ref_hidden else None
    rollout.policy_hidden = torch.cat(policy_hiddens) if keep_policy_hidden else None


def tempered(
    hidden: Tensor | None, bias: Tensor | None, temperature: float
) -> tuple[Tensor | None, Tensor | None]:
    """(h/T, b/T): fed to the lm_head they give logits/T, whose log_softmax is the log-prob of
    the tempered policy π^(1/T)/Z, the distribution ``generate`` samples at temperature T (as
    TRL does, for policy and reference alike). Scaling the [..., H] hidden states (and the [V]
    bias) instead of the logits keeps the chunked lm_head kernels unchanged; T = 1 returns the
    inputs themselves."""
    if temperature == 1.0:
        return hidden, bias
    scale = 1.0 / temperature
    return (
        None if hidden is None else hidden * scale,
        None if bias is None else bias * scale,
    )


def scatter_tokens(values: Tensor, mask: Tensor) -> Tensor:
    """[N] values of the valid tokens → [B, T] with zeros on padding."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    out[mask] = values
    return out
