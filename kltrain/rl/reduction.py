"""Metrics tagged by how they combine across processes (as torchtitan's ``LossOutput`` tags its
parts): each is a small float64 vector of *additive* parts (or a max), so the loop reduces every
metric of a step with one collective and finishes them afterwards.

- ``mean``: parts ``[Σx, n]`` → ``Σx / n`` (a token- or sample-weighted global mean: the weights
  are the counts each process contributes, so uneven masks per process are handled exactly);
- ``std``:  parts ``[Σx, Σx², n]`` → ``sqrt(max(Σx²/n − (Σx/n)², 0))`` (population std; float64
  parts keep the cancellation error near ``2^-53 · Σx²/n``);
- ``sum``:  parts ``[Σx]`` → ``Σx``;
- ``max``:  parts ``[max x]`` reduced with max instead of sum.

An empty set (n = 0 everywhere) finishes as 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Kind = Literal["mean", "std", "sum", "max"]


@dataclass(frozen=True)
class Reduced:
    kind: Kind
    parts: Tensor  # float64 [k], k = 2 (mean), 3 (std), 1 (sum, max)


def mean_of(x: Tensor) -> Reduced:
    x = x.detach().double().flatten()
    return Reduced("mean", torch.stack([x.sum(), x.new_tensor(x.numel())]))


def std_of(x: Tensor) -> Reduced:
    x = x.detach().double().flatten()
    return Reduced("std", torch.stack([x.sum(), (x * x).sum(), x.new_tensor(x.numel())]))


def sum_of(x: Tensor) -> Reduced:
    return Reduced("sum", x.detach().double().sum().reshape(1))


def max_of(x: Tensor) -> Reduced:
    x = x.detach().double().flatten()
    value = x.max() if x.numel() else x.new_tensor(-math.inf)
    return Reduced("max", value.reshape(1))


def finish(kind: Kind, parts: Tensor) -> float:
    """The metric from its (already reduced) parts."""
    p = [float(v) for v in parts]
    if kind in ("sum", "max"):
        return p[0] if math.isfinite(p[0]) or kind == "sum" else 0.0
    if p[-1] == 0:
        return 0.0
    mean = p[0] / p[-1]
    if kind == "mean":
        return mean
    return math.sqrt(max(p[1] / p[-1] - mean * mean, 0.0))


def combine(reduced: list[Reduced]) -> Reduced:
    """The parts of several processes' (or chunks') contributions to one metric, combined as the
    collective would: elementwise sum, or max for ``max``."""
    kinds = {r.kind for r in reduced}
    if len(kinds) != 1:
        raise ValueError(f"cannot combine metrics of different kinds {sorted(kinds)}")
    stacked = torch.stack([r.parts for r in reduced])
    kind = reduced[0].kind
    return Reduced(kind, stacked.max(dim=0).values if kind == "max" else stacked.sum(dim=0))
