"""Atomic checkpoints of the run state.

Layout: ``<run>/checkpoints/step-00000012/`` holding ``model/`` (safetensors via
``save_pretrained``, or the PEFT adapter), ``optimizer.pt`` and ``scheduler.pt`` (tensors only,
read back with ``weights_only=True``), ``state.json`` (step and every stateful object's
``state_dict()``) and, written last, the completeness marker ``COMPLETE``.

A checkpoint is written into a hidden temporary folder and renamed into place only once complete;
folders without the marker are never loaded and never counted; old checkpoints are deleted only
after the new one is complete, so some complete checkpoint exists at every moment.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

MARKER = "COMPLETE"
PREFIX = "step-"


def save(
    root: Path,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    states: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write the checkpoint of ``step`` atomically and prune to the newest ``keep_last``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp / "model", safe_serialization=True)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **states}, indent=1))
    _write_durably(tmp / MARKER, "complete\n")
    if final.exists():  # a complete checkpoint of this step already exists: keep it
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)
    prune(root, keep_last)
    return final


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def is_complete(path: Path) -> bool:
    return path.is_dir() and path.name.startswith(PREFIX) and (path / MARKER).is_file()


def list_complete(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if is_complete(p))


def latest(root: Path) -> Path | None:
    found = list_complete(root)
    return found[-1] if found else None


def prune(root: Path, keep_last: int) -> None:
    for old in list_complete(root)[:-keep_last]:
        shutil.rmtree(old)


def load_state(path: Path) -> dict[str, Any]:
    """The JSON state of a complete checkpoint (step, sampler, β controller, ...)."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    return json.loads((path / "state.json").read_text())


def load_tensors(path: Path) -> Any:
    """Optimizer/scheduler state: tensors only; a pickle with code in it is refused."""
    return torch.load(path, map_location="cpu", weights_only=True)
