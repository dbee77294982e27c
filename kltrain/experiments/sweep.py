"""``kltrain sweep SWEEP.yaml``: expand a grid and/or list of overrides into runs, validate every
one before the first starts, run each as an ordinary ``kltrain fit`` in its own folder, and keep
the state in ``<sweep folder>/sweep.json`` so that the same command resumes after a preemption.

A sweep file::

    name: divergences
    base: quickstart.yaml              # relative to the sweep file
    output_dir: runs/sweep-divergences # the sweep folder (relative to the working directory)
    overrides: {trainer.max_steps: 20} # fixed, for every member
    members:                           # a list of override sets (optional) ...
      - {kl.divergence: reverse_kl}
      - {kl.divergence: alpha}
    grid: {seed: [0, 1]}               # ... times the product of these lists (optional)
    extras:                            # per-value additions: the member with kl.divergence=alpha
      kl.divergence: {alpha: {kl.alpha: 0.5}}
    evaluate: {samples_per_prompt: 4}  # run `kltrain eval` on each member after its fit (optional)

Members are ``members × grid`` in that order (each list entry, then the grid's product, keys in
file order). A member's folder is named from its list/grid overrides (``divergence=js,seed=0``):
readable, filesystem-safe, unique (a collision of short names falls back to full dotted keys,
then to a numeric suffix).

Member states in ``sweep.json``: ``pending`` → ``running`` → ``finished`` | ``failed`` (exit code
and last error line kept) | ``stopped`` (preempted with a checkpoint; resumed next time). A
re-run skips ``finished`` members and resumes every other from its last complete checkpoint
(``kltrain fit --resume``). The resolved sweep is hashed; a sweep folder refuses another sweep.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kltrain.config import ConfigError, apply_override, config_from_dict

#: Exit code of a sweep stopped by SIGTERM/SIGUSR1 (as ``kltrain fit``'s): rerun to continue.
EXIT_PREEMPTED = 75
STATES = ("pending", "running", "finished", "failed", "stopped")


class SweepEvaluate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples_per_prompt: int = Field(4, ge=1)
    seed: int = 0


class SweepFile(BaseModel):
    """The sweep file, validated (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")
    name: str = "sweep"
    base: str
    output_dir: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    members: list[dict[str, Any]] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    extras: dict[str, dict[Any, dict[str, Any]]] = Field(default_factory=dict)
    """``{key: {value: overrides}}``: added to every member whose ``key`` has that value (a
    number or boolean matches as written in YAML: ``kl.coef: {0.1: {...}}``)."""
    evaluate: SweepEvaluate | None = None


@dataclass
class Member:
    name: str
    overrides: dict[str, Any]  # the member's own (list + grid) overrides: what names it
    resolved: dict[str, Any]  # every override applied to the base: fixed, own, extras, W&B

    def override_args(self) -> list[str]:
        return [f"{k}={_yaml_value(v)}" for k, v in self.resolved.items()]


@dataclass
class Sweep:
    file: Path
    spec: SweepFile
    base: Path
    folder: Path
    members: list[Member] = field(default_factory=list)

    @property
    def digest(self) -> str:
        """Hash of what the sweep computes: the base config's text and every member's overrides."""
        payload = {
            "base": self.base.read_text(),
            "members": [[m.name, m.resolved] for m in self.members],
            "evaluate": self.spec.evaluate.model_dump() if self.spec.evaluate else None,
        }
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Loading and expanding


def load_sweep(path: str | Path, output_dir: str | None = None) -> Sweep:
    """Read, expand and validate a sweep file; every member's config is checked here, before any
    run starts (an invalid member raises :class:`ConfigError` naming it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        spec = SweepFile.model_validate(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    except ValidationError as err:
        lines = [f"  {'.'.join(map(str, e['loc'])) or 'sweep'}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"{path}: invalid sweep file\n" + "\n".join(lines)) from None
    base = (path.parent / spec.base).resolve()
    if not base.is_file():
        raise ConfigError(f"{path}: base config not found: {spec.base} (looked at {base})")
    folder = Path(output_dir or spec.output_dir or Path("runs") / f"sweep-{spec.name}")
    sweep = Sweep(path, spec, base, folder, expand(spec, folder))
    validate_members(sweep)
    return sweep


def expand(spec: SweepFile, folder: Path) -> list[Member]:
    """``members × grid`` → named members with their resolved overrides."""
    keys = list(spec.grid)
    combos = [dict(zip(keys, values)) for values in itertools.product(*spec.grid.values())]
    own = [{**m, **g} for m in (spec.members or [{}]) for g in combos]
    names = member_names(own)
    out = []
    for name, overrides in zip(names, own):
        resolved = {**spec.overrides, **overrides}
        for key, per_value in spec.extras.items():
            value = resolved.get(key)
            for match, added in per_value.items():
                if match == value and type(match) is type(value):  # 1 ≠ True, "1" ≠ 1
                    resolved.update(added)
        resolved["trainer.output_dir"] = str(folder / name)
        resolved["tracking.wandb.group"] = spec.name
        resolved["tracking.wandb.run_name"] = name
        resolved["tracking.wandb.tags"] = [f"{k}={v}" for k, v in overrides.items()]
        out.append(Member(name, overrides, resolved))
    return out


def member_names(own: list[dict[str, Any]]) -> list[str]:
    """Readable, filesystem-safe, unique names: ``divergence=js,seed=0`` from the last part of
    each key; if two members would share a name, full dotted keys; then a ``-<i>`` suffix."""
    for short in (True, False):
        names = [_name(o, short) for o in own]
        if len(set(names)) == len(names):
            return names
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if names.count(name) == 1 else f"{name}-{seen[name]}")
    return out


def _name(overrides: dict[str, Any], short: bool) -> str:
    if not overrides:
        return "base"
    parts = []
    for key, value in overrides.items():
        label = key.split(".")[-1] if short else key
        parts.append(f"{label}={_safe(value)}")
    return ",".join(parts)


def _safe(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def _yaml_value(value: Any) -> str:
    """A value as the YAML that ``apply_override`` parses back into the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text[: -len("...")].strip() if text.endswith("\n...") else text


def validate_members(sweep: Sweep) -> None:
    """Load every member's config; the first invalid one stops the sweep, named."""
    base_raw = yaml.safe_load(sweep.base.read_text()) or {}
    for member in sweep.members:
        raw = json.loads(json.dumps(base_raw))  # a deep copy
        try:
            for item in member.override_args():
                apply_override(raw, item)
            config_from_dict(raw, source=f"sweep member {member.name!r}")
        except ConfigError as err:
            raise ConfigError(
                f"{sweep.file}: member {member.name!r} is invalid; nothing was run\n{err}"
            ) from None


# ----------------------------------------------------------------------------------------------
# State (sweep.json)


def read_state(sweep: Sweep) -> dict[str, Any]:
    """``sweep.json``, created for a new folder; refuses a folder that holds another sweep."""
    path = sweep.folder / "sweep.json"
    if path.is_file():
        state = json.loads(path.read_text())
        if state.get("hash") != sweep.digest:
            raise ConfigError(
                f"{sweep.folder} holds another sweep (hash {state.get('hash')}, from "
                f"{state.get('sweep_file')}); {sweep.file} resolves to {sweep.digest}. Use "
                f"another output folder (--output-dir) or restore that sweep file"
            )
        return state
    return {
        "name": sweep.spec.name,
        "sweep_file": str(sweep.file),
        "base": str(sweep.base),
        "hash": sweep.digest,
        "members": [
            {
                "name": m.name,
                "folder": str(sweep.folder / m.name),
                "overrides": m.overrides,
                "resolved": m.resolved,
                "state": "pending",
            }
            for m in sweep.members
        ],
    }


def write_state(folder: Path, state: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".sweep.json.tmp"
    tmp.write_text(json.dumps(state, indent=1, default=str))
    os.replace(tmp, folder / "sweep.json")


# ----------------------------------------------------------------------------------------------
# Running


@dataclass
class Outcome:
    """What running one member returned: its exit code and its last error line."""

    exit_code: int
    last_error: str = ""


#: ``(member, base config, environment, stop event) -> Outcome``: runs one member to the end.
FitFunction = Callable[[Member, Path, dict[str, str], threading.Event], Outcome]


def subprocess_fit(
    member: Member, base: Path, env: dict[str, str], stop: threading.Event
) -> Outcome:
    """``kltrain fit BASE <overrides> --resume`` in a child process (its own session, so that a
    signal to the sweep's process group reaches it only through the sweep, once)."""
    cmd = [sys.executable, "-m", "kltrain", "fit", str(base), *member.override_args(), "--resume"]
    return _run_child(cmd, env, stop, Path(member.resolved["trainer.output_dir"]) / "fit.log")


def subprocess_eval(folder: Path, settings: SweepEvaluate, env: dict[str, str], stop) -> Outcome:
    cmd = [
        sys.executable, "-m", "kltrain", "eval", str(folder),
        "--samples-per-prompt", str(settings.samples_per_prompt), "--seed", str(settings.seed),
    ]  # fmt: skip
    return _run_child(cmd, env, stop, folder / "eval.log")


def _run_child(cmd: list[str], env: dict[str, str], stop: threading.Event, log: Path) -> Outcome:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **env},
            start_new_session=True,
        )  # fmt: skip
        forwarded = False
        while proc.poll() is None:
            if stop.is_set() and not forwarded:
                proc.send_signal(signal.SIGTERM)  # the child checkpoints and exits 75
                forwarded = True
            time.sleep(0.2)
    return Outcome(proc.returncode, _last_error_line(log))


