"""Issue 10, "wrong results or lost data": each test reproduces one defect on a tiny random model
(tests/helpers/tiny.py) and checks the fix. The table of bad inputs is tests/test_bad_inputs.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from kltrain.config import ConfigError, config_from_dict
from kltrain.data import DataError
from kltrain.rewards import RewardError, RewardFunction
from kltrain.training import checkpoint
from kltrain.training.trainer import Trainer, TrainingStopped
from tests.helpers.tiny import loop_config_raw


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.helpers.tiny import make_tiny_model_dir

    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model"))


def cfg(model_path, out, **sections):
    return config_from_dict(loop_config_raw(model_path, out, **sections))


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` → the SHA-256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# 1. reward.on_invalid: skip with micro-batches that hold no valid sample ---------------------


@pytest.mark.parametrize("reward", ["none_for_first_group", "always_none"])
def test_skip_works_when_a_micro_batch_has_no_valid_sample(tiny_model, tmp_path, reward):
    out = tmp_path / "run"
    run = cfg(
        tiny_model,
        out,
        reward={"terms": [{"name": f"tests.helpers.fault_rewards:{reward}"}], "on_invalid": "skip"},
        trainer={"micro_batch_size": 2},
    )
    trainer = Trainer(run)
    before = [p.detach().clone() for p in trainer.params]
    trainer.fit()
    rows = metric_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    invalid = 2 if reward == "none_for_first_group" else 4
    assert all(r["reward/invalid"] == invalid for r in rows)
    moved = any(not torch.equal(a, p) for a, p in zip(before, trainer.params))
    # every sample invalid: nothing to learn from, the weights must not move
    assert moved == (reward == "none_for_first_group")


# 2. prompts longer than data.max_prompt_tokens -----------------------------------------------


def long_prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    long = "great movie " * 20 + "The ending was"
    rows = [{"prompt": "A short review:"}, {"prompt": long}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_long_prompts_keep_their_end_and_are_counted(tiny_model, tmp_path):
    prompts = long_prompt_file(tmp_path)
    run = cfg(
        tiny_model,
        tmp_path / "run",
        data={"prompts": str(prompts), "max_prompt_tokens": 8, "shuffle": False},
        trainer={"max_steps": 1},
    )
    trainer = Trainer(run)
    rollout = trainer.make_rollout()
    tok = trainer.models.tokenizer
    full = tok(trainer.dataset[1]["prompt"], add_special_tokens=False)["input_ids"]
    assert len(full) > 8
    kept = rollout.input_ids[2, : rollout.prompt_length][rollout.attention_mask[2, :8].bool()]
    assert kept.tolist() == full[-8:]  # the end of the prompt, next to the completion
    trainer.fit()
    assert metric_rows(tmp_path / "run")[0]["data/truncated_prompts"] == 2  # k = 2 samples


def test_long_prompts_error_names_the_row(tiny_model, tmp_path):
    prompts = long_prompt_file(tmp_path)
    run = cfg(
        tiny_model,
        tmp_path / "run",
        data={"prompts": str(prompts), "max_prompt_tokens": 8, "on_long_prompt": "error"},
    )
    with pytest.raises(DataError, match=r"data.max_prompt_tokens=8.*row 1 "):
        Trainer(run)


def test_long_prompts_skip_drops_the_row(tiny_model, tmp_path):
    prompts = long_prompt_file(tmp_path)
    run = cfg(
        tiny_model,
        tmp_path / "run",
        data={"prompts": str(prompts), "max_prompt_tokens": 8, "on_long_prompt": "skip"},
    )
    trainer = Trainer(run)
    assert trainer.dataset["prompt"] == ["A short review:"]


# 3. non-finite weights ------------------------------------------------------------------------


def test_fp16_on_cpu_is_refused_at_load_time(tiny_model, tmp_path):
    run = cfg(tiny_model, tmp_path / "run", model={"dtype": "fp16"}, trainer={"device": "cpu"})
    with pytest.raises(ConfigError, match=r"model.dtype=fp16"):
        Trainer(run)
    assert not (tmp_path / "run").exists()


def test_non_finite_weights_stop_the_run_without_a_checkpoint(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(cfg(tiny_model, out, trainer={"max_steps": 1}))
    step = trainer.optimizer.step

    def poisoned_step(*args, **kwargs):  # a finite-looking update that leaves a NaN weight
        result = step(*args, **kwargs)
        with torch.no_grad():
            trainer.params[0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(trainer.optimizer, "step", poisoned_step)
    with pytest.raises(TrainingStopped, match=r"step 1.*non-finite"):
        trainer.fit()
    assert checkpoint.latest(out / "checkpoints") is None
    assert not (out / "final").exists()


def test_a_checkpoint_with_non_finite_weights_is_never_complete(tiny_model, tmp_path):
    trainer = Trainer(cfg(tiny_model, tmp_path / "run", trainer={"max_steps": 1}))
    root = tmp_path / "run" / "checkpoints"
    good = trainer.save_checkpoint()
    with torch.no_grad():
        trainer.params[0].view(-1)[0] = float("inf")
    trainer.state.step = 1
    with pytest.raises(checkpoint.CheckpointError, match="non-finite"):
        trainer.save_checkpoint()
    assert checkpoint.list_complete(root) == [good]
    assert [p.name for p in root.iterdir()] == [good.name]  # no temporary folder left


# 4. resuming an older checkpoint sets the newer timeline aside -------------------------------


def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(tiny_model, tmp_path):
    out = tmp_path / "run"
    first = cfg(tiny_model, out, trainer={"max_steps": 4, "save_every": 1, "keep_last": 4})
    Trainer(first).fit()
    old = tree_digest(out)
    again = cfg(tiny_model, out, trainer={"max_steps": 4, "save_every": 1, "keep_last": 2})
    step1 = out / "checkpoints" / "step-00000001"
    Trainer(again, resume=str(step1)).fit()
    aside = [p for p in (out / "abandoned").iterdir()]
    assert len(aside) == 1
    kept = tree_digest(aside[0])
    for name in ("step-00000002", "step-00000003", "step-00000004"):
        for rel, digest in old.items():
            if rel.startswith(f"checkpoints/{name}/"):
                assert kept[rel] == digest  # moved, byte for byte
    for rel in ("metrics.jsonl", "samples.jsonl"):
        assert kept[rel] == old[rel]
    assert any(rel.startswith("final/") for rel in kept)
    names = [p.name for p in checkpoint.list_complete(out / "checkpoints")]
    assert names == ["step-00000003", "step-00000004"]  # the new timeline's
    assert [r["step"] for r in metric_rows(out)] == [1, 2, 3, 4]
    # a plain --resume now continues the new timeline (it is finished: nothing to do)
    assert checkpoint.find_resume("auto", str(out))[1] == out / "checkpoints" / "step-00000004"


# 5. a fresh start never deletes or overwrites the user's files -------------------------------


@pytest.mark.parametrize("leftover", ["metrics.jsonl", "samples.jsonl"])
def test_fresh_start_into_a_folder_with_run_files_is_refused(tiny_model, tmp_path, leftover):
    out = tmp_path / "run"
    out.mkdir()
    (out / leftover).write_text('{"step": 1, "reward/mean": 0.5}\n')
    before = tree_digest(out)
    with pytest.raises(ConfigError, match=leftover):
        Trainer(cfg(tiny_model, out))
    assert tree_digest(out) == before
    Trainer(cfg(tiny_model, out, trainer={"max_steps": 1}), overwrite=True).fit()
    assert [r["step"] for r in metric_rows(out)] == [1]


def test_output_dir_holding_the_users_config_is_refused(tiny_model, tmp_path):
    from kltrain.cli import main

    folder = tmp_path / "exp"
    folder.mkdir()
    config = folder / "config.yaml"
    import yaml

    config.write_text(yaml.safe_dump(loop_config_raw(tiny_model, folder)))
    before = config.read_bytes()
    assert main(["fit", str(config)]) == 2
    assert config.read_bytes() == before


# 6. a reward model whose head was newly initialised ------------------------------------------


def test_causal_lm_as_reward_model_is_refused(tiny_model):
    from kltrain.config import RewardConfig

    terms = RewardConfig(terms=[{"name": f"model:{tiny_model}", "kwargs": {"label": 0}}])
    with pytest.raises(RewardError, match=r"newly initialised.*score"):
        RewardFunction(terms)


# Tracebacks, silent acceptances and misleading messages --------------------------------------


def _disk_full_for(monkeypatch, *markers: str) -> None:
    """torch.save fails with ENOSPC for a path containing every one of ``markers``."""
    import errno

    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if all(m in str(path) for m in markers):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_model, tmp_path, monkeypatch):

    out = tmp_path / "run"
    trainer = Trainer(cfg(tiny_model, out, trainer={"max_steps": 2, "save_every": 1}))
    _disk_full_for(monkeypatch, "step-00000002")
    with pytest.raises(checkpoint.CheckpointError, match=r"step 2.*No space left.*step-00000001"):
        trainer.fit()
    root = out / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-00000001"]  # no half-written folder
    assert checkpoint.is_complete(root / "step-00000001")


def test_disk_full_while_a_process_writes_its_optimizer_shard_keeps_the_previous_checkpoint(
    tiny_model, tmp_path, monkeypatch
):
    """A sharding engine's processes each write their own optimizer state into a staging folder
    (here one process, the engine's name set as FSDP2/ZeRO runs set it): a write that fails
    stops the save with the process and the reason, removes the staging folder and leaves the
    previous checkpoint, whose per-process state round-trips."""

    from kltrain.training import deepspeed_engine

    out = tmp_path / "run"
    trainer = Trainer(cfg(tiny_model, out, trainer={"max_steps": 2, "save_every": 1}))
    trainer.engine = deepspeed_engine.ENGINE  # the optimizer itself stays torch's AdamW
    _disk_full_for(monkeypatch, "step-00000002", "process-00000")
    with pytest.raises(checkpoint.CheckpointError, match=r"process 0's optimizer.*step 2.*space"):
        trainer.fit()
    root = out / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-00000001"]  # no staging folder left
    first = root / "step-00000001"
    assert sorted(p.name for p in (first / "optimizer").iterdir()) == ["process-00000.pt"]
    assert not (first / "optimizer.pt").exists()
    saved = checkpoint.load_process_state(first, 0)
    assert saved["state"] and all(
        torch.isfinite(s["exp_avg"]).all() for s in saved["state"].values()
    )
    with pytest.raises(checkpoint.CheckpointError, match=r"no optimizer state for process 1"):
        checkpoint.load_process_state(first, 1)


def test_exit_3_without_a_checkpoint_says_so_and_prints_no_summary(tiny_model, tmp_path, capsys):
    import yaml

    from kltrain.cli import main

    config = tmp_path / "c.yaml"
    raw = loop_config_raw(tiny_model, tmp_path / "run", kl={"max": 1e-9})
    config.write_text(yaml.safe_dump(raw))
    assert main(["fit", str(config)]) == 3
    captured = capsys.readouterr()
    assert "no checkpoint was written yet" in captured.err
    assert "is intact" not in captured.err
    assert "summary" not in captured.out and "wrote" not in captured.out


def test_unquoted_off_for_chat_template_is_the_word_off():
    raw = {"data": {"chat_template": False}, "model": {"policy": "x"}}  # what YAML makes of `off`
    assert config_from_dict(raw).data.chat_template == "off"
    assert config_from_dict({"data": {"chat_template": True}}).data.chat_template == "on"


def test_console_script_imports_from_the_current_folder(tmp_path):
    """The console script runs with its own folder, not the current one, on sys.path (unlike
    ``python -m kltrain``); a ``module:f`` next to the user's config must import under both."""
    import subprocess
    import sys

    import yaml

    repo = Path(__file__).resolve().parents[1]
    work = tmp_path / "work"
    work.mkdir()
    (work / "myf_i10.py").write_text(
        "import torch\n\ndef f(u):\n    return (u - 1) ** 2\n"  # χ²: a valid f
    )
    (work / "c.yaml").write_text(yaml.safe_dump({"kl": {"divergence": "myf_i10:f"}}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "kltrain"  # what pip writes for a console_scripts entry point
    script.write_text("import sys\nfrom kltrain.cli import main\nsys.exit(main())\n")
    env = {"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    # (`python -m kltrain` has the current folder on sys.path by itself; one child is enough)
    done = subprocess.run(
        [sys.executable, str(script), "validate", "c.yaml", "model.policy=smollm2-135m"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "myf_i10" not in done.stderr, done.stderr
    assert "divergence: myf_i10:f" in done.stdout, done.stderr


def test_resume_restart_without_a_checkpoint_moves_the_old_files_aside(tiny_model, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    old = '{"step": 1, "reward/mean": 0.5}\n{"step": 2, "reward/mean": 0.7}\n'
    (out / "metrics.jsonl").write_text(old)
    Trainer(cfg(tiny_model, out, trainer={"max_steps": 1}), resume="auto").fit()
    (aside,) = (out / "abandoned").iterdir()
    assert aside.name.endswith("restart-without-checkpoint")
    assert (aside / "metrics.jsonl").read_text() == old
    assert [r["step"] for r in metric_rows(out)] == [1]


def test_validate_checks_what_fit_needs_without_creating_anything(tiny_model, tmp_path, capsys):
    import yaml

    from kltrain.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(loop_config_raw(tiny_model, tmp_path / "run")))
    assert main(["validate", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"# checked model.policy: local folder {tiny_model} (config and tokenizer read)" in out
    assert "# checked data.prompts: builtin:movie_reviews" in out
    assert "# checked reward term tests.helpers.loop_rewards:letter_e_count: built" in out
    assert f"# checked trainer.output_dir: {tmp_path / 'run'} (writable)" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]
