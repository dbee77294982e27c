"""Per-term reward transforms (``logit``, ``whiten``, ``clip``, ``scale``), applied in order to
the valid samples' scores."""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from kltrain.rewards.errors import RewardError, check

#: ``[m] → [M]``: every process's valid scores of one term, in global sample order (a
#: collective: every process calls it, also with ``m = 0``). None: this process holds them all.
Gather = Callable[[torch.Tensor], torch.Tensor]


class Transform(ABC):
    """A map ``[m] → [m]`` applied to one term's scores of the valid samples (float64)."""

    name: ClassVar[str]

    @abstractmethod
    def __call__(self, x: torch.Tensor, where: str, gather: Gather | None = None) -> torch.Tensor:
        """``where`` names the term and step for error messages; a transform with statistics
        takes them over ``gather(x)`` (all processes' samples), the others ignore it."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise RewardError(f"transform {self.name} has no state; got {sorted(state)}")


class Logit(Transform):
    """Inverse sigmoid: ``logit(p) = log(p / (1 − p))`` after clamping ``p`` to
    ``[eps, 1 − eps]`` (default ``eps = 1e-6``, so outputs lie within ±13.8 instead of ±∞).

    Inputs must be probabilities in [0, 1]; anything else is an error (a score that is already
    a logit must not be put through it).
    """

    name = "logit"

    def __init__(self, *, eps: float = 1e-6):
        check(isinstance(eps, (int, float)) and 0 < eps < 0.5, "logit: eps in (0, 0.5)", eps)
        self.eps = float(eps)

    def __call__(self, x: torch.Tensor, where: str, gather: Gather | None = None) -> torch.Tensor:
        outside = (x < 0) | (x > 1)
        if outside.any():
            i = int(outside.nonzero()[0])
            raise RewardError(
                f"{where}: transform logit needs probabilities in [0, 1]; got {float(x[i])!r}. "
                f"For a reward model use kwargs output: probability, or drop the logit transform"
            )
        p = x.clamp(self.eps, 1 - self.eps)
        return torch.log(p) - torch.log1p(-p)


class Whiten(Transform):
    """Standardise: ``(x − mean) / (std + eps)`` (default ``eps = 1e-8``).

    Per batch (default): ``mean``, ``std`` over this call's valid samples (of every process,
    given ``gather``: the statistics are then those one process would compute), population std
    (``ddof = 0``); a batch of one gives 0. With ``running=True``: ``mean``, ``var`` are the
    exact statistics of every valid sample seen so far *including* this batch (count, mean and
    sum of squared deviations merged by Chan et al.'s parallel formula), so the first batch is
    whitened as per batch and later ones against the accumulated statistics; that state is in
    ``state_dict()`` as ``{"count", "mean", "m2"}`` (``var = m2 / count``).
    """

    name = "whiten"

    def __init__(self, *, running: bool = False, eps: float = 1e-8):
        check(isinstance(running, bool), "whiten: running must be true or false", running)
        check(isinstance(eps, (int, float)) and eps >= 0, "whiten: eps ≥ 0", eps)
        self.running = running
        self.eps = float(eps)
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    def __call__(self, x: torch.Tensor, where: str, gather: Gather | None = None) -> torch.Tensor:
        pool = x if gather is None else gather(x)  # the same statistics on every process
        if pool.numel() == 0:
            return x
        if not self.running:
            return (x - pool.mean()) / (pool.std(unbiased=False) + self.eps)
        n_b = pool.numel()
        mean_b = float(pool.mean())
        m2_b = float(((pool - mean_b) ** 2).sum())
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta**2 * self.count * n_b / n
        self.count = n
        return (x - self.mean) / (math.sqrt(self.m2 / self.count) + self.eps)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2} if self.running else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.running:
            return super().load_state_dict(state)
        missing = {"count", "mean", "m2"} - set(state)
        if missing:
            raise RewardError(f"whiten state lacks {sorted(missing)}; got {sorted(state)}")
        self.count, self.mean, self.m2 = (
            int(state["count"]),
            float(state["mean"]),
            float(state["m2"]),
        )


class Clip(Transform):
    """``min(max(x, min), max)``; either bound may be omitted, not both; ``min ≤ max``."""

    name = "clip"

    def __init__(self, *, min: float | None = None, max: float | None = None):
        if min is None and max is None:
            raise RewardError("clip needs min, max or both, e.g. {name: clip, min: -5, max: 5}")
        for key, v in (("min", min), ("max", max)):
            ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
            check(ok, f"clip: {key} must be a number", v)
        if min is not None and max is not None and min > max:
            raise RewardError(f"clip: min={min} is greater than max={max}")
        self.min, self.max = min, max

    def __call__(self, x: torch.Tensor, where: str, gather: Gather | None = None) -> torch.Tensor:
        return x.clamp(min=self.min, max=self.max)


class Scale(Transform):
    """Affine map ``factor · x + shift`` (defaults 1 and 0)."""

    name = "scale"

    def __init__(self, *, factor: float = 1.0, shift: float = 0.0):
        for key, v in (("factor", factor), ("shift", shift)):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            check(ok, f"scale: {key} must be a finite number", v)
        self.factor, self.shift = float(factor), float(shift)

    def __call__(self, x: torch.Tensor, where: str, gather: Gather | None = None) -> torch.Tensor:
        return self.factor * x + self.shift


TRANSFORMS: dict[str, type[Transform]] = {t.name: t for t in (Logit, Whiten, Clip, Scale)}


def parse_transform(spec: str | dict[str, Any], where: str = "transform") -> Transform:
    """``"logit"`` or ``{name: clip, min: -1, max: 1}`` → a :class:`Transform`."""
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, dict) and isinstance(spec.get("name"), str):
        name, params = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    else:
        raise RewardError(
            f"{where}: a transform is a name or a mapping with a name, e.g. logit or "
            f"{{name: clip, min: -5, max: 5}}; got {spec!r}"
        )
    cls = TRANSFORMS.get(name)
    if cls is None:
        raise RewardError(
            f"{where}: unknown transform {name!r}; valid transforms: {', '.join(TRANSFORMS)}"
        )
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise RewardError(
            f"{where}: transform {name} has no parameter {', '.join(unknown)}; "
            f"its parameters: {', '.join(accepted)}"
        )
    try:
        return cls(**params)
    except RewardError as err:
        raise RewardError(f"{where}: {err}") from None


# ----------------------------------------------------------------------------------------------
