"""``kltrain sweep``: expansion, names, validation before any run, state, resume, failure
isolation (a fake fit), preemption and the sweep-file hash (kltrain/experiments/sweep.py)."""

from __future__ import annotations

import json
import re
import sys
import threading
from pathlib import Path

import pytest
import yaml

from kltrain.cli import main
from kltrain.config import ConfigError, load_config
from kltrain.experiments import sweep as sw

BASE = {
    "name": "base",
    "data": {"prompts": "builtin:movie_reviews", "chat_template": "off"},
    "algorithm": {"name": "rloo", "num_generations": 2},
    "trainer": {"max_steps": 2, "prompts_per_step": 2},
    "tracking": {"wandb": {"mode": "disabled"}, "progress": False},
}


def write_sweep(tmp_path: Path, **spec) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    body = {"name": "t", "base": "base.yaml", "output_dir": str(tmp_path / "out"), **spec}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


DIVERGENCES = {
    "grid": {"kl.divergence": ["reverse_kl", "alpha"], "seed": [0, 1]},
    "extras": {"kl.divergence": {"alpha": {"kl.alpha": 0.5}}},
}


# ----------------------------------------------------------------------------------------------
# Expansion, names, validation


def test_members_times_grid_in_order_with_fixed_overrides(tmp_path):
    path = write_sweep(
        tmp_path,
        overrides={"trainer.max_steps": 3},
        members=[{"kl.coef": 0.1}, {"kl.coef": 0.2, "kl.estimator": "k2"}],
        grid={"seed": [0, 1, 2]},
    )
    sweep = sw.load_sweep(path)
    own = [m.overrides for m in sweep.members]
    assert own == [
        {"kl.coef": c, **extra, "seed": s}
        for c, extra in ((0.1, {}), (0.2, {"kl.estimator": "k2"}))
        for s in (0, 1, 2)
    ]
    assert all(m.resolved["trainer.max_steps"] == 3 for m in sweep.members)


def test_grid_alone_is_the_product_and_extras_apply_per_value(tmp_path):
    sweep = sw.load_sweep(write_sweep(tmp_path, **DIVERGENCES))
    assert [m.name for m in sweep.members] == [
        "divergence=reverse_kl,seed=0",
        "divergence=reverse_kl,seed=1",
        "divergence=alpha,seed=0",
        "divergence=alpha,seed=1",
    ]
    for m in sweep.members:
        assert ("kl.alpha" in m.resolved) == (m.overrides["kl.divergence"] == "alpha")
        raw = yaml.safe_load((tmp_path / "base.yaml").read_text())
        cfg = load_config(tmp_path / "base.yaml", m.override_args())  # what fit will load
        assert cfg.kl.divergence == m.overrides["kl.divergence"] and cfg.seed == m.overrides["seed"]
        assert cfg.trainer.output_dir == str(tmp_path / "out" / m.name) and raw["name"] == "base"
    alpha = load_config(tmp_path / "base.yaml", sweep.members[2].override_args())
    assert alpha.kl.alpha == 0.5


def test_names_are_safe_and_collisions_fall_back_to_full_keys_then_a_suffix():
    assert sw.member_names([{"kl.coef": 0.1}, {"x.coef": 0.1}]) == ["kl.coef=0.1", "x.coef=0.1"]
    names = sw.member_names([{"a": "x/y"}, {"a": "x y"}, {"a": "z"}])
    assert names == ["a=x-y-1", "a=x-y-2", "a=z"]
    odd = sw.member_names([{"data.prompts": "../../etc/passwd"}, {"kl.f": "m:f g"}])
    assert all(re.fullmatch(r"[A-Za-z0-9._+=,-]+", n) and "/" not in n for n in odd)
    assert all(not n.startswith(".") for n in odd)


