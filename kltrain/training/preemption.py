"""Preemption: turn SIGTERM / SIGUSR1 into "checkpoint, then exit", and requeue under SLURM.

The handler only records the signal; the loop polls :meth:`SignalWatcher.requested` at safe
points (between the phases of a step), so a checkpoint is never written from inside a signal
handler and never twice: a second signal while stopping is reported and otherwise ignored.

Exit code :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL`` in ``sysexits.h``: "try again later") means
"stopped on a signal after writing a complete checkpoint; rerun with ``--resume``".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from types import FrameType

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(RuntimeError):
    """The run stopped on a signal after writing a complete checkpoint."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, signum: int, step: int, checkpoint: str, requeued: str | None):
        self.signum, self.step, self.checkpoint, self.requeued = signum, step, checkpoint, requeued
        name = signal.Signals(signum).name
        note = f"; {requeued}" if requeued else ""
        super().__init__(
            f"{name} received: checkpoint of step {step} written to {checkpoint}{note}"
        )


class SignalWatcher:
    """Context manager: while active, SIGTERM and SIGUSR1 set :attr:`signum` instead of killing.

    Handlers can only be installed from the main thread; elsewhere (e.g. a trainer driven from a
    worker thread) the watcher is inert and signals keep their previous behaviour.
    """

    def __init__(self, signals: tuple[int, ...] = SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> SignalWatcher:
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread
            self._restore()
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            print(f"kltrain: {name} received: checkpointing, then exiting", file=sys.stderr)
        else:
            print(f"kltrain: {name} received again: already stopping", file=sys.stderr)

    @property
    def requested(self) -> bool:
        return self.signum is not None


def slurm_job_id(env: Mapping[str, str]) -> str | None:
    """The id ``scontrol requeue`` needs: ``<array job>_<task>`` for an array task, else the job."""
    array_job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return env.get("SLURM_JOB_ID") or None


def requeue(
    signum: int,
    env: Mapping[str, str] | None = None,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> str | None:
    """After SIGUSR1 inside a SLURM job, ``scontrol requeue`` it; returns what happened (None when
    not applicable). SIGTERM is SLURM's own cancel/time-limit signal, so it never requeues."""
    env = os.environ if env is None else env
    job = slurm_job_id(env)
    if signum != signal.SIGUSR1 or job is None:
        return None
    try:
        done = run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"scontrol requeue {job} failed: {err}"
    if done.returncode != 0:
        return f"scontrol requeue {job} failed ({done.returncode}): {done.stderr.strip()}"
    return f"requeued SLURM job {job}"
