"""Each shipped f-DPG config runs 2 steps on the embedded smollm2-135m (cached under
$KLTRAIN_CACHE, downloaded once), at a small size: 1 prompt × 4 samples × 8 new tokens."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kltrain.config import load_config
from kltrain.training.trainer import Trainer
from tests.conftest import read_jsonl, read_metrics, smollm2_step_one_tol

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["fdpg_forward_kl", "fdpg_js", "fdpg_reverse_kl", "gdc_moments"]
NEW_TOKENS = 8


def step_one_log_score_bounds(cfg, rewards: torch.Tensor, row: dict) -> tuple[float, float]:
    """[lo, hi] of log Ẑ at step 1, where π = π_ref (up to roundoff) and every importance weight
    π_ref·e^s/π is e^s: ``log Ẑ = log mean_i e^{s_i}``, exact for rlhf (s = R/β) and constraint
    (s = log b, −inf for b = 0); for moments only the range of s = λ·φ with φ ∈ [0, 1]^K."""
    target = cfg.algorithm.fdpg.target
    n = torch.tensor(float(len(rewards)), dtype=torch.float64)
    if target == "rlhf":
        value = float(torch.logsumexp(rewards / cfg.kl.coef, 0) - torch.log(n))
        return value, value
    if target == "constraint":
        rate = float(rewards.mean())  # one 0/1 term of weight 1: the reward is b
        value = math.log(rate) if rate > 0 else -math.inf
        return value, value
    lambdas = [v for k, v in row.items() if k.startswith("fdpg/lambda/")]
    return sum(min(v, 0.0) for v in lambdas), sum(max(v, 0.0) for v in lambdas)


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
            f"generation.max_new_tokens={NEW_TOKENS}",
            f"trainer.output_dir={out}",
            "tracking.wandb.mode=disabled",
            "tracking.progress=false",
        ],
    )
    trainer = Trainer(cfg)
    trainer.fit()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for name_ in trainer.algorithm.diagnosed:
            assert math.isfinite(row[f"fdpg/target_divergence/{name_}"])
        assert math.isfinite(row["train/loss"])
        # Ẑ > 0 unless every sample of the prompt violates a hard constraint
        if row.get("fdpg/alignment/constraint", 1.0) > 0:
            assert math.isfinite(row["fdpg/log_z"]), row["step"]
    # step 1: log Ẑ from the logged rewards; each log weight is off by ≤ the step-1 bound on
    # |log π_ref(y) − log π(y)|, and log-mean-exp moves by at most the largest such shift
    rewards = torch.tensor(
        [s["reward"] for s in read_jsonl(out / "samples.jsonl") if s["step"] == 1],
        dtype=torch.float64,
    )
    assert len(rewards) == 4
    lo, hi = step_one_log_score_bounds(cfg, rewards, rows[0])
    tol = smollm2_step_one_tol(NEW_TOKENS)
    log_z = rows[0]["fdpg/log_z"]
    if lo == -math.inf:
        assert log_z == -math.inf  # no sample meets the constraint: Ẑ = 0 exactly
    else:
        assert lo - tol <= log_z <= hi + tol, (log_z, lo, hi)
    assert any(math.isfinite(r["fdpg/log_z"]) for r in rows)
    assert (out / "final" / "model.safetensors").is_file()