def test_an_invalid_member_stops_the_sweep_before_anything_runs(tmp_path, capsys):
    path = write_sweep(tmp_path, grid={"kl.divergence": ["reverse_kl", "no_such_f"]})
    with pytest.raises(ConfigError, match=r"member 'divergence=no_such_f' is invalid"):
        sw.load_sweep(path)
    assert main(["sweep", str(path)]) == 2
    assert "divergence=no_such_f" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing created, nothing run


def test_unknown_sweep_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="gird"):
        sw.load_sweep(write_sweep(tmp_path, gird={"seed": [0]}))


def test_dry_run_lists_members_and_folders_and_runs_nothing(tmp_path, capsys):
    path = write_sweep(tmp_path, **DIVERGENCES)
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("→") == 4 and "kl.alpha=0.5" in out and "seed=1" in out
    assert not (tmp_path / "out").exists()


def test_override_values_round_trip_through_the_command_line():
    for value in (0.05, 1e-4, "js", "a b", True, None, [1, 2], {"a": 1}, "0.5", "x=y,z"):
        raw: dict = {}
        from kltrain.config import apply_override

        apply_override(raw, f"k={sw._yaml_value(value)}")
        assert raw["k"] == value


# ----------------------------------------------------------------------------------------------
# Running with a fake fit


class FakeFit:
    """Records calls; the member named ``fail`` exits 1 with an error line, ``preempt`` exits 75
    (once, or always) after setting the stop event as a SIGTERM would."""

    def __init__(self, fail: str | None = None, preempt: str | None = None):
        self.calls: list[str] = []
        self.fail, self.preempt = fail, preempt

    def __call__(self, member, base, env, stop):
        self.calls.append(member.name)
        assert base.name == "base.yaml" and (
            "OMP_NUM_THREADS" in env or "CUDA_VISIBLE_DEVICES" in env
        )
        if member.name == self.fail:
            return sw.Outcome(1, "kltrain: error: reward term 'x' raised at step 2")
        if member.name == self.preempt:
            stop.set()
            return sw.Outcome(75, "kltrain: preempted: SIGTERM received")
        return sw.Outcome(0)


def states(tmp_path: Path) -> dict[str, str]:
    data = json.loads((tmp_path / "out" / "sweep.json").read_text())
    return {m["name"]: m["state"] for m in data["members"]}


def test_a_failed_member_is_recorded_and_the_others_still_run(tmp_path):
    sweep = sw.load_sweep(write_sweep(tmp_path, **DIVERGENCES))
    fit = FakeFit(fail="divergence=reverse_kl,seed=1")
    assert sw.run_sweep(sweep, fit=fit, evaluate=None, log=lambda s: None) == 1
    assert fit.calls == [m.name for m in sweep.members]  # every member ran
    data = json.loads((tmp_path / "out" / "sweep.json").read_text())
    failed = [m for m in data["members"] if m["state"] == "failed"]
    assert [m["name"] for m in failed] == ["divergence=reverse_kl,seed=1"]
    assert failed[0]["exit_code"] == 1 and "reward term 'x'" in failed[0]["last_error"]
    assert sum(m["state"] == "finished" for m in data["members"]) == 3
    assert all(m["folder"] == str(tmp_path / "out" / m["name"]) for m in data["members"])


def test_rerun_skips_finished_members_and_resumes_the_others(tmp_path):
    sweep = sw.load_sweep(write_sweep(tmp_path, **DIVERGENCES))
    first = FakeFit(preempt="divergence=reverse_kl,seed=1")
    assert sw.run_sweep(sweep, fit=first, evaluate=None, log=lambda s: None) == 75
    assert first.calls == ["divergence=reverse_kl,seed=0", "divergence=reverse_kl,seed=1"]
    assert list(states(tmp_path).values()) == ["finished", "stopped", "pending", "pending"]
    second = FakeFit()
    sweep = sw.load_sweep(tmp_path / "sweep.yaml")
    assert sw.run_sweep(sweep, fit=second, evaluate=None, log=lambda s: None) == 0
    assert second.calls == [m.name for m in sweep.members[1:]]  # the finished one skipped
    assert set(states(tmp_path).values()) == {"finished"}