def _last_error_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if "error" in line.lower() or "stopped" in line.lower() or "preempted" in line.lower():
            return line[-500:]
    return lines[-1][-500:] if lines else ""


def member_env(slot: int, parallel: int) -> dict[str, str]:
    """One GPU per concurrent member when GPUs exist; on CPU, the cores split between them."""
    gpus = _gpu_count()
    if gpus:
        return {"CUDA_VISIBLE_DEVICES": str(slot % gpus)}
    threads = str(max(1, (os.cpu_count() or 1) // parallel))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # no usable CUDA: the members run on CPU
        return 0


def run_sweep(
    sweep: Sweep,
    *,
    parallel: int = 1,
    fit: FitFunction = subprocess_fit,
    evaluate: Callable[..., Outcome] | None = subprocess_eval,
    stop: threading.Event | None = None,
    log: Callable[[str], None] = print,
) -> int:
    """Run every member not yet finished; returns 0, 1 (a member failed) or 75 (stopped)."""
    state = read_state(sweep)
    write_state(sweep.folder, state)
    stop = stop or threading.Event()
    lock = threading.Lock()
    todo = [
        (m, rec) for m, rec in zip(sweep.members, state["members"]) if rec["state"] != "finished"
    ]
    for m, rec in zip(sweep.members, state["members"]):
        if rec["state"] == "finished":
            log(f"kltrain sweep: {m.name}: finished earlier, skipped")
    slots = list(range(parallel))

    def work(item: tuple[Member, dict[str, Any]]) -> None:
        member, rec = item
        if stop.is_set():
            return
        with lock:
            slot = slots.pop(0)
            rec.update(state="running", started=time.time())
            write_state(sweep.folder, state)
        log(f"kltrain sweep: {member.name}: running ({rec['folder']})")
        env = member_env(slot, parallel)
        begin = time.perf_counter()
        outcome = fit(member, sweep.base, env, stop)
        if outcome.exit_code == 0 and evaluate is not None and sweep.spec.evaluate is not None:
            outcome = evaluate(Path(rec["folder"]), sweep.spec.evaluate, env, stop)
        with lock:
            slots.append(slot)
            _record(rec, outcome, time.perf_counter() - begin)
            write_state(sweep.folder, state)
        log(f"kltrain sweep: {member.name}: {rec['state']}" + _detail(rec))

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(work, todo))
    return _exit_code(state, stop, log)


def _record(rec: dict[str, Any], outcome: Outcome, seconds: float) -> None:
    rec["wall_seconds"] = rec.get("wall_seconds", 0.0) + seconds
    rec["exit_code"] = outcome.exit_code
    if outcome.exit_code == 0:
        rec.update(state="finished", last_error="")
    elif outcome.exit_code == EXIT_PREEMPTED:
        rec.update(state="stopped", last_error=outcome.last_error)
    else:
        rec.update(state="failed", last_error=outcome.last_error)


def _detail(rec: dict[str, Any]) -> str:
    if rec["state"] == "finished":
        return f" in {rec['wall_seconds']:.0f} s"
    return f" (exit {rec['exit_code']}: {rec.get('last_error', '')})"


def _exit_code(state: dict[str, Any], stop: threading.Event, log: Callable[[str], None]) -> int:
    counts = {s: sum(r["state"] == s for r in state["members"]) for s in STATES}
    log("kltrain sweep: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    if stop.is_set() or counts["stopped"] or counts["pending"]:
        return EXIT_PREEMPTED
    return 1 if counts["failed"] else 0


def describe(sweep: Sweep) -> str:
    """The ``--dry-run`` listing: each member, its folder and overrides."""
    lines = [
        f"sweep {sweep.spec.name!r}: {len(sweep.members)} members in {sweep.folder} "
        f"(hash {sweep.digest})"
    ]
    for m in sweep.members:
        lines.append(f"  {m.name}  →  {sweep.folder / m.name}")
        lines.append("      " + " ".join(m.override_args()))
    return "\n".join(lines)


def install_stop_handlers(stop: threading.Event) -> None:
    """SIGTERM/SIGUSR1 stop the running members with their checkpoints (they exit 75) and then
    the sweep (exit 75): rerunning the same command continues."""

    def handler(signum, frame):
        print(
            f"kltrain sweep: {signal.Signals(signum).name}: stopping the running members",
            flush=True,
        )
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)
