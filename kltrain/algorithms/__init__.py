"""Algorithms by config name (``algorithm.name``)."""

from __future__ import annotations

from kltrain.algorithms.base import Algorithm, TrainBatch
from kltrain.algorithms.fdpg import Fdpg
from kltrain.algorithms.grpo import Grpo
from kltrain.algorithms.ppo import Ppo
from kltrain.algorithms.rloo import Rloo
from kltrain.config import RunConfig

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (Rloo, Grpo, Ppo, Fdpg)}


def describe_objective(cfg: RunConfig, regulariser) -> tuple[str, str]:
    """(``gradient_followed`` key, console line) of the configured algorithm, unbuilt."""
    return _algorithm_class(cfg).describe_objective(cfg, regulariser)


def make_algorithm(cfg: RunConfig) -> Algorithm:
    return _algorithm_class(cfg)(cfg)


def _algorithm_class(cfg: RunConfig) -> type[Algorithm]:
    name = cfg.algorithm.name
    if name not in ALGORITHMS:
        raise ValueError(
            f"algorithm.name={name!r} is not available; choose one of {sorted(ALGORITHMS)}"
        )
    return ALGORITHMS[name]


__all__ = ["ALGORITHMS", "Algorithm", "TrainBatch", "describe_objective", "make_algorithm"]
