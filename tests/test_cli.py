"""The command line: validate prints the resolved config without loading models; divergences
lists every name; bad input exits 2 with one message naming the problem, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kltrain.cli import main
from kltrain.divergence.estimators import ESTIMATOR_NAMES
from kltrain.divergence.functions import DIVERGENCE_NAMES

ROOT = Path(__file__).resolve().parents[1]


def test_validate_prints_resolved_config_with_overrides(capsys):
    code = main(["validate", str(ROOT / "configs/quickstart.yaml"), "kl.divergence=forward_kl"])
    assert code == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)
    assert resolved["kl"]["divergence"] == "forward_kl"
    assert resolved["gradient_followed"] == "local forward_kl"
    assert resolved["trainer"]["learning_rate"] > 0  # defaults are filled in


def test_validate_answers_whether_fit_would_start(capsys):
    # issue 10: validate printed "# ok" for a policy that does not exist
    code = main(["validate", str(ROOT / "configs/quickstart.yaml"), "model.policy=/no/such/model"])
    assert code == 2
    assert "model.policy: local model folder /no/such/model does not exist" in (
        capsys.readouterr().err
    )


def test_refused_pair_exits_2_with_explanation(capsys):
    code = main(
        [
            "validate",
            str(ROOT / "configs/quickstart.yaml"),
            "kl.estimator=k3",
            "kl.placement=loss",
            "kl.importance_ratio=off",  # (auto would weight k3 by w: local reverse KL)
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "local forward_kl" in err and "kl.accept_gradient" in err
    code = main(
        [
            "validate",
            str(ROOT / "configs/quickstart.yaml"),
            "kl.estimator=k3",
            "kl.accept_gradient=local forward_kl",
        ]
    )
    assert code == 0


def test_misspelt_key_exits_2(capsys):
    code = main(["validate", str(ROOT / "configs/quickstart.yaml"), "kl.coeff=0.1"])
    assert code == 2
    assert "did you mean `kl.coef`" in capsys.readouterr().err


def test_divergences_lists_every_name(capsys):
    assert main(["divergences"]) == 0
    out = capsys.readouterr().out
    for name in DIVERGENCE_NAMES + ESTIMATOR_NAMES:
        assert f"  {name} " in out


def test_unknown_model_name_is_one_clear_error(tmp_path, capsys):
    code = main(
        [
            "fit",
            str(ROOT / "configs/quickstart.yaml"),
            f"model.policy={tmp_path / 'missing-model'}",
            f"trainer.output_dir={tmp_path / 'run'}",
            "tracking.wandb.mode=disabled",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "missing-model" in err
    assert "Traceback" not in err


def test_missing_prompt_column_is_one_clear_error(tiny_model, tmp_path, capsys):
    model = tiny_model
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    code = main(
        [
            "fit",
            str(ROOT / "configs/quickstart.yaml"),
            f"model.policy={model}",
            f"data.prompts={data}",
            f"trainer.output_dir={tmp_path / 'run'}",
            "tracking.wandb.mode=disabled",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "prompt" in err and "text" in err  # the missing column and the ones that exist


@pytest.mark.parametrize("entry", [["-m", "kltrain"]])
def test_module_entry_point(entry):
    out = subprocess.run(
        [sys.executable, *entry, "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("kltrain ")


def test_divergences_prints_the_gradient_table_with_the_ratio(capsys):
    assert main(["divergences", "--divergence", "forward_kl"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split()[:2] == ["k3", "loss"])
    on, off = row.split(" | ")
    assert "off*: local forward_kl" in on and "on: local reverse_kl" in on
    assert "off: off_policy" in off and "detached*: local forward_kl" in off
    assert main(["divergences", "--divergence", "nope"]) == 2
    assert "--divergence" in capsys.readouterr().err


# OpenMP's wait: chosen by the CLI before torch (and its OpenMP runtime) is loaded ------------
_RECORD_OMP_AT_TORCH_IMPORT = """
import importlib.abc, json, os, sys

NAMES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
seen = {}

class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.update({n: os.environ.get(n) for n in NAMES}, imported=True)
        return None

sys.meta_path.insert(0, Spy())
from kltrain.cli import main
code = main(["divergences"])
print(json.dumps({"code": code, "at_torch_import": seen or "torch never imported",
                  "after": {n: os.environ.get(n) for n in NAMES}}))
"""


def _omp_wait_seen_by_torch(**settings: str) -> dict:
    """Run the CLI in a fresh process whose environment has none of the wait variables but
    ``settings``; what torch's import saw, and what the environment held afterwards."""
    from kltrain.training.openmp import MARKER, USER_SETTINGS

    drop = {*USER_SETTINGS, MARKER, "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"}
    env = {k: v for k, v in os.environ.items() if k not in drop} | settings
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _RECORD_OMP_AT_TORCH_IMPORT],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cli_sets_a_bounded_spin_before_torch_loads_when_the_cores_hold_its_threads():
    from kltrain.training.openmp import SPIN_COUNT

    seen = _omp_wait_seen_by_torch(OMP_NUM_THREADS="1")
    wait = {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": str(SPIN_COUNT)}
    assert seen == {"code": 0, "at_torch_import": {**wait, "imported": True}, "after": wait}


def test_cli_sets_passive_before_torch_loads_when_processes_oversubscribe_the_cores():
    cores = len(os.sched_getaffinity(0))
    seen = _omp_wait_seen_by_torch(LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS=str(cores))
    wait = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None}
    assert seen == {"code": 0, "at_torch_import": {**wait, "imported": True}, "after": wait}


def test_cli_keeps_the_users_omp_wait_policy():
    seen = _omp_wait_seen_by_torch(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1")
    wait = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": None}
    assert seen == {"code": 0, "at_torch_import": {**wait, "imported": True}, "after": wait}
