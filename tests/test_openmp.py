"""kltrain.training.openmp: the wait chosen for idle OpenMP threads, from the environment."""

from __future__ import annotations

import pytest

from kltrain.training.openmp import MARKER, SPIN_COUNT, choose_wait, wait_settings

SPIN = {"GOMP_SPINCOUNT": str(SPIN_COUNT)}
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.parametrize(
    ("environ", "cpus", "expected"),
    [
        ({}, 2, SPIN),  # one process with the default threads: one per core
        ({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, 2, SPIN),  # 2 × 1 on 2 cores
        ({"LOCAL_WORLD_SIZE": "2"}, 2, PASSIVE),  # 2 × 2 default threads on 2 cores
        ({"OMP_NUM_THREADS": "4"}, 2, PASSIVE),  # more threads than cores
        ({"OMP_NUM_THREADS": "8", "LOCAL_WORLD_SIZE": "8"}, 64, SPIN),
        ({"OMP_NUM_THREADS": "not a number"}, 2, SPIN),  # torch's default then: the cores
        ({"OMP_WAIT_POLICY": "ACTIVE", "LOCAL_WORLD_SIZE": "4"}, 2, {}),  # the user's choice
        ({"GOMP_SPINCOUNT": "0"}, 2, {}),
        ({"KMP_BLOCKTIME": "200"}, 2, {}),
    ],
)
def test_wait_settings(environ, cpus, expected):
    assert wait_settings(environ, cpus) == expected


def test_a_child_chooses_again_instead_of_taking_its_parents_choice_as_the_users(monkeypatch):
    monkeypatch.setattr("kltrain.training.openmp._usable_cpus", lambda: 2)
    parent: dict[str, str] = {"PATH": "/bin"}
    assert choose_wait(parent) == SPIN
    assert parent == {"PATH": "/bin", **SPIN, MARKER: "GOMP_SPINCOUNT"}
    child = {**parent, "LOCAL_WORLD_SIZE": "2"}  # what the launcher's children inherit
    assert choose_wait(child) == PASSIVE
    assert child == {"PATH": "/bin", "LOCAL_WORLD_SIZE": "2", **PASSIVE, MARKER: "OMP_WAIT_POLICY"}


def test_a_user_setting_is_kept_and_not_marked(monkeypatch):
    monkeypatch.setattr("kltrain.training.openmp._usable_cpus", lambda: 2)
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert choose_wait(environ) == {}
    assert environ == {"OMP_WAIT_POLICY": "ACTIVE"}
