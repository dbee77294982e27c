"""Numerical guards and preemption plumbing: a non-finite loss skips the update (counted; neither
the LR schedule nor β advances), K in a row stop the run, kl.max stops it, invalid rewards are
dropped from the advantage; signals, SLURM requeue, log truncation and W&B resume."""

from __future__ import annotations

import json
import math
import signal
import subprocess
from types import SimpleNamespace

import pytest
import torch
import yaml

from kltrain.cli import main
from kltrain.training import preemption
from kltrain.training.tracking import RunLogger, truncate_jsonl
from kltrain.training.trainer import Trainer, TrainingStopped
from tests.conftest import read_metrics as rows
from tests.test_trainer import tiny_config


def nan_loss_from(monkeypatch, first_bad_step: int, last_bad_step: int | None = None):
    """Make the loss NaN in steps [first, last] (a test stand-in for a numerical blow-up);
    returns {step: whether the weights changed in that step's update}."""
    original_loss, original_optimise = Trainer._micro_batch_loss, Trainer.optimise
    moved: dict[int, bool] = {}

    def loss(self, *args):
        out = original_loss(self, *args)
        step = self.state.step + 1
        bad = first_bad_step <= step <= (last_bad_step or math.inf)
        return out * float("nan") if bad else out

    def optimise(self, batch, step):
        before = [p.detach().clone() for p in self.params]
        out = original_optimise(self, batch, step)
        moved[step] = any(not torch.equal(a, p) for a, p in zip(before, self.params))
        return out

    monkeypatch.setattr(Trainer, "_micro_batch_loss", loss)
    monkeypatch.setattr(Trainer, "optimise", optimise)
    return moved


def guarded_config(tiny_model, out, **trainer):
    return tiny_config(
        tiny_model,
        out,
        kl={"adaptive": {"target": 0.01, "horizon": 10}},
        trainer={"max_steps": 6, "lr_schedule": "linear", **trainer},
    )


def test_non_finite_loss_at_step_4_is_skipped_and_counted(tiny_model, tmp_path, monkeypatch):
    moved = nan_loss_from(monkeypatch, 4, 4)
    trainer = Trainer(guarded_config(tiny_model, tmp_path / "run"))
    trainer.fit()
    r = rows(tmp_path / "run")
    assert [row["train/skipped"] for row in r] == [0, 0, 0, 1, 0, 0]
    assert [row["train/skipped_total"] for row in r] == [0, 0, 0, 1, 1, 1]
    assert moved == {1: True, 2: True, 3: True, 4: False, 5: True, 6: True}
    # the schedule and β did not advance over step 4 (they did over every other step)
    lr, beta = [row["train/lr"] for row in r], [row["train/coef"] for row in r]
    assert lr[4] == lr[3] and all(lr[i + 1] < lr[i] for i in (0, 1, 2, 4))
    assert beta[4] == beta[3] and all(beta[i + 1] != beta[i] for i in (0, 1, 2, 4))
    assert trainer.state.skipped_steps == 1 and trainer.state.consecutive_skips == 0


def test_k_consecutive_non_finite_updates_stop_the_run(tiny_model, tmp_path, monkeypatch):
    nan_loss_from(monkeypatch, 4)
    cfg = guarded_config(tiny_model, tmp_path / "run", max_consecutive_skips=2)
    with pytest.raises(TrainingStopped) as err:
        Trainer(cfg).fit()
    message = str(err.value)
    assert "step 5" in message and "non-finite loss" in message
    assert "trainer.max_consecutive_skips=2" in message
    assert [row["step"] for row in rows(tmp_path / "run")] == [1, 2, 3, 4]


def test_kl_max_stops_before_the_update_with_exit_code_3(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_model, out, kl={"max": 1e-4}, trainer={"learning_rate": 3e-2})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["fit", str(config)]) == 3
    err = capsys.readouterr().err
    assert "stopped: step 2: reverse_kl/exact per sequence is" in err and "kl.max=0.0001" in err
    assert [row["step"] for row in rows(out)] == [1]


