"""Child processes the tests launch (``torchrun``, ``kltrain fit --num-processes``): their
environment, and what a failed one reports.

A multi-process launch that fails prints torchrun's summary last ("rank 1 exitcode -6"), and
a plain tail of the output keeps only that: the rank's own error, printed first, is lost. The
report below gives the tail, then every error block of every rank, the first one last.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Lines that open what a failing process printed about itself: a Python traceback, a fatal
# signal's stack (faulthandler), a C++ exception that ended in std::terminate (gloo's own).
_ERROR_START = re.compile(
    r"Traceback \(most recent call last\)|Fatal Python error|terminate called|what\(\):"
    r"|Aborted|Segmentation fault|Error: "
)


def child_pythonpath() -> str:
    """This checkout first, then whatever PYTHONPATH the parent had (kept: it may carry the
    dependencies, as on machines that install them outside the interpreter)."""
    parent = os.environ.get("PYTHONPATH")
    return os.pathsep.join([str(REPO), parent] if parent else [str(REPO)])


def child_env(**extra: str) -> dict[str, str]:
    """The parent's environment plus: this checkout on PYTHONPATH, no tokenizer threads, and
    faulthandler on, so that a process killed by a signal (SIGABRT, SIGSEGV) prints every
    thread's Python stack before it dies."""
    return {
        **os.environ,
        "PYTHONPATH": child_pythonpath(),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONFAULTHANDLER": "1",
        **extra,
    }


def failure_report(
    done: subprocess.CompletedProcess, block_lines: int = 40, most: int = 6000, tail: int = 2000
) -> str:
    """The return code, the last ``tail`` characters of stderr, then the error blocks
    (``block_lines`` lines from each line matching :data:`_ERROR_START`, merged where they
    overlap; at most ``most`` characters) with the first one last: CI logs and pytest's
    repetition of a fixture's error over every test show only the end of the message, and
    the first error is most often the cause of the others."""
    lines = f"{done.stdout or ''}\n{done.stderr or ''}".splitlines()
    blocks: list[list[str]] = []
    open_until = -1  # index past the last line of the block being collected
    for i, line in enumerate(lines):
        if _ERROR_START.search(line):
            if i >= open_until:
                blocks.append([])
            open_until = i + block_lines
        if i < open_until:
            blocks[-1].append(line)
    errors = "\n----\n".join("\n".join(b) for b in reversed(blocks))[-most:]
    stderr_tail = (done.stderr or "")[-tail:]
    return (
        f"exit code {done.returncode}\ntail of stderr:\n{stderr_tail}\n"
        f"errors, the first one last:\n{errors}"
    )


def assert_launch_ok(done: subprocess.CompletedProcess) -> None:
    """A launched command that exited 0, else its :func:`failure_report`."""
    if done.returncode != 0:
        raise AssertionError(failure_report(done))
