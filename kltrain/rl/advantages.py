"""Advantages and baselines: leave-one-out (RLOO), group normalisation (GRPO), reward-to-go,
GAE, whitening, and running reward statistics. Pure tensor functions, no models or config.

Shapes: `[B]` sequence-level, `[B, T]` token-level, masks `[B, T]` (bool or 0/1; 1 = a valid,
generated token). Group layouts are `[P*k]` with the `k` samples of each prompt contiguous
(`rewards.view(P, k)`). Token-level functions treat the valid tokens of a row as one sequence
*compacted*: a padding position (anywhere in the row) is skipped, not counted as a time step, and
gets an exact 0 in every output. All outputs are detached: advantages are targets, not graph.

Variances: GRPO's group std is the unbiased (Bessel) one, as in TRL, so that the advantages are
the same numbers TRL would give. `whiten` uses the biased (population)
variance: whitened values then have exactly unit variance over the batch, and a batch of one
element is defined; at RL batch sizes the two differ by a factor n/(n-1) ≈ 1.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """`[P*k]` → `[P, k]`, checking the layout."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [P*k], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be ≥ 2 for a group baseline, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of {group_size} "
            "(expected [P*k], the k samples of each prompt contiguous)"
        )
    return rewards.detach().view(-1, group_size)


def _valid_groups(valid: Tensor | None, g: Tensor) -> Tensor:
    """`[P*k]` bool (or None: all valid) → `[P, k]` float weights."""
    if valid is None:
        return torch.ones_like(g)
    if valid.shape != (g.numel(),):
        raise ValueError(f"valid must be [P*k]={g.numel()}, got {tuple(valid.shape)}")
    return valid.detach().to(g.dtype).view_as(g)


