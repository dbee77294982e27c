"""f-DPG through the real loop on tiny random models: each target runs 2 steps and writes the
run-folder contract with finite f-DPG diagnostics; the loop adds no β·D(π‖π_ref)."""

from __future__ import annotations

import json
import math

import pytest

from kltrain.config import config_from_dict
from kltrain.trainer import Trainer
from tests.helpers.tiny import make_tiny_model_dir

TARGETS = {
    "rlhf": ({"target": "rlhf"}, [{"name": "tests.helpers.loop_rewards:letter_e_count"}], "js"),
    "constraint": (
        {"target": "constraint"},
        [{"name": "tests.helpers.fdpg_rewards:has_letter_e"}],
        "forward_kl",
    ),
    "softened": (
        {"target": "constraint", "epsilon": 0.01},
        [{"name": "tests.helpers.fdpg_rewards:has_letter_e"}],
        "reverse_kl",
    ),
    "moments": (
        {"target": "moments", "moments": [0.5, 0.4], "lambdas": [0.3, -0.2], "refit_every": 1},
        [
            {"name": "tests.helpers.fdpg_rewards:has_letter_e"},
            {"name": "tests.helpers.fdpg_rewards:has_letter_a"},
        ],
        "js",
    ),
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model"))


def fdpg_config(model, out, target: str):
    fdpg, terms, divergence = TARGETS[target]
    kl = {"divergence": divergence, **({"coef": 0.5} if target == "rlhf" else {})}
    raw = {
        "name": "tiny",
        "model": {"policy": model},
        "data": {"chat_template": "off", "max_prompt_tokens": 16},
        "generation": {"max_new_tokens": 6, "min_new_tokens": 0},
        "reward": {"terms": terms},
        "kl": kl,
        "algorithm": {"name": "fdpg", "num_generations": 4, "fdpg": fdpg},
        "trainer": {
            "max_steps": 2,
            "prompts_per_step": 2,
            "micro_batch_size": 8,
            "learning_rate": 1e-3,
            "output_dir": str(out),
            "log_samples_every": 1,
        },
        "tracking": {"wandb": {"mode": "disabled"}, "progress": False},
    }
    return config_from_dict(raw)


@pytest.mark.parametrize("target", list(TARGETS))
def test_two_fdpg_steps_write_the_run_folder(tiny_model, tmp_path, target):
    out = tmp_path / "run"
    trainer = Trainer(fdpg_config(tiny_model, out, target))
    summary = trainer.fit()
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("fdpg/log_z", "fdpg/ess", "fdpg/log_z_stderr", "diversity/distinct_2"):
            assert math.isfinite(row[key]), (key, row[key])
        for name in trainer.algorithm.diagnosed:
            assert math.isfinite(row[f"fdpg/target_divergence/{name}"])
            assert row[f"fdpg/target_divergence/{name}"] >= -1e-6
        assert 0 < row["fdpg/ess"] <= 1
        assert math.isfinite(row["train/loss"])
        assert "divergence/reverse_kl" in row and "completion/entropy_per_token" in row
    if target == "moments":
        assert {"fdpg/lambda/tests.helpers.fdpg_rewards:has_letter_e"} <= set(rows[-1])
    # the run's state carries the per-prompt Z estimates
    state = trainer.algorithm.state_dict()
    assert state["log_z"]["entries"] and state["steps"] == 2
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "samples.jsonl").is_file()
    assert f"sequence {trainer.cfg.kl.divergence} to target" in (out / "config.yaml").read_text()


def test_fdpg_loss_has_no_regulariser_term(tiny_model, tmp_path):
    """uses_regulariser is False: with the same rollout, the loss does not depend on kl.coef's
    regulariser path (the exact per-token divergence is never computed in the loss)."""
    trainer = Trainer(fdpg_config(tiny_model, tmp_path / "run", "constraint"))
    assert not trainer.algorithm.uses_regulariser
    assert not trainer._regularised_in_loss()
