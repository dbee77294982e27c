"""f-DPG's partition function Z(x), estimated per prompt by importance sampling (log space)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

Key = Hashable  # str, int or None (the global estimate); kept as given in state_dict


class LogPartitionEstimate:
    """f-DPG's partition function `Z(x) = Σ_y π_ref(y|x)·exp(R(x,y)/β)`, estimated per key
    (prompt) by importance sampling from the policy and averaged over steps, in log space.

    One batch for a key, with log-weights `w_i = R_i/β + log π_ref(y_i) − log π_θ(y_i)`, gives
    `log Ẑ = logsumexp(w) − log n`; `Ẑ = mean_i exp(w_i)` is unbiased for Z. The running estimate
    averages **Z itself** (not log Z, whose average is biased low by Jensen), computed as
    `log Z ← logaddexp(log(1 − a) + log Z, log a + log Ẑ)` so that no exp(w) is ever formed:
    - `rate=None`: `a = n/(N + n)` with N the samples seen before, i.e. the plain mean of every
      importance weight ever seen for the key. Z depends on π_ref, R and β but not on θ, so
      every batch's Ẑ is unbiased whatever policy drew it and this mean converges to Z as the
      policy trains: the default.
    - `rate` in (0, 1]: an exponential moving average with weight `a = rate` on the new batch
      (`rate=1` keeps only the latest). Forgetting is only worth its extra variance when the
      target itself moves (an adaptive β, a changing reward) or early weights were poor.
    The first batch of a key sets its estimate. Keys are str, int or None (None: one global
    estimate, for targets without a per-prompt Z).
    """

    def __init__(self, rate: float | None = None) -> None:
        if rate is not None and not 0.0 < rate <= 1.0:
            raise ValueError(f"rate must be in (0, 1] or None (cumulative mean), got {rate}")
        self.rate = rate
        self.log_z: dict[Key, float] = {}
        self.count: dict[Key, int] = {}

    def _update_one(self, key: Key, log_weights: Tensor) -> float:
        n = log_weights.numel()
        log_z_batch = float(torch.logsumexp(log_weights.detach().double(), dim=0)) - math.log(n)
        seen = self.count.get(key, 0)
        if seen == 0:
            new = log_z_batch
        else:
            a = n / (seen + n) if self.rate is None else self.rate
            old_term = math.log1p(-a) + self.log_z[key] if a < 1.0 else -math.inf
            new = _logaddexp(old_term, math.log(a) + log_z_batch)
        self.log_z[key] = new
        self.count[key] = seen + n
        return new

    def update(self, keys: Key | Sequence[Key] | Tensor, log_weights: Tensor) -> float | Tensor:
        """Fold a batch of log-weights `[n]` into the estimates and return the current log Z.

        `keys` a single key (str, int or None): all samples belong to it; returns its log Z as
        a float. `keys` a sequence (list, tuple, 1-D tensor) of n keys, one per sample: samples
        are grouped by key, each group updates its key; returns `[n]` (float64, on
        log_weights' device) with each sample's key's log Z after the update.
        """
        log_weights = log_weights.reshape(-1)
        if log_weights.numel() == 0:
            raise ValueError("log_weights is empty")
        if keys is None or isinstance(keys, (str, int)):
            return self._update_one(keys, log_weights)
        keys = _plain_keys(keys)
        if len(keys) != log_weights.numel():
            raise ValueError(f"{len(keys)} keys for {log_weights.numel()} log-weights")
        for key in dict.fromkeys(keys):
            idx = torch.tensor([i for i, k in enumerate(keys) if k == key])
            self._update_one(key, log_weights[idx.to(log_weights.device)])
        return torch.tensor(
            [self.log_z[k] for k in keys], dtype=torch.float64, device=log_weights.device
        )

    def get(self, key: Key = None) -> float:
        """Current log Z for `key` (KeyError if it has never been updated)."""
        return self.log_z[key]

    def state_dict(self) -> dict[str, Any]:
        entries = [[k, self.log_z[k], self.count[k]] for k in self.log_z]
        return {"rate": self.rate, "entries": entries}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rate = None if state["rate"] is None else float(state["rate"])
        self.log_z = {k: float(lz) for k, lz, _ in state["entries"]}
        self.count = {k: int(c) for k, _, c in state["entries"]}


def _logaddexp(a: float, b: float) -> float:
    """`log(exp(a) + exp(b))` without overflow, for Python floats (−inf allowed)."""
    hi = max(a, b)
    if hi == -math.inf:
        return -math.inf
    return hi + math.log(math.exp(a - hi) + math.exp(b - hi))


def _plain_keys(keys: Sequence[Key] | Tensor) -> list[Key]:
    """Per-sample keys as plain Python str/int/None (tensor elements → int)."""
    if isinstance(keys, Tensor):
        return [int(k) for k in keys.reshape(-1).tolist()]
    out = [int(k) if isinstance(k, Tensor) else k for k in keys]
    for k in out:
        if k is not None and not isinstance(k, (str, int)):
            raise TypeError(f"keys must be str, int or None, got {type(k).__name__}")
    return out
