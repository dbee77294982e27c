"""Each shipped f-DPG config runs 2 steps on the embedded smollm2-135m (cached under
$KLTRAIN_CACHE, downloaded once), at a small size: 1 prompt × 4 samples × 8 new tokens."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kltrain.config import load_config
from kltrain.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["fdpg_forward_kl", "fdpg_js", "fdpg_reverse_kl", "gdc_moments"]


@pytest.mark.e2e
@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_fdpg_config_runs_two_steps(tmp_path, name):
    out = tmp_path / name
    cfg = load_config(
        ROOT / "configs" / f"{name}.yaml",
        [
            "trainer.max_steps=2",
            "trainer.prompts_per_step=1",
            "algorithm.num_generations=4",
            "generation.max_new_tokens=8",
            f"trainer.output_dir={out}",
            "tracking.wandb.mode=disabled",
            "tracking.progress=false",
        ],
    )
    trainer = Trainer(cfg)
    trainer.fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for name_ in trainer.algorithm.diagnosed:
            assert math.isfinite(row[f"fdpg/target_divergence/{name_}"])
        assert math.isfinite(row["fdpg/log_z"]) or row["fdpg/log_z"] == -math.inf
        assert math.isfinite(row["train/loss"])
    assert (out / "final" / "model.safetensors").is_file()
