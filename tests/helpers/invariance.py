"""Invariance checks of the loop's update (micro-batching, accumulation): float64 trainers with
plain SGD, so two ways of computing one step's update differ only by the order of their sums."""

from __future__ import annotations

import types

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


def to_float64(model: torch.nn.Module) -> torch.nn.Module:
    """``model.double()``, its RMSNorms included: transformers' RMSNorm computes in float32
    whatever the model's dtype, which rounds every activation and gradient that crosses it to
    float32. Where two ways of computing a step sum the same gradient in other orders (shared
    prompts run once, micro-batches), that rounding would turn float64 order differences into
    float32 ones. Each norm here computes its own formula, ``w · x / sqrt(mean(x²) + ε)``, in
    float64."""
    model.double()
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_in_input_dtype, module)
    return model


def _rms_norm_in_input_dtype(self, hidden: torch.Tensor) -> torch.Tensor:
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))


def float64_sgd_trainer(cfg) -> Trainer:
    """A trainer whose models run in float64 and whose update is plain SGD at lr 1, so the
    parameter change is minus the gradient itself (Adam's first step is ≈ sign(g), which would
    hide small gradient differences and magnify roundoff near zero)."""
    trainer = Trainer(cfg)
    for model in (trainer.models.policy, trainer.models.reference):
        to_float64(model)
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
