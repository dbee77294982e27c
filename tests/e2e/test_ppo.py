"""End to end on the embedded smollm2-135m: the reference PPO configuration as shipped, cut to 2
steps of 4 short sequences (a full step is ~30 s of CPU; these take a few seconds each)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from kltrain.config import load_config
from kltrain.training.trainer import Trainer
from tests.conftest import read_metrics, smollm2_step_one_tol

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_ppo_reverse_kl_config_two_steps(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(
        ROOT / "configs" / "ppo_reverse_kl.yaml",
        [
            "trainer.max_steps=2",
            # 8 sequences of 12 tokens: with 4 of 8 tokens every completion can miss the
            # sentiment lexicon (reward 0 everywhere, β·k1 = 0 at the start: no signal at all)
            "trainer.prompts_per_step=4",
            "algorithm.num_generations=2",
            "generation.max_new_tokens=12",
            f"trainer.output_dir={out}",
            "tracking.wandb.mode=disabled",
            "tracking.progress=false",
        ],
    )
    assert cfg.algorithm.name == "ppo" and cfg.kl.adaptive is not None
    trainer = Trainer(cfg)
    summary = trainer.fit()
    assert summary["steps"] == 2
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    tol = smollm2_step_one_tol(8)  # generation.max_new_tokens=8
    assert abs(rows[0]["divergence/reverse_kl"]) <= tol  # the policy starts at the reference
    assert rows[1]["divergence/reverse_kl"] > 0  # and moved
    for row in rows:
        for key in ("value/loss", "value/returns_mean", "train/loss", "reward/mean"):
            assert math.isfinite(row[key]), key
    assert rows[1]["train/coef"] != rows[0]["train/coef"]  # adaptive β moved
    head = load_file(str(out / "final" / "value_head.safetensors"))
    assert head["linear.weight"].shape == (1, 576)
    assert (out / "final" / "model.safetensors").is_file()
