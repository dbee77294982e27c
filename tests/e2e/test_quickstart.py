"""End to end: the README's main job, `kltrain fit configs/quickstart.yaml`, for 2 steps on the
embedded smollm2-135m (downloaded into the cache on first use), with smaller steps."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from kltrain.cli import main
from tests.conftest import read_jsonl, read_metrics, smollm2_step_one_tol

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_quickstart_two_steps(tmp_path):
    out = tmp_path / "run"
    code = main(
        [
            "fit",
            str(ROOT / "configs/quickstart.yaml"),
            "trainer.max_steps=2",
            # smaller steps than the shipped 8 prompts × 4 samples, to keep the suite quick
            "trainer.prompts_per_step=2",
            "generation.max_new_tokens=12",
            f"trainer.output_dir={out}",
            "tracking.progress=false",
        ]
    )
    assert code == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert 0.0 <= rows[0]["reward/mean"] <= 1.0  # the sentiment score is a probability
    # step 1: policy == reference (generation.max_new_tokens=12)
    assert abs(rows[0]["divergence/reverse_kl"]) <= smollm2_step_one_tol(12)
    assert rows[1]["divergence/reverse_kl"] > 0
    samples = read_jsonl(out / "samples.jsonl")
    assert samples and all(isinstance(s["completion"], str) for s in samples)
    assert any(s["completion"].strip() for s in samples)
    # the final policy is a normal transformers folder
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    # W&B offline run folder inside the run folder
    assert list((out / "wandb").glob("offline-run-*"))
