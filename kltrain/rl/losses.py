"""Policy-gradient, value and divergence-penalty losses. Pure tensor functions.

Every summed loss returns `(loss, metrics)` and is a **sum over valid tokens divided by
`num_tokens`, the global count of valid tokens in the optimisation step** (all micro-batches,
all processes), passed in by the caller. Then the step's loss is the plain sum of the
micro-batch losses over accumulation and processes, and cutting a batch differently cannot
change it or its gradient (each token weighs `1/num_tokens`, the "token-mean" aggregation).
Under DDP, whose gradient all-reduce *averages* over processes, the caller multiplies the loss
by the world size (or divides `num_tokens` by it) to keep the sum.

Metrics follow the same rule: each is `Σ_valid (per-token quantity) / num_tokens`, detached,
so summing a metric over micro-batches and processes gives its step-wide token mean. (A
clip fraction is then a fraction of all the step's valid tokens.)

Each loss has a per-token form, `token_*_loss`, for callers that work on a flattened `[N]` token
axis (the chunked lm_head kernel): it returns the unreduced loss and per-token statistics, and
the summed form is exactly `sum_over_tokens` of those.

Shapes: `[B, T]` token-level with mask `[B, T]` (bool or 0/1), or any shape with mask None.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sum_over_tokens(x: Tensor, mask: Tensor | None, num_tokens: int | float | Tensor) -> Tensor:
    """`Σ_{valid t} x_t / num_tokens`. x any shape, mask the same shape or None (all valid).

    Masked-out entries contribute exactly 0, even if `x` is NaN or inf there.
    """
    if isinstance(num_tokens, (int, float)) and num_tokens <= 0:
        raise ValueError(f"num_tokens must be > 0 (valid tokens in the step), got {num_tokens}")
    if mask is not None:
        x = torch.where(mask.bool(), x, 0.0)
    return x.sum() / num_tokens


def _broadcast_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    """Sequence-level `[B]` advantages → `[B, 1]` against token-level `[B, T]`; else same shape."""
    advantages = advantages.detach()
    if advantages.shape == like.shape:
        return advantages
    if advantages.dim() == like.dim() - 1 and advantages.shape == like.shape[:-1]:
        return advantages.unsqueeze(-1)
    raise ValueError(
        f"advantages {tuple(advantages.shape)} must match log-probs {tuple(like.shape)} "
        "or be one per sequence [B] against [B, T]"
    )


def _mask_inputs(mask: Tensor, *xs: Tensor) -> tuple[Tensor, ...]:
    """Zero padding in the inputs so NaN/inf there cannot reach the loss or its gradient."""
    m = mask.bool()
    return tuple(torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)) for x in xs)


def token_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip_range: float | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token (clipped) surrogate loss, unreduced.

    `ratio = exp(ℓ − ℓ_old)`; with `ε = clip_range`:
    `loss_t = −min(ratio·A, clip(ratio, 1−ε, 1+ε)·A)`; with `clip_range=None`:
    `loss_t = −ratio·A`, whose gradient on-policy (`ℓ_old = ℓ`) is `−A·∇ℓ`.
    `old_logprobs` and `advantages` are treated as constants (detached).

    logprobs, old_logprobs `[B, T]` (or any shape, e.g. a flat `[N]`), advantages the same
    shape or `[B]` (one per sequence, broadcast over tokens) → (loss `[B, T]`, stats), stats
    per token and detached:
    - `clipped`: 1 where the clip is active, i.e. the token's gradient is zero:
      `(A > 0 and ratio > 1+ε) or (A < 0 and ratio < 1−ε)`;
    - `approx_kl`: k3 estimate of KL(π_old‖π) on tokens sampled from π_old,
      `(ratio − 1) − log ratio` (≥ 0);
    - `ratio`.
    """
    advantages = _broadcast_advantages(advantages, logprobs)
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    loss = -ratio * advantages
    if clip_range is None:
        clipped = torch.zeros_like(loss, dtype=torch.bool)
    else:
        clipped_ratio = ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
        loss = torch.maximum(loss, -clipped_ratio * advantages)
        clipped = ((advantages > 0) & (ratio > 1.0 + clip_range)) | (
            (advantages < 0) & (ratio < 1.0 - clip_range)
        )
    log_ratio, ratio = log_ratio.detach(), ratio.detach()
    stats = {
        "clipped": clipped.to(ratio.dtype).expand_as(loss),
        "approx_kl": ((ratio - 1.0) - log_ratio).expand_as(loss),
        "ratio": ratio.expand_as(loss),
    }
    return loss, stats


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    num_tokens: int | Tensor,
    clip_range: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`Σ_valid token_policy_loss / num_tokens` (see `token_policy_loss` for the formula).

    logprobs, old_logprobs, mask `[B, T]`; advantages `[B, T]` or `[B]` → (scalar loss, metrics)
    with metrics `clip_fraction`, `approx_kl`, `ratio`, each `Σ_valid stat / num_tokens`
    (sum them over micro-batches and processes for the step-wide token mean).
    """
    advantages = _broadcast_advantages(advantages, logprobs).expand_as(logprobs)
    logprobs, old_logprobs, advantages = _mask_inputs(mask, logprobs, old_logprobs, advantages)
    loss, stats = token_policy_loss(logprobs, old_logprobs, advantages, clip_range)
    metrics = {
        "clip_fraction": sum_over_tokens(stats["clipped"], mask, num_tokens),
        "approx_kl": sum_over_tokens(stats["approx_kl"], mask, num_tokens),
        "ratio": sum_over_tokens(stats["ratio"], mask, num_tokens),
    }
    return sum_over_tokens(loss, mask, num_tokens), metrics


def token_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, clip_range: float | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO value loss, unreduced:
    `0.5·max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²)`, or `0.5·(V − R)²` when
    `clip_range` is None. `old_values` and `returns` are constants (detached).

    All inputs the same shape → (loss, stats) with per-token detached stats `clipped` (1 where
    the clipped term is strictly larger, i.e. the token's gradient is zero) and `squared_error`
    `(V − R)²`.
    """
    old_values, returns = old_values.detach(), returns.detach()
    loss = 0.5 * (values - returns) ** 2
    if clip_range is None:
        clipped = torch.zeros_like(loss, dtype=torch.bool)
    else:
        v_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
        loss_clipped = 0.5 * (v_clipped - returns) ** 2
        clipped = loss_clipped > loss
        loss = torch.maximum(loss, loss_clipped)
    stats = {
        "clipped": clipped.to(loss.dtype).detach(),
        "squared_error": ((values - returns) ** 2).detach(),
    }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    num_tokens: int | Tensor,
    clip_range: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`Σ_valid token_value_loss / num_tokens` (see `token_value_loss` for the formula).

    values, old_values, returns, mask `[B, T]` → (scalar loss, metrics) with metrics
    `value_clip_fraction` and `value_mse`, each `Σ_valid stat / num_tokens`.
    """
    values, old_values, returns = _mask_inputs(mask, values, old_values, returns)
    loss, stats = token_value_loss(values, old_values, returns, clip_range)
    metrics = {
        "value_clip_fraction": sum_over_tokens(stats["clipped"], mask, num_tokens),
        "value_mse": sum_over_tokens(stats["squared_error"], mask, num_tokens),
    }
    return sum_over_tokens(loss, mask, num_tokens), metrics


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor | None = None) -> Tensor:
    """`1 − Var[R − V] / Var[R]` over the valid tokens (a diagnostic of the value head: 1 is
    perfect, 0 no better than a constant, negative worse). values, returns `[B, T]`, mask the
    same or None → scalar (detached, float64 inside); NaN when `Var[R] = 0`. The variance's
    normalisation (biased or not) cancels in the ratio.
    """
    m = torch.ones_like(returns, dtype=torch.bool) if mask is None else mask.bool()
    v, r = values.detach().double()[m], returns.detach().double()[m]
    var_r = r.var(unbiased=False)
    if var_r == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=r.device)
    return 1.0 - (r - v).var(unbiased=False) / var_r
