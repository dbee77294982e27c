"""The loop's optimizer is torch's fused AdamW where torch has it (issue 13: the per-parameter
loop cost over a second per update on CPU), and its update is the unfused one's."""

from __future__ import annotations

import pytest
import torch

from kltrain.config import config_from_dict
from kltrain.training.trainer import Trainer
from tests.helpers.tiny import loop_config_raw, make_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model"))


def test_trainer_uses_fused_adamw_on_cpu(tiny_model, tmp_path):
    trainer = Trainer(config_from_dict(loop_config_raw(tiny_model, tmp_path / "run")))
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.optimizer.defaults["fused"] is True
    assert trainer.optimizer.state_dict()["param_groups"][0]["fused"] is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_adamw_matches_the_per_parameter_update(dtype):
    """Three steps, weight decay and two groups at different rates: the fused and per-parameter
    updates agree to a few ulp of the parameters (each step rounds ~10 elementwise operations;
    32 ulp of |θ| bounds their accumulated difference, while a wrong moment, bias correction or
    decay moves θ by ~lr·|update| ≈ 1e-3, far above it)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4)]
    init = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(3)]
    results = []
    for fused in (None, True):
        params = [t.clone().requires_grad_(True) for t in init]
        groups = [{"params": params[:2]}, {"params": params[2:], "lr": 3e-3}]
        opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1, fused=fused)
        for step in grads:
            for p, gr in zip(params, step):
                p.grad = gr.clone()
            opt.step()
        results.append([p.detach() for p in params])
    ulp = torch.finfo(dtype).eps
    for a, b, start in zip(*results, init):
        assert (a - start).abs().max() > 1e-4  # the parameters moved
        torch.testing.assert_close(a, b, rtol=32 * ulp, atol=32 * ulp * b.abs().max().item())
