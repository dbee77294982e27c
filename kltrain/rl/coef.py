"""The divergence coefficient β (``kl.coef``), fixed or adaptive (Ziegler et al. 2019), as small
state objects with `state_dict()` / `load_state_dict()` holding plain Python types only
(JSON-serialisable), so a checkpoint is one loop over them.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def _as_float(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


class FixedCoef:
    """A constant coefficient β; `update` leaves it unchanged."""

    def __init__(self, value: float) -> None:
        if value < 0:
            raise ValueError(f"coefficient must be ≥ 0, got {value}")
        self.value = float(value)

    def update(self, observed: float | Tensor, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveCoef:
    """Adaptive β (Ziegler et al. 2019), steering the observed divergence toward `target`:
    `e = clip(observed/target − 1, −0.2, 0.2)`, `β ← β·(1 + e·n_steps/horizon)`.

    `observed` is the divergence measured on the step's samples (per sequence: sum over tokens,
    mean over samples, the same quantity as `target`); `n_steps` is how many steps (Ziegler:
    samples) that measurement stands for.
    """

    def __init__(self, value: float, target: float, horizon: float) -> None:
        if value < 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"need value ≥ 0, target > 0, horizon > 0; got {value}, {target}, {horizon}"
            )
        self.value, self.target, self.horizon = float(value), float(target), float(horizon)

    def update(self, observed: float | Tensor, n_steps: int) -> float:
        """Apply one update and return the new β."""
        error = min(max(_as_float(observed) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


def make_coef(coef: float, target: float | None, horizon: float | None) -> FixedCoef | AdaptiveCoef:
    """`FixedCoef(coef)` when `target` is None (a horizon alone is ignored), else
    `AdaptiveCoef(coef, target, horizon)`, which needs a horizon."""
    if target is None:
        return FixedCoef(coef)
    if horizon is None:
        raise ValueError("an adaptive coefficient (target given) also needs a horizon")
    return AdaptiveCoef(coef, target, horizon)
