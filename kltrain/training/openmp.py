"""How long idle OpenMP threads wait for work before they sleep, chosen before torch loads.

A kltrain step alternates thousands of short parallel regions (decoding runs ~200 small GEMMs per
token) with single-threaded Python in between. Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``)
makes every region pay a futex wake-up of each worker; spinning forever (``ACTIVE``) burns cores
that another process on the same machine needs. The middle: spin ``SPIN_COUNT`` rounds of
libgomp's pause loop (GNU OpenMP, the runtime of torch's pip wheels; well under a millisecond),
then sleep, when this machine's cores hold every process's threads; sleep at once when they do
not (several processes or sweep members sharing the cores, each with the default thread count).

Measured on 2 cores (smollm2-135m, ``scripts/bench_step.py``'s GRPO step, one process): PASSIVE
8.0–8.4 s per step, the bounded spin 6.5–6.7 s (generation 4.4 → 3.4 s, update 2.6–2.8 → 2.3 s).

Variables the user set are kept. Those kltrain chose are listed in ``KLTRAIN_OPENMP_DEFAULTS``,
so that a process kltrain starts (the multi-process launcher's children, sweep members) chooses
again for its own share of the cores instead of inheriting the parent's choice as the user's.
No torch import here: this runs before torch exists in the process.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

#: libgomp's spin rounds before an idle thread sleeps (its own default is 300,000; PASSIVE is 0).
SPIN_COUNT = 10_000
#: Variables that set the wait: a user who set any of them has chosen.
USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
#: Where kltrain records the variables it set itself (space-separated names).
MARKER = "KLTRAIN_OPENMP_DEFAULTS"


def wait_settings(environ: MutableMapping[str, str], cpu_count: int) -> dict[str, str]:
    """The variables to add to ``environ``: none when the user set the wait; a bounded spin
    when ``LOCAL_WORLD_SIZE`` (default 1) × ``OMP_NUM_THREADS`` (default ``cpu_count``) threads
    fit in ``cpu_count`` cores; PASSIVE otherwise."""
    if any(name in environ for name in USER_SETTINGS):
        return {}
    processes = _positive_int(environ.get("LOCAL_WORLD_SIZE"), 1)
    threads = _positive_int(environ.get("OMP_NUM_THREADS"), cpu_count)
    if processes * threads <= cpu_count:
        return {"GOMP_SPINCOUNT": str(SPIN_COUNT)}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def choose_wait(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Forget the settings an ancestor kltrain process chose (:data:`MARKER`), then set this
    process's (:func:`wait_settings`) in ``environ`` (default ``os.environ``); returns them."""
    environ = os.environ if environ is None else environ
    for name in environ.pop(MARKER, "").split():
        environ.pop(name, None)
    chosen = wait_settings(environ, _usable_cpus())
    environ.update(chosen)
    if chosen:
        environ[MARKER] = " ".join(chosen)
    return chosen


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what a container or taskset leaves this process
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _positive_int(text: str | None, default: int) -> int:
    try:
        value = int(text) if text else default
    except ValueError:
        return default
    return value if value > 0 else default
