"""Issue 10's table of bad inputs: config, data, rewards, models and the run folder. Each case runs
``kltrain fit`` (or ``validate``) in process on a tiny random model and checks the README's
exit-code contract: exit 2 with one message (no traceback) that names the key, file or row, and
the user's files byte-identical afterwards (no run folder left behind either)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from kltrain.cli import main
from tests.helpers.tiny import loop_config_raw, make_tiny_model_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shared, read-only inputs: a tiny model, the same without its tokenizer, and a run folder
    with a complete checkpoint of step 1."""
    base = tmp_path_factory.mktemp("world")
    model = make_tiny_model_dir(base / "model")
    notok = base / "no-tokenizer"
    notok.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(model / name, notok / name)
    run = base / "run"
    raw = loop_config_raw(str(model), run, trainer={"max_steps": 1})
    (base / "run.yaml").write_text(yaml.safe_dump(raw))
    assert main(["fit", str(base / "run.yaml")]) == 0
    return SimpleNamespace(model=model, notok=notok, run=run, base=base)


def snapshot(*roots: Path) -> dict[str, str]:
    """Every path under ``roots`` (folders too) → the SHA-256 of its bytes ("dir" for a folder)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def damaged_checkpoint(user: Path, world) -> None:
    shutil.copytree(world.run, user / "run")
    weights = next((user / "run" / "checkpoints").glob("step-*/model/model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])


def leftovers(*names: str):
    def prepare(user: Path, world) -> None:
        (user / "run").mkdir()
        for name in names:
            (user / "run" / name).write_text('{"step": 1, "reward/mean": 0.25}\n')

    return prepare


def module(name: str, text: str):
    def prepare(user: Path, world) -> None:
        (user / f"{name}.py").write_text(text)

    return prepare


def prompts(text: str):
    def prepare(user: Path, world) -> None:
        (user / "p.jsonl").write_text(text)

    return prepare


LONG = json.dumps({"prompt": "great movie " * 30}) + "\n"
NO_KWARGS = "def score(prompts, completions):\n    return [0.0] * len(completions)\n"
RAISING_F = "def f(u):\n    raise RuntimeError('my f is broken')\n"
BAD_IMPORT = "raise RuntimeError('this module cannot be imported')\n"

#: (id, command, overrides, prepare, exit code, fragments the message must contain). Overrides
#: and fragments may use {user} (the case's folder), {model}, {notok} (shared tiny models).
CASES = [
    # config
    ("misspelt key", "fit", ["kl.divergnce=js"], None, 2, ["kl.divergnce", "`kl.divergence`"]),
    (
        "override named",
        "fit",
        ["trainer.max_steps=many"],
        None,
        2,
        ["command-line overrides", "trainer.max_steps", "'trainer.max_steps=many'"],
    ),
    ("empty config", "fit", [], "empty", 2, ["config.yaml is empty", "model"]),
    ("yaml syntax", "validate", [], "syntax", 2, ["config.yaml: not valid YAML"]),
    (
        "minibatches",
        "validate",
        ["algorithm.num_minibatches=3"],
        None,
        2,
        ["algorithm.num_minibatches=3", "4 sequences"],
    ),
    (
        "fp16 on cpu",
        "fit",
        ["model.dtype=fp16", "trainer.device=cpu"],
        None,
        2,
        ["model.dtype=fp16", "CPU"],
    ),
    (
        "f missing",
        "validate",
        ["kl.divergence=nosuchmodule_i10:f"],
        None,
        2,
        ["kl.divergence", "nosuchmodule_i10"],
    ),
    (
        "f raises",
        "fit",
        ["kl.divergence=raising_f_i10:f"],
        module("raising_f_i10", RAISING_F),
        2,
        ["kl.divergence", "raising_f_i10:f", "my f is broken"],
    ),
    (
        "f import fails",
        "fit",
        ["kl.divergence=bad_import_i10:f"],
        module("bad_import_i10", BAD_IMPORT),
        2,
        ["kl.divergence", "bad_import_i10", "imported"],
    ),
    # data
    (
        "prompts missing",
        "validate",
        ["data.prompts={user}/nope.jsonl"],
        None,
        2,
        ["data.prompts", "nope.jsonl"],
    ),
    (
        "prompts missing (fit)",
        "fit",
        ["data.prompts={user}/nope.jsonl"],
        None,
        2,
        ["data.prompts", "nope.jsonl"],
    ),
    (
        "bad json line",
        "fit",
        ["data.prompts={user}/p.jsonl"],
        prompts('{"prompt": "a"}\n{"prompt": \n'),
        2,
        ["p.jsonl", "line 2"],
    ),
    (
        "row without prompt",
        "fit",
        ["data.prompts={user}/p.jsonl"],
        prompts('{"prompt": "a"}\n{"text": "b"}\n'),
        2,
        ["p.jsonl", "row 1", "'prompt'", "rows count from 0"],
    ),
    (
        "long prompt error",
        "fit",
        ["data.prompts={user}/p.jsonl", "data.on_long_prompt=error", "data.max_prompt_tokens=8"],
        prompts(LONG),
        2,
        ["p.jsonl", "row 0", "data.max_prompt_tokens=8"],
    ),
    # rewards
    (
        "reward module missing",
        "validate",
        ["reward.terms=[{name: 'nosuch_i10:score'}]"],
        None,
        2,
        ["reward term 'nosuch_i10:score'", "nosuch_i10"],
    ),
    (
        "reward without kwargs",
        "fit",
        ["reward.terms=[{name: 'nokw_i10:score'}]"],
        module("nokw_i10", NO_KWARGS),
        2,
        ["nokw_i10:score", "**kwargs"],
    ),
    (
        "reward folder missing",
        "validate",
        ["reward.terms=[{name: 'model:{user}/rm'}]"],
        None,
        2,
        ["the local folder {user}/rm does not exist"],
    ),
    (
        "reward folder missing (fit)",
        "fit",
        ["reward.terms=[{name: 'model:{user}/rm'}]"],
        None,
        2,
        ["the local folder {user}/rm does not exist"],
    ),
    (
        "causal LM as reward",
        "fit",
        ["reward.terms=[{name: 'model:{model}', kwargs: {label: 0}}]"],
        None,
        2,
        ["model:{model}", "newly initialised", "score.weight"],
    ),
    # models
    (
        "policy missing",
        "validate",
        ["model.policy={user}/nomodel"],
        None,
        2,
        ["model.policy", "{user}/nomodel does not exist"],
    ),
    (
        "policy missing (fit)",
        "fit",
        ["model.policy={user}/nomodel"],
        None,
        2,
        ["{user}/nomodel does not exist"],
    ),
    ("no tokenizer", "fit", ["model.policy={notok}"], None, 2, ["{notok} has no tokenizer"]),
    (
        "no tokenizer (validate)",
        "validate",
        ["model.policy={notok}"],
        None,
        2,
        ["model.policy", "{notok} has no tokenizer"],
    ),
    (
        "policy is a file",
        "fit",
        ["model.policy={model}/config.json"],
        None,
        2,
        ["config.json is a file"],
    ),
    # run folder
    (
        "output_dir is a file",
        "fit",
        ["trainer.output_dir={user}/config.yaml"],
        None,
        2,
        ["trainer.output_dir=", "is a file"],
    ),
    (
        "output_dir not writable",
        "fit",
        ["trainer.output_dir=/sys/kltrain-i10/run"],
        None,
        2,
        ["trainer.output_dir=/sys/kltrain-i10/run", "cannot write"],
    ),
    (
        "output_dir is the config's folder",
        "fit",
        ["trainer.output_dir={user}"],
        None,
        2,
        ["trainer.output_dir={user}", "overwrite"],
    ),
    (
        "leftover metrics",
        "fit",
        [],
        leftovers("metrics.jsonl"),
        2,
        ["trainer.output_dir", "metrics.jsonl", "--overwrite"],
    ),
    (
        "leftover samples and config",
        "fit",
        [],
        leftovers("samples.jsonl", "config.yaml"),
        2,
        ["config.yaml, samples.jsonl"],
    ),
    (
        "fresh start over checkpoints",
        "fit",
        [],
        "copy_run",
        2,
        ["already holds checkpoints", "--resume"],
    ),
    (
        "resume path missing",
        "fit",
        ["--resume", "{user}/elsewhere"],
        None,
        2,
        ["--resume {user}/elsewhere", "no such checkpoint"],
    ),
    (
        "damaged checkpoint",
        "fit",
        ["--resume"],
        damaged_checkpoint,
        2,
        ["model.safetensors cannot be read", "damaged"],
    ),
    (
        "resume with another seed",
        "fit",
        ["--resume", "seed=7"],
        "copy_run",
        2,
        ["seed: 0 → 7", "--allow-config-change"],
    ),
]


def placed(text: str, fill: dict[str, Path]) -> str:
    for key, value in fill.items():
        text = text.replace(key, str(value))
    return text


def prepare_case(user: Path, world, prepare) -> None:
    raw = loop_config_raw(str(world.model), user / "run", trainer={"max_steps": 1})
    text = yaml.safe_dump(raw)
    if prepare == "empty":
        text = ""
    elif prepare == "syntax":
        text = "model: {policy: [unclosed\n"
    elif prepare == "copy_run":
        shutil.copytree(world.run, user / "run")
    elif callable(prepare):
        prepare(user, world)
    (user / "config.yaml").write_text(text)


@pytest.mark.parametrize(
    ("command", "overrides", "prepare", "code", "fragments"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_input(
    world, tmp_path, monkeypatch, capsys, command, overrides, prepare, code, fragments
):
    user = tmp_path / "user"
    user.mkdir()
    prepare_case(user, world, prepare)
    fill = {"{user}": user, "{model}": world.model, "{notok}": world.notok}
    argv = [command, str(user / "config.yaml"), *(placed(o, fill) for o in overrides)]
    before = snapshot(user, world.base)
    monkeypatch.chdir(user)  # user modules import from the current folder
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for fragment in fragments:
        assert placed(fragment, fill) in err
    assert snapshot(user, world.base) == before  # byte-identical, no folder created
