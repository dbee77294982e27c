"""Invariance checks of the loop's update (micro-batching, accumulation): float64 trainers with
plain SGD, so two ways of computing one step's update differ only by the order of their sums."""

from __future__ import annotations

import torch

from kltrain.training.trainer import Trainer
from tests.conftest import TINY_DEPTH, TINY_WIDTH, assert_close_to_scale, fp64_tol

#: Roundings accumulated into one parameter's gradient on the tiny loop config (tests/helpers/
#: tiny.py): 4 sequences × ≤ 22 positions (16 prompt + 6 completion tokens), through 2 layers of
#: width ≤ 96.
TINY_UPDATE_TERMS = 4 * 22 * TINY_DEPTH * TINY_WIDTH
#: Allowed ratio of a gradient entry's terms' absolute sum to its tensor's largest entry.
GRADIENT_CANCELLATION = 16.0
#: Two float64 summation orders (conftest.reduction_order_tol) at that scale: ≈ 6e-11. A
#: micro-batching or normalisation error is ≥ 1/24 relative (one token of 24).
FLOAT64_UPDATE_RTOL = 2 * fp64_tol(TINY_UPDATE_TERMS, GRADIENT_CANCELLATION)


def float64_sgd_trainer(cfg) -> Trainer:
    """A trainer whose models run in float64 and whose update is plain SGD at lr 1, so the
    parameter change is minus the gradient itself (Adam's first step is ≈ sign(g), which would
    hide small gradient differences and magnify roundoff near zero)."""
    trainer = Trainer(cfg)
    for model in (trainer.models.policy, trainer.models.reference):
        model.double()
    for module in trainer.algorithm.modules().values():
        module.double()
    trainer.optimizer = torch.optim.SGD(trainer.params, lr=1.0)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda _: 1.0)
    return trainer


def assert_same_update(before, after_a, after_b, rtol: float = FLOAT64_UPDATE_RTOL) -> float:
    """Both parameter changes (dicts of tensors by name) agree to ``rtol`` at each tensor's
    scale (:func:`tests.conftest.assert_close_to_scale`); returns the largest change."""
    moved = 0.0
    for name, value in after_a.items():
        delta_a, delta_b = value - before[name], after_b[name] - before[name]
        assert value.dtype == torch.float64, name
        assert_close_to_scale(delta_a, delta_b, rtol, msg=name)
        moved = max(moved, float(delta_a.detach().abs().max()))
    return moved
