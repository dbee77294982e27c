"""Resume and preemption: runs killed (SIGKILL) or stopped (SIGTERM/SIGUSR1) at chosen points and
resumed end bit for bit where an uninterrupted run ends.

"Bit for bit": the final weights, the optimizer moments and scheduler, β, the reward whitening
statistics, the sampler position, every process RNG state (all `torch.equal` / exact JSON
equality), and every step's metrics and samples (exact JSON equality) are those of the
uninterrupted run. Two things are excluded and only these: the wall-clock ``time/*`` metrics and
the W&B run id (a random id drawn per fresh run, kept across its resumes).

The runs are child processes calling the CLI (``tests/helpers/resume_runs.py``); the prompt set
has 18 prompts at 2 per step, so an epoch is 9 steps: checkpoints at 3 and 6 are mid-epoch and 9
is an exact epoch boundary.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kltrain.config import ConfigError, load_config
from kltrain.training import checkpoint
from kltrain.training.checkpoint import CheckpointError
from kltrain.training.preemption import EXIT_PREEMPTED
from kltrain.training.trainer import Trainer
from tests.conftest import read_jsonl, read_metrics
from tests.helpers.resume_runs import (
    FSDP2_ENV,
    REPO,
    ZERO3_ENV,
    Zygote,
    child_pythonpath,
    run_processes,
    write_config,
)

#: What test_resume asserts about the time from a stop signal to the process exit on the tiny
#: model (the documented bound is one step phase plus one checkpoint save; here both are < 1 s).
STOP_SECONDS = 20.0


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("resume")
    model = tiny_model
    prompts = root / "prompts.jsonl"
    lines = [json.dumps({"prompt": f"Review {i} of the film:"}) for i in range(18)]
    prompts.write_text("\n".join(lines) + "\n")
    zygote = Zygote()
    yield {"root": root, "model": model, "prompts": prompts, "zygote": zygote}
    zygote.close()


def fit(env, name: str, kill=None, resume: bool = False, extra=(), drop=(), **sections):
    out = env["root"] / name
    cfg = write_config(
        env["root"] / f"{name}.yaml", env["model"], env["prompts"], out, drop, **sections
    )
    argv = ["fit", str(cfg), *extra] + (["--resume"] if resume else [])
    reply = env["zygote"].run(argv, kill, log=env["root"] / f"{name}.log")
    return out, reply


@pytest.fixture(scope="module")
def reference(env):
    out, reply = fit(env, "reference")
    assert reply == {"rc": 0, "signal": None}, (env["root"] / "reference.log").read_text()
    return out


def test_sigkill_inside_a_step_a_save_and_after_a_save_resumes_bit_exact(env, reference):
    """Three SIGKILLs (keep_last 1): inside step 5, inside the save of step 9, just after the
    save of step 9. Resumes from 3 and 6 (both in epoch 0) and from 9 (an epoch boundary)."""
    kills = [("step", 5, 3), ("save", 9, 6), ("after_save", 9, 9)]
    run = None
    for i, (at, step, expected_latest) in enumerate(kills):
        run, reply = fit(env, "killed", {"at": at, "step": step}, resume=i > 0)
        assert reply == {"rc": None, "signal": signal.SIGKILL}
        latest = checkpoint.latest(run / "checkpoints")
        assert latest is not None and latest.name == f"step-{expected_latest:08d}"
        if at == "save":  # torn: the temporary folder without its marker, ignored
            torn = list((run / "checkpoints").glob(".tmp-step-00000009-*"))
            assert torn and not (torn[0] / checkpoint.MARKER).exists()
    sampler = checkpoint.load_state(run / "checkpoints" / "step-00000009")["sampler"]
    assert (sampler["epoch"], sampler["position"]) == (1, 0)  # an exact epoch boundary
    run, reply = fit(env, "killed", resume=True)
    assert reply == {"rc": 0, "signal": None}, (env["root"] / "killed.log").read_text()
    assert_same_run(reference, run)
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the torn one was cleared
    assert prompt_uses(run) == prompt_uses(reference)
    uses = prompt_uses(run)  # 12 steps × 2 prompts × 2 samples over 18 prompts, 1⅓ epochs
    assert len(uses) == 18 and sum(uses.values()) == 48 and set(uses.values()) == {2, 4}


def test_resume_bit_exact_with_gradient_accumulation(env):
    """micro_batch_size 1: each optimizer update accumulates two micro-batches."""
    trainer = {"micro_batch_size": 1}
    ref, reply = fit(env, "accum_ref", trainer=trainer)
    assert reply["rc"] == 0
    run, reply = fit(env, "accum", {"at": "step", "step": 8}, trainer=trainer)
    assert reply["signal"] == signal.SIGKILL
    run, reply = fit(env, "accum", resume=True, trainer=trainer)
    assert reply["rc"] == 0
    assert_same_run(ref, run)


def test_resume_bit_exact_with_lora(env):
    """LoRA with dropout (so the restored RNG also drives the adapter's dropout masks)."""
    model = {
        "policy": env["model"],
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "dropout": True,  # kept on (model.dropout) so the RNG's effect is visible
    }
    ref, reply = fit(env, "lora_ref", model=model)
    assert reply["rc"] == 0, (env["root"] / "lora_ref.log").read_text()
    assert (ref / "checkpoints" / "step-00000012" / "model" / "adapter_model.safetensors").exists()
    run, reply = fit(env, "lora", {"at": "save", "step": 6}, model=model)
    assert reply["signal"] == signal.SIGKILL
    run, reply = fit(env, "lora", resume=True, model=model)
    assert reply["rc"] == 0
    assert_same_run(ref, run)


#: Algorithms with state of their own, beyond RLOO/GRPO's: PPO (value head and its optimizer
#: group, k1 in the reward), f-DPG toward moments with a refit every step (λ, per-prompt Z, the fit
#: window, the failure count) and f-DPG with the offline proposal (the frozen q and its update
#: count). 6 steps, checkpoints at 3 and 6, SIGKILL inside step 5: the resume starts at 3.
MATRIX = {
    "ppo": ({"kl": {"estimator": "k1", "placement": "reward"}, "algorithm": {"name": "ppo"}}, ()),
    "fdpg_moments_refits": (
        {
            "kl": {"divergence": "js"},
            "reward": {
                "terms": [
                    {"name": "tests.helpers.fdpg_rewards:has_letter_e"},
                    {"name": "tests.helpers.fdpg_rewards:has_letter_a"},
                ]
            },
            "generation": {"min_new_tokens": 0},
            "algorithm": {
                "name": "fdpg",
                "num_generations": 2,
                "num_minibatches": 1,
                "epochs": 1,
                "fdpg": {
                    "target": "moments",
                    "moments": [0.5, 0.4],
                    "lambdas": [0.3, -0.2],
                    "refit_every": 1,
                    "refit_window": 4,
                },
            },
        },
        ("kl.coef", "kl.adaptive"),
    ),
    "fdpg_offline": (
        {
            "kl": {"divergence": "forward_kl"},
            "reward": {"terms": [{"name": "tests.helpers.fdpg_rewards:has_letter_e"}]},
            "generation": {"min_new_tokens": 0},
            "algorithm": {
                "name": "fdpg",
                "num_generations": 2,
                "num_minibatches": 1,
                "epochs": 1,
                "fdpg": {"target": "constraint", "proposal": "offline"},
            },
        },
        ("kl.coef", "kl.adaptive"),
    ),
}


@pytest.mark.parametrize("algorithm", list(MATRIX))
def test_sigkill_inside_a_step_resumes_bit_exact_for_stateful_algorithms(env, algorithm):
    sections, drop = MATRIX[algorithm]
    sections = {**sections, "trainer": {"max_steps": 6}}
    ref, reply = fit(env, f"{algorithm}_ref", drop=drop, **sections)
    assert reply == {"rc": 0, "signal": None}, (env["root"] / f"{algorithm}_ref.log").read_text()
    run, reply = fit(env, algorithm, {"at": "step", "step": 5}, drop=drop, **sections)
    assert reply == {"rc": None, "signal": signal.SIGKILL}
    assert checkpoint.latest(run / "checkpoints").name == "step-00000003"
    run, reply = fit(env, algorithm, resume=True, drop=drop, **sections)
    assert reply["rc"] == 0, (env["root"] / f"{algorithm}.log").read_text()
    assert_same_run(ref, run, last=6)


def test_sigterm_abandons_or_finishes_the_step_checkpoints_and_exits_75(env, reference):
    """SIGTERM after step 5's rollout abandons step 5 (checkpoint of step 4); SIGTERM inside
    step 8's update finishes it (checkpoint of step 8). Both exit 75 promptly; resuming from
    them is bit-exact."""
    stamp = env["root"] / "sigterm.stamp"
    for at, step, saved in (("sigterm_rollout", 5, 4), ("sigterm_update", 8, 8)):
        kill = {"at": at, "step": step, "stamp": str(stamp)}
        run, reply = fit(env, "sigterm", kill, resume=step > 5)
        elapsed = time.time() - float(stamp.read_text())
        assert reply == {"rc": EXIT_PREEMPTED, "signal": None}
        assert elapsed < STOP_SECONDS
        assert checkpoint.latest(run / "checkpoints").name == f"step-{saved:08d}"
        log = (env["root"] / "sigterm.log").read_text()
        assert f"checkpoint of step {saved} written" in log
    run, reply = fit(env, "sigterm", resume=True)
    assert reply["rc"] == 0
    assert_same_run(reference, run)


def test_sigusr1_then_sigterm_under_slurm_saves_once_and_requeues_the_array_task(env, tmp_path):
    """The real CLI (`python -m kltrain fit`), signalled from outside, with a fake scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    cfg = write_config(
        tmp_path / "c.yaml", env["model"], env["prompts"], tmp_path / "run",
        trainer={"max_steps": 100000, "save_every": 0},
    )  # fmt: skip
    proc_env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": child_pythonpath(),
        "SLURM_JOB_ID": "1001",
        "SLURM_ARRAY_JOB_ID": "1000",
        "SLURM_ARRAY_TASK_ID": "3",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "kltrain", "fit", str(cfg)],
        env=proc_env,
        cwd=REPO,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.05)
    sent = time.time()
    proc.send_signal(signal.SIGUSR1)
    proc.send_signal(signal.SIGTERM)  # a second signal (a repeated one could merge with the first)
    rc = proc.wait(timeout=60)
    elapsed = time.time() - sent
    stderr = proc.stderr.read()
    assert rc == EXIT_PREEMPTED, stderr
    assert elapsed < STOP_SECONDS
    assert "already stopping" in stderr and "requeued SLURM job 1000_3" in stderr
    assert calls.read_text().split("\n")[0] == "requeue 1000_3"
    found = checkpoint.list_complete(tmp_path / "run" / "checkpoints")
    assert len(found) == 1  # one save for two signals
    assert checkpoint.load_state(found[0])["step"] >= 2


def test_changed_config_lists_the_differences_and_allow_config_change_proceeds(env, reference):
    run = env["root"] / "changed"
    shutil.copytree(reference, run)
    cfg_path = write_config(env["root"] / "changed.yaml", env["model"], env["prompts"], run)
    overrides = ["kl.coef=0.2", "trainer.prompts_per_step=4", "trainer.keep_last=3"]
    cfg = load_config(cfg_path, overrides)
    with pytest.raises(CheckpointError) as err:
        Trainer(cfg, resume="auto")
    message = str(err.value)
    assert "kl.coef: 0.1 → 0.2" in message and "trainer.prompts_per_step: 2 → 4" in message
    assert "keep_last" not in message  # does not change what the run computes
    assert "--allow-config-change" in message
    cfg = load_config(cfg_path, ["trainer.max_steps=13", "kl.coef=0.2"])
    trainer = Trainer(cfg, resume="auto", allow_config_change=True)
    assert trainer.state.step == 12
    trainer.fit()
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 14))


def test_fresh_start_into_a_run_folder_with_checkpoints_is_refused(env, reference):
    cfg = load_config(
        write_config(env["root"] / "again.yaml", env["model"], env["prompts"], reference)
    )
    with pytest.raises(ConfigError, match=r"already holds checkpoints.*--resume"):
        Trainer(cfg)


def test_a_pickle_with_code_placed_as_a_checkpoint_is_refused(env, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    pwned = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {pwned}",))

    target = run / "checkpoints" / "step-00000012" / "optimizer.pt"
    target.write_bytes(pickle.dumps({"state": Payload()}, protocol=2))
    cfg = load_config(write_config(tmp_path / "c.yaml", env["model"], env["prompts"], run))
    with pytest.raises(CheckpointError, match=r"optimizer.pt: refused to load"):
        Trainer(cfg, resume="auto")
    assert not pwned.exists()


def test_resume_path_to_a_torn_checkpoint_is_an_error_naming_it(env, reference, tmp_path):
    torn = tmp_path / "checkpoints" / "step-00000003"
    shutil.copytree(reference / "checkpoints" / "step-00000012", torn)
    (torn / checkpoint.MARKER).unlink()
    with pytest.raises(CheckpointError, match=r"not a complete checkpoint"):
        checkpoint.find_resume(str(torn), None)
    with pytest.raises(CheckpointError, match=r"needs trainer.output_dir"):
        checkpoint.find_resume("auto", None)


# ----------------------------------------------------------------------------------------------
# Comparing two runs


@pytest.mark.multiprocess
def test_two_processes_resume_bit_exact_after_sigkill_and_refuse_another_world_size(env):
    """2 processes (torchrun, gloo): the whole job SIGKILLed inside step 5 and resumed on 2
    processes ends bit for bit where the uninterrupted 2-process run ends (both processes' RNG
    states included). Resuming its checkpoint on 1 process is refused, naming the change."""

    def fit2(name: str, kill=None, resume=False) -> tuple[Path, int]:
        out = env["root"] / name
        cfg = write_config(env["root"] / f"{name}.yaml", env["model"], env["prompts"], out)
        argv = ["fit", str(cfg)] + (["--resume"] if resume else [])
        return out, run_processes(argv, 2, kill, log=env["root"] / f"{name}.log")

    ref, rc = fit2("w2_ref")
    assert rc == 0, (env["root"] / "w2_ref.log").read_text()[-4000:]
    assert len(checkpoint.load_rng(ref / "checkpoints" / "step-00000012")) == 2
    run, rc = fit2("w2", {"at": "step", "step": 5})
    assert rc != 0
    assert checkpoint.latest(run / "checkpoints").name == "step-00000003"
    run, rc = fit2("w2", resume=True)
    assert rc == 0, (env["root"] / "w2.log").read_text()[-4000:]
    assert_same_run(ref, run)
    _, reply = fit(env, "w2", resume=True)  # 1 process
    assert reply["rc"] == 2
    assert "processes: 2 → 1" in (env["root"] / "w2.log").read_text()


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("engine", "sharded_env"), [("fsdp2", FSDP2_ENV), ("deepspeed_zero3", ZERO3_ENV)]
)
def test_sharded_resume_is_bit_exact_after_sigkill_and_refused_on_another_engine(
    env, engine, sharded_env
):
    """FSDP2 and DeepSpeed ZeRO-3 on 2 processes: killed inside step 5, resumed from step 3's
    checkpoint (full weights, each process's optimizer shard or partition, every RNG), it ends
    bit for bit where the uninterrupted run on that engine ends. The same checkpoint on 2 DDP
    processes is refused, naming the engines (its optimizer state is per process, of the
    shards)."""

    def fit2(name: str, kill=None, resume=False, engine_env=sharded_env) -> tuple[Path, int]:
        out = env["root"] / name
        cfg = write_config(
            env["root"] / f"{name}.yaml", env["model"], env["prompts"], out, trainer=SIX_STEPS
        )
        argv = ["fit", str(cfg)] + (["--resume"] if resume else [])
        log = env["root"] / f"{name}.log"
        return out, run_processes(argv, 2, kill, log=log, env=engine_env)

    ref, rc = fit2(f"{engine}_ref")
    assert rc == 0, (env["root"] / f"{engine}_ref.log").read_text()[-4000:]
    run, rc = fit2(engine, {"at": "step", "step": 5})
    assert rc != 0
    assert checkpoint.latest(run / "checkpoints").name == "step-00000003"
    run, rc = fit2(engine, resume=True)
    assert rc == 0, (env["root"] / f"{engine}.log").read_text()[-4000:]
    assert checkpoint.load_state(run / "checkpoints" / "step-00000006")["engine"] == engine
    assert_same_run(ref, run, last=6)
    _, rc = fit2(engine, resume=True, engine_env={})
    assert rc != 0
    log = (env["root"] / f"{engine}.log").read_text()
    assert f"with engine {engine}; this run is 2 with engine ddp" in log


#: A shorter run for the FSDP2 / ZeRO-3 resume test: checkpoints at steps 3 and 6.
SIX_STEPS = {"max_steps": 6, "keep_last": 2}


def assert_same_run(ref: Path, run: Path, last: int = 12) -> None:
    assert metrics(run) == metrics(ref)
    assert (run / "samples.jsonl").read_text() == (ref / "samples.jsonl").read_text()
    a, b = (path / "checkpoints" / f"step-{last:08d}" for path in (ref, run))
    for sub in ("model", "modules", "final"):  # modules: the value head, f-DPG's proposal
        folder_a = a / sub if sub != "final" else ref / "final"
        folder_b = b / sub if sub != "final" else run / "final"
        for file in folder_a.glob("*.safetensors"):
            ta, tb = load_file(str(file)), load_file(str(folder_b / file.name))
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    names = [p.relative_to(a).as_posix() for p in a.glob("optimizer*/*.pt")] or ["optimizer.pt"]
    for name in [*names, "scheduler.pt"]:  # a sharding engine's: optimizer/process-*.pt
        assert_equal_nested(checkpoint.load_tensors(a / name), checkpoint.load_tensors(b / name))
    sa, sb = checkpoint.load_state(a), checkpoint.load_state(b)
    assert sa["trainer"].pop("wandb_run_id") and sb["trainer"].pop("wandb_run_id")
    # β, whitening statistics, sampler, skip counters, minibatch generator, the algorithm's state
    assert_equal_nested(sa, sb)
    assert checkpoint.load_rng(a) == checkpoint.load_rng(b)


def assert_equal_nested(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_equal_nested(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal_nested(x, y)
    else:
        assert a == b


def metrics(run: Path) -> list[dict]:
    """Every step's metrics but the wall-clock ``time/*``."""
    rows = read_metrics(run)
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def prompt_uses(run: Path) -> Counter:
    return Counter(row["prompt"] for row in read_jsonl(run / "samples.jsonl"))