def test_invalid_reward_is_dropped_from_the_advantage_and_counted(tiny_model, tmp_path):
    cfg = tiny_config(
        tiny_model,
        tmp_path / "run",
        reward={"terms": [{"name": "tests.helpers.loop_rewards:none_for_second_sample"}]},
    )
    cfg.reward.on_invalid = "skip"
    trainer = Trainer(cfg)
    rollout = trainer.make_rollout()
    rewards, metrics = trainer.score(rollout, step=1)
    batch = trainer.algorithm.prepare(rollout, rewards, None)
    assert metrics["reward/invalid"] == 1
    assert not rollout.completion_mask[1].any()  # no token of it reaches the loss
    assert torch.all(batch.advantages[1] == 0)
    assert trainer.reward_fn.state_dict()["invalid_counts"] == {
        "tests.helpers.loop_rewards:none_for_second_sample": 1
    }


# ----------------------------------------------------------------------------------------------
# Signals and SLURM


def test_slurm_job_id_is_array_task_aware():
    assert preemption.slurm_job_id({"SLURM_JOB_ID": "7"}) == "7"
    env = {"SLURM_JOB_ID": "8", "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "2"}
    assert preemption.slurm_job_id(env) == "5_2"
    assert preemption.slurm_job_id({}) is None


def test_requeue_only_after_sigusr1_inside_slurm():
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "Invalid job id")

    env = {"SLURM_JOB_ID": "9"}
    assert preemption.requeue(signal.SIGTERM, env, run) is None
    assert preemption.requeue(signal.SIGUSR1, {}, run) is None
    assert calls == []
    message = preemption.requeue(signal.SIGUSR1, env, run)
    assert calls == [["scontrol", "requeue", "9"]]
    assert message == "scontrol requeue 9 failed (1): Invalid job id"


def test_signal_watcher_records_the_first_signal_and_restores_handlers(capsys):
    before = signal.getsignal(signal.SIGUSR1)
    with preemption.SignalWatcher() as watcher:
        signal.raise_signal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGTERM)
        assert watcher.signum == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before
    err = capsys.readouterr().err
    assert "SIGUSR1 received: checkpointing" in err and "SIGTERM received again" in err


# ----------------------------------------------------------------------------------------------
# Logs on resume


def test_truncate_jsonl_keeps_steps_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "x')
    kept = truncate_jsonl(path, 3)
    assert [r["step"] for r in kept] == [1, 2, 3]
    assert path.read_text().splitlines() == [json.dumps({"step": s}) for s in (1, 2, 3)]


def test_wandb_resumes_the_saved_run_id_and_never_logs_a_step_twice(tiny_model, tmp_path):
    cfg = tiny_config(tiny_model, tmp_path / "run")
    cfg.tracking.wandb.mode = "offline"
    cfg.trainer.log_samples_every = 0
    sent, inits = [], []
    acc = SimpleNamespace(
        is_main_process=True,
        init_trackers=lambda project, config, init_kwargs: inits.append(init_kwargs["wandb"]),
        get_tracker=lambda name, unwrap: SimpleNamespace(step=5),  # W&B has steps up to 4
        log=lambda metrics, step: sent.append(step),
    )
    logger = RunLogger(cfg, tmp_path / "run", acc)
    reg = SimpleNamespace(gradient=SimpleNamespace(key="k", explanation="e"), metric_name="m",
                          placement="loss", importance_ratio="off")  # fmt: skip
    logger.start(reg, first_step=3, run_id="abc12345")
    assert inits[0]["id"] == "abc12345" and inits[0]["resume"] == "allow"
    for step in (4, 5, 6):
        logger.log_step(SimpleNamespace(step=step, metrics={"x": 1.0}))
    assert sent == [5, 6]
    assert [r["step"] for r in rows(tmp_path / "run")] == [4, 5, 6]