def test_a_sweep_folder_refuses_another_sweep_file(tmp_path):
    path = write_sweep(tmp_path, **DIVERGENCES)
    sw.run_sweep(sw.load_sweep(path), fit=FakeFit(), evaluate=None, log=lambda s: None)
    write_sweep(tmp_path, grid={"kl.divergence": ["reverse_kl", "js"], "seed": [0, 1]})
    with pytest.raises(ConfigError, match="holds another sweep"):
        sw.run_sweep(sw.load_sweep(path), fit=FakeFit(), evaluate=None, log=lambda s: None)
    write_sweep(tmp_path, **DIVERGENCES)  # the same sweep file again: accepted
    assert sw.read_state(sw.load_sweep(path))["members"][0]["state"] == "finished"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**BASE, "seed": 3}))  # its base changed
    with pytest.raises(ConfigError, match="holds another sweep"):
        sw.read_state(sw.load_sweep(path))


def test_parallel_members_each_get_a_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(sw, "_gpu_count", lambda: 0)
    monkeypatch.setattr(sw.os, "cpu_count", lambda: 8)
    assert sw.member_env(0, 4) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    monkeypatch.setattr(sw, "_gpu_count", lambda: 2)
    assert [sw.member_env(s, 2)["CUDA_VISIBLE_DEVICES"] for s in (0, 1)] == ["0", "1"]


def test_parallel_sweep_runs_every_member_once(tmp_path):
    sweep = sw.load_sweep(write_sweep(tmp_path, **DIVERGENCES))
    fit = FakeFit()
    assert sw.run_sweep(sweep, parallel=2, fit=fit, evaluate=None, log=lambda s: None) == 0
    assert sorted(fit.calls) == sorted(m.name for m in sweep.members)


# ----------------------------------------------------------------------------------------------
# The real child process: the stop signal reaches it and its exit 75 is kept


CHILD = """
import signal, sys, time
def stop(*args):
    print("kltrain: preempted: checkpoint written")
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
print("started", flush=True)
time.sleep(30)
"""


def test_stop_forwards_sigterm_to_the_child_and_keeps_exit_75(tmp_path):
    stop = threading.Event()
    timer = threading.Timer(1.0, stop.set)
    timer.start()
    outcome = sw._run_child([sys.executable, "-c", CHILD], {}, stop, tmp_path / "child.log")
    timer.join()
    assert outcome.exit_code == 75 and "preempted" in outcome.last_error


def test_failed_child_reports_its_exit_code_and_last_error_line(tmp_path):
    code = "import sys; print('kltrain: error: data.prompts: file not found: x.jsonl'); sys.exit(2)"
    outcome = sw._run_child([sys.executable, "-c", code], {}, threading.Event(), tmp_path / "l.log")
    assert outcome == sw.Outcome(2, "kltrain: error: data.prompts: file not found: x.jsonl")


@pytest.mark.parametrize("name", ["sweep_divergence.yaml", "sweep_fdpg.yaml"])
def test_shipped_sweeps_expand_and_validate(name):
    sweep = sw.load_sweep(Path(__file__).parents[1] / "configs" / name)
    assert len(sweep.members) == 8 and len({m.name for m in sweep.members}) == 8
    assert sweep.spec.evaluate is not None


def test_extras_match_numbers_and_booleans_as_written(tmp_path):
    path = write_sweep(
        tmp_path,
        grid={"kl.coef": [0.1, 1], "data.shuffle": [True, False]},
        extras={"kl.coef": {0.1: {"kl.chunk_size": 64}}, "data.shuffle": {True: {"seed": 7}}},
    )
    resolved = {m.name: m.resolved for m in sw.load_sweep(path).members}
    assert resolved["coef=0.1,shuffle=true"]["kl.chunk_size"] == 64
    assert resolved["coef=0.1,shuffle=true"]["seed"] == 7
    assert "kl.chunk_size" not in resolved["coef=1,shuffle=false"]
    assert "seed" not in resolved["coef=1,shuffle=false"]