def rloo_baseline(rewards: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
    """Leave-one-out baseline `b_i = mean_{j≠i, j valid} r_j` over the sample's group.

    rewards `[P*k]` (groups contiguous), valid `[P*k]` bool (None: all valid) → `[P*k]`. A sample
    with no other valid sample in its group gets `b_i = r_i` (advantage 0); invalid samples
    (`reward.on_invalid: skip`) never enter another sample's baseline.
    """
    g = _groups(rewards, group_size)
    v = _valid_groups(valid, g)
    others_sum = (g * v).sum(dim=1, keepdim=True) - g * v
    others_n = v.sum(dim=1, keepdim=True) - v
    baseline = torch.where(others_n > 0, others_sum / others_n.clamp(min=1), g)
    return baseline.reshape(-1)


def group_mean_std(
    rewards: Tensor, group_size: int, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Each sample's group mean and unbiased (Bessel) std over the group's valid samples.

    rewards, valid `[P*k]` → (mean `[P*k]`, std `[P*k]`); std is 0 for a group with fewer than
    two valid samples.
    """
    g = _groups(rewards, group_size)
    v = _valid_groups(valid, g)
    n = v.sum(dim=1, keepdim=True)
    mean = (g * v).sum(dim=1, keepdim=True) / n.clamp(min=1)
    var = (((g - mean) ** 2) * v).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
    std = torch.where(n > 1, var.sqrt(), torch.zeros_like(var))
    k = group_size
    return mean.expand(-1, k).reshape(-1), std.expand(-1, k).reshape(-1)


def _check_tokens(x: Tensor, mask: Tensor, name: str) -> Tensor:
    if x.dim() != 2 or x.shape != mask.shape:
        raise ValueError(
            f"{name} must be [B, T] like mask {tuple(mask.shape)}, got {tuple(x.shape)}"
        )
    return mask.bool()


def _discounted_reverse_cumsum(x: Tensor, mask: Tensor, discount: float) -> Tensor:
    """`out_t = Σ_{t' ≥ t valid} discount^{n(t, t')} x_t'` over valid tokens, where `n(t, t')`
    counts the valid tokens after `t` up to and including `t'`; padding → 0. `[B, T]` → `[B, T]`."""
    carry = torch.zeros_like(x[:, 0])
    out = torch.zeros_like(x)
    for t in range(x.shape[1] - 1, -1, -1):
        carry = torch.where(mask[:, t], x[:, t] + discount * carry, carry)
        out[:, t] = torch.where(mask[:, t], carry, 0.0)
    return out


def _next_valid(x: Tensor, mask: Tensor) -> Tensor:
    """`out_t` = `x` at the next valid position after `t` in the row, 0 if there is none."""
    carry = torch.zeros_like(x[:, 0])
    out = torch.zeros_like(x)
    for t in range(x.shape[1] - 1, -1, -1):
        out[:, t] = carry
        carry = torch.where(mask[:, t], x[:, t], carry)
    return out


def gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016).

    `δ_t = r_t + γ·V_{t+1} − V_t`, `A_t = Σ_{t' ≥ t} (γλ)^{t'−t} δ_t'`, returns `R_t = A_t + V_t`,
    with `V` after the last valid token = 0 (the episode ends with the completion) and `t+1`
    the next *valid* token. token_rewards, values, mask `[B, T]` → (advantages `[B, T]`,
    returns `[B, T]`), both exactly 0 at padding (whatever `values` holds there, even NaN).
    γ = λ = 1 gives `A_t = G_t − V_t` with `G` the reward-to-go.
    """
    mask = _check_tokens(token_rewards, mask, "token_rewards")
    _check_tokens(values, mask, "values")
    r = torch.where(mask, token_rewards.detach(), 0.0)
    v = torch.where(mask, values.detach(), 0.0)
    deltas = torch.where(mask, r + gamma * _next_valid(v, mask) - v, 0.0)
    advantages = _discounted_reverse_cumsum(deltas, mask, gamma * lam)
    returns = torch.where(mask, advantages + v, 0.0)
    return advantages, returns


def _masked_moments(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(count, mean, biased variance) of `x` over `mask` (all of `x` when None)."""
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    mask = mask.bool()
    if mask.shape != x.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match x {tuple(x.shape)}")
    count = mask.sum()
    mean = torch.where(mask, x, 0.0).sum() / count
    var = torch.where(mask, (x - mean) ** 2, 0.0).sum() / count
    return count, mean, var


def whiten(
    x: Tensor, mask: Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8
) -> Tensor:
    """Standardise over the valid entries: `(x − mean) / sqrt(var + eps)` with the masked mean and
    the biased (population) masked variance; `shift_mean=False` adds the mean back (scale only).

    x any shape, mask the same shape or None (all valid) → same shape; masked-out entries → 0.
    Detached.
    """
    x = x.detach()
    _, mean, var = _masked_moments(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out if mask is None else torch.where(mask.bool(), out, 0.0)


def assemble_token_rewards(
    sequence_reward: Tensor, token_penalty: Tensor, mask: Tensor, coef: float
) -> Tensor:
    """Per-token rewards for PPO with the penalty in the reward (MATH.md, InstructGPT/Llama 2):
    `r_t = −coef·d_t` on every valid token, plus `R` on the last valid token of each row.

    sequence_reward `[B]`, token_penalty `[B, T]` (d_t), mask `[B, T]` → `[B, T]`, exactly 0 at
    padding (whatever token_penalty holds there). Every row needs at least one valid token
    (its reward must land somewhere). Detached.
    """
    mask = _check_tokens(token_penalty, mask, "token_penalty")
    if sequence_reward.shape != mask.shape[:1]:
        raise ValueError(
            f"sequence_reward must be [B] = {tuple(mask.shape[:1])}, "
            f"got {tuple(sequence_reward.shape)}"
        )
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).max(dim=1).values
    if bool((last < 0).any()):
        raise ValueError("a row of mask has no valid token: its sequence reward has no place")
    rewards = torch.where(mask, -coef * token_penalty.detach(), 0.0)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += sequence_reward.detach().to(rewards.dtype)
    return rewards
