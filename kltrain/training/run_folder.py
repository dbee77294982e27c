"""The run folder (``trainer.output_dir``) before a run writes into it: nothing the user had is
deleted or overwritten unless they ask (``kltrain fit --overwrite``).

- The folder must be creatable and writable: checked before any model loads.
- A fresh start refuses a folder holding an earlier run's files (``metrics.jsonl``,
  ``samples.jsonl``, ``config.yaml``, ``final/``: a crashed run with ``save_every: 0`` leaves
  them) and a folder whose ``config.yaml`` is the config file being read.
- Files of an abandoned timeline (resuming an older checkpoint; a ``--resume`` restart of a run
  that never saved a checkpoint) are moved aside into ``<run>/abandoned/<time>-<why>/``, never
  deleted.

Nothing here writes until :func:`set_aside` is called, after every check has passed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

from kltrain.config import ConfigError

#: What a run writes at the top of its folder (besides ``checkpoints/``).
RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "final")
ABANDONED = "abandoned"


def check_writable(output_dir: Path) -> None:
    """``trainer.output_dir`` is a folder (or can be created as one) this process may write."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"trainer.output_dir={path} is a file; name a folder for the run")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"trainer.output_dir={path}: {existing} is a file, so the run folder cannot be created"
        )
    try:  # a real write (root passes every permission test, not a read-only file system)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(
            f"trainer.output_dir={path}: cannot write in {existing} ({err.strerror or err}); "
            f"choose a folder you can write to"
        ) from None


def leftover_files(output_dir: Path) -> list[Path]:
    """An earlier run's files at the top of ``output_dir``."""
    return [Path(output_dir) / name for name in RUN_FILES if (Path(output_dir) / name).exists()]


def check_fresh_start(output_dir: Path, config_path: str | None, overwrite: bool) -> None:
    """A fresh start (no checkpoint to resume) may write into ``output_dir``: it does not hold
    the config file being read, nor (unless ``overwrite``) an earlier run's files."""
    own = Path(output_dir) / "config.yaml"
    if config_path is not None and own.exists() and own.resolve() == Path(config_path).resolve():
        raise ConfigError(
            f"trainer.output_dir={output_dir} is the folder of the config file {config_path}: the "
            f"run writes its resolved config.yaml there and would overwrite it. Choose another "
            f"trainer.output_dir (or keep the config elsewhere)"
        )
    found = leftover_files(output_dir)
    if found and not overwrite:
        raise ConfigError(
            f"trainer.output_dir={output_dir} already holds an earlier run's "
            f"{', '.join(p.name for p in found)} (and no checkpoint to resume); a fresh start "
            f"would replace them. Choose another trainer.output_dir, move them away, or pass "
            f"--overwrite to replace them"
        )


def set_aside(run_dir: Path, moved: list[Path], copied: list[Path], why: str) -> Path | None:
    """Move ``moved`` and copy ``copied`` (paths inside ``run_dir``) into
    ``run_dir/abandoned/<time>-<why>/``, keeping their relative paths; the folder, or None when
    there was nothing to keep."""
    moved = [p for p in moved if p.exists()]
    copied = [p for p in copied if p.exists()]
    if not moved and not copied:
        return None
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    dest = Path(run_dir) / ABANDONED / f"{stamp}-{why}"
    for path in copied:
        target = dest / path.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    for path in moved:
        target = dest / path.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    return dest
