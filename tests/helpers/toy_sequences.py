"""An enumerable sequence toy for f-DPG: completions of length ≤ 3 over a vocabulary of 4 tokens
(token 3 is EOS), a tabular autoregressive policy, and rollouts shaped like the loop's.

The 13 states are the EOS-free prefixes of length 0, 1, 2; a policy is a logit table [13, 4].
The 40 completions are the 1 + 3 + 9 EOS-terminated ones plus the 27 of length 3 without EOS
(truncated at the maximum length, as the loop's generation does).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from kltrain.rollout import Rollout

V, EOS, T = 4, 3, 3
NON_EOS = (0, 1, 2)
PREFIXES = [()] + [(a,) for a in NON_EOS] + list(itertools.product(NON_EOS, NON_EOS))
STATE = {p: i for i, p in enumerate(PREFIXES)}


def all_completions() -> tuple[Tensor, Tensor]:
    """Every completion: tokens [40, 3] (0 after EOS) and mask [40, 3] bool."""
    seqs = [(EOS,)] + [(a, EOS) for a in NON_EOS]
    seqs += [(a, b, EOS) for a in NON_EOS for b in NON_EOS]
    seqs += list(itertools.product(NON_EOS, repeat=3))
    tokens = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    return tokens, mask


def states_of(tokens: Tensor) -> Tensor:
    """[N, 3] tokens → [N, 3] state index before each token (prefixes after EOS are clamped)."""
    n = tokens.shape[0]
    out = torch.zeros(n, T, dtype=torch.long)
    t0 = tokens[:, 0].clamp(max=2)
    t1 = tokens[:, 1].clamp(max=2)
    out[:, 1] = 1 + t0
    out[:, 2] = 4 + 3 * t0 + t1
    return out


def token_logprobs(table: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """Per-token log π(y_t|s_t) [N, 3], zero on padding (differentiable in ``table``)."""
    logp = torch.log_softmax(table, dim=-1)[states_of(tokens), tokens]
    return logp * mask


def sequence_logprobs(table: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    return token_logprobs(table, tokens, mask).sum(dim=1)


@torch.no_grad()
def sample(table: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """n completions from the tabular policy: tokens [n, 3], mask [n, 3]."""
    probs = torch.softmax(table.double(), dim=-1)
    tokens = torch.zeros(n, T, dtype=torch.long)
    mask = torch.zeros(n, T, dtype=torch.bool)
    alive = torch.ones(n, dtype=torch.bool)
    state = torch.zeros(n, dtype=torch.long)
    for t in range(T):
        tok = torch.multinomial(probs[state], 1, generator=generator).squeeze(1)
        tokens[:, t] = torch.where(alive, tok, 0)
        mask[:, t] = alive
        alive = alive & (tok != EOS)
        first = tokens[:, 0].clamp(max=2)
        state = 1 + tok.clamp(max=2) if t == 0 else 4 + 3 * first + tok.clamp(max=2)
    return tokens, mask


def contains_zero(tokens: Tensor, mask: Tensor) -> Tensor:
    """A 0/1 constraint [N]: the completion uses token 0."""
    return ((tokens == 0) & mask).any(dim=1).double()


def truncated(tokens: Tensor, mask: Tensor) -> Tensor:
    """A second feature [N]: the completion reached the length limit without EOS."""
    return (mask.all(dim=1) & (tokens[:, -1] != EOS)).double()


def toy_reward(tokens: Tensor, mask: Tensor) -> Tensor:
    """A dense reward [N]: number of 0s minus 0.5 per 2."""
    return ((tokens == 0) & mask).sum(1).double() - 0.5 * ((tokens == 2) & mask).sum(1).double()


def toy_rollout(
    tokens: Tensor,
    mask: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    group_size: int,
    per_term: dict[str, Tensor] | None = None,
    prompt_index: int = 0,
) -> Rollout:
    """A Rollout of n samples of one prompt in contiguous groups (for the baseline)."""
    n = tokens.shape[0]
    rollout = Rollout(
        prompt_indices=[prompt_index] * n,
        group_ids=torch.arange(n // group_size).repeat_interleave(group_size),
        prompts=["x"] * n,
        completions=[""] * n,
        input_ids=tokens,
        attention_mask=mask.long(),
        completion_mask=mask,
        prompt_length=0,
        stats={"logprobs": logprobs.float(), "ref_logprobs": ref_logprobs.float()},
    )
    rollout.rewards_per_term = dict(per_term or {})
    return rollout


def exact_frequency_sample(
    table: Tensor, n: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """n completions whose empirical distribution is π up to rounding (each completion y appears
    ``round(n·π(y))`` times, largest remainders first), in random order: a Monte-Carlo sample
    without the sampling noise, so expectations over it are exact to O(40/n)."""
    tokens, mask = all_completions()
    probs = sequence_logprobs(table.detach(), tokens, mask).exp()
    counts = torch.floor(probs * n).long()
    remainder = probs * n - counts
    short = n - int(counts.sum())
    counts[torch.argsort(remainder, descending=True)[:short]] += 1
    index = torch.repeat_interleave(torch.arange(len(probs)), counts)
    index = index[torch.randperm(n, generator=generator)]
    return tokens[index], mask[index]
