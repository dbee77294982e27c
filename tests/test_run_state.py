"""The run state is complete: every stateful object the trainer builds is restored by a checkpoint.

- f-DPG's λ-fit window and refit-failure count travel in its ``state_dict`` (a refit after a
  resume sees the batches the uninterrupted run saw; ``fdpg/refit_failures`` keeps counting);
- tensors inside a state are stored beside ``state.json`` and read back with
  ``weights_only=True``;
- generic: a trainer resumed from step N's checkpoint equals, attribute by attribute (recursively,
  tensors by value), the trainer that ran to step N and wrote it. A future stateful attribute
  that the checkpoint leaves out fails this test without the test being edited.
"""

from __future__ import annotations

import copy
import math
import random
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch

from kltrain.config import config_from_dict
from kltrain.training import checkpoint
from kltrain.training.trainer import Trainer
from tests.helpers.tiny import loop_config_raw
from tests.helpers.toy_sequences import sample
from tests.test_fdpg import _tables, make_fdpg, rollout_for


def _fdpg_steps(algo, ref, table, seeds) -> list[dict]:
    """One ``prepare`` per seed on 8 samples from ``table`` (4 per prompt, one prompt)."""
    out = []
    for seed in seeds:
        tokens, mask = sample(table, 8, torch.Generator().manual_seed(seed))
        rollout, rewards = rollout_for(algo, table, ref, tokens, mask, "moments", 4)
        out.append(algo.prepare(rollout, rewards, None).metrics)
    return out


def _resumed(algo, **settings):
    """A fresh algorithm of the same config with ``algo``'s state, through a real checkpoint
    file pair (state.json + the tensor file) as the trainer writes them."""
    fresh = make_fdpg("js", target="moments", **settings)
    plain, tensors = checkpoint.split_tensors(algo.state_dict())
    fresh.load_state_dict(checkpoint.join_tensors(copy.deepcopy(plain), tensors, Path("-")))
    return fresh


def test_fdpg_refit_failures_keep_counting_after_a_resume():
    """Unreachable moments with refits on: every step's fit fails and is counted. The resumed
    algorithm logs 4 at the next step, as the uninterrupted one does (not 1)."""
    settings = {"moments": [0.999, 0.5], "refit_every": 1}
    ref, _ = _tables()
    algo = make_fdpg("js", target="moments", **settings)
    _fdpg_steps(algo, ref, ref, seeds=[1, 2, 3])
    fresh = _resumed(algo, **settings)
    (going,) = _fdpg_steps(algo, ref, ref, seeds=[4])
    (resumed,) = _fdpg_steps(fresh, ref, ref, seeds=[4])
    assert going["fdpg/refit_failures"] == 4
    assert resumed["fdpg/refit_failures"] == going["fdpg/refit_failures"]


def test_fdpg_refit_after_a_resume_sees_the_whole_window():
    """refit_every 2 over a window of 3 batches: the refit at step 4 uses steps 2-4 in both the
    uninterrupted and the resumed algorithm, so λ, Z and every metric are equal bit for bit."""
    settings = {"moments": [0.3, 0.5], "refit_every": 2, "refit_window": 3}
    ref, theta = _tables()
    algo = make_fdpg("js", target="moments", **settings)
    _fdpg_steps(algo, ref, theta, seeds=[1, 2, 3])
    fresh = _resumed(algo, **settings)
    assert len(fresh.fit_buffer) == 3
    going = _fdpg_steps(algo, ref, theta, seeds=[4, 5])
    resumed = _fdpg_steps(fresh, ref, theta, seeds=[4, 5])
    assert resumed == going
    assert torch.equal(fresh.lambdas, algo.lambdas)
    # the refit really depends on the window: refitting on step 4's batch alone differs
    alone = make_fdpg("js", target="moments", **settings)
    alone.load_state_dict({**algo.state_dict(), "fit_buffer": []})
    assert _fdpg_steps(alone, ref, theta, seeds=[4])[0] != going[0]


def test_state_tensors_round_trip_exactly_and_load_weights_only(tmp_path):
    """Tensors of any dtype inside a state come back bit for bit; the file is a plain tensor
    file (read with weights_only=True); a reference to a missing tensor names it."""
    state = {
        "algorithm": {
            "fit_buffer": [
                {"phi": torch.tensor([[0.1, -1e-300]], dtype=torch.float64)},
                {"keys": torch.tensor([3, 7])},
            ],
            "steps": 2,
        },
        "coef": {"value": 0.1},
    }
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    path = checkpoint.save(
        tmp_path, step=2, model=_Saveable(model), optimizer=opt, scheduler=sched,
        states=state, keep_last=1,
    )  # fmt: skip
    loaded = checkpoint.load_state(path)
    assert loaded["step"] == 2 and loaded["coef"] == {"value": 0.1}
    got = loaded["algorithm"]["fit_buffer"]
    assert torch.equal(got[0]["phi"], state["algorithm"]["fit_buffer"][0]["phi"])
    assert got[0]["phi"].dtype == torch.float64 and got[1]["keys"].dtype == torch.int64
    assert torch.equal(got[1]["keys"], torch.tensor([3, 7]))
    assert set(checkpoint.load_tensors(path / checkpoint.STATE_TENSORS)) == {
        "algorithm.fit_buffer.0.phi",
        "algorithm.fit_buffer.1.keys",
    }
    checkpoint.save(
        tmp_path, step=3, model=_Saveable(model), optimizer=opt, scheduler=sched,
        states={"x": {checkpoint.TENSOR_REF: "gone"}}, keep_last=1,
    )  # fmt: skip
    with pytest.raises(checkpoint.CheckpointError, match=r"refers to tensor 'gone'"):
        checkpoint.load_state(tmp_path / "step-00000003")


class _Saveable(torch.nn.Module):
    """A module with ``save_pretrained`` (what checkpoint.save calls on the policy)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def save_pretrained(self, folder, safe_serialization=True):
        from safetensors.torch import save_model

        Path(folder).mkdir(parents=True)
        save_model(self.inner, str(Path(folder) / "model.safetensors"))


# ----------------------------------------------------------------------------------------------
# Generic: every stateful attribute of the trainer is in the checkpoint

#: Trainer attributes that are not run state, each with the reason. Everything else is compared.
NOT_STATE = {
    "accelerator": "process/device handle, rebuilt from the environment",
    "logger": "file handles; its files are cut back to the checkpoint on resume (test_resume)",
    "watcher": "signal handler registration of this process",
    "resumed_from": "where this process resumed from (None in the run that wrote it)",
    "_before_step": "a capture taken at the start of the last step, for abandoning it",
    "dataset": "read-only prompts, loaded from the config",
    "params": "the same parameter objects as models/optimizer, compared there",
}

#: Attributes of any object, matched by name at any depth: handles and callables, not state.
NOT_STATE_ANYWHERE = {
    "tokenizer": "read-only, loaded from the model folder",
    "global_mean": "a bound method of the trainer (setup), not a value",
    "_policy": "the trainer's policy object itself (compared as models.policy)",
}


def _assert_same_state(a, b, path: str, seen: set[int]) -> None:
    """Recursive equality of two object graphs; tensors, modules, optimizers, schedulers and
    generators by their state, other objects by their ``__dict__``."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if id(a) in seen:
        return
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path}: tensors differ"
    elif isinstance(a, torch.nn.Module):
        seen.add(id(a))
        _assert_same_state(a.state_dict(), b.state_dict(), f"{path}.state_dict()", seen)
        assert a.training == b.training, f"{path}.training"
    elif isinstance(a, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)):
        state_a, state_b = a.state_dict(), b.state_dict()
        state_a.pop("lr_lambdas", None), state_b.pop("lr_lambdas", None)  # functions
        _assert_same_state(state_a, state_b, f"{path}.state_dict()", seen)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), f"{path}: arrays differ"
    elif isinstance(a, torch.Generator):
        assert torch.equal(a.get_state(), b.get_state()), f"{path}: generator state"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} vs {list(b)}"
        for key in a:
            _assert_same_state(a[key], b[key], f"{path}[{key!r}]", seen)
    elif isinstance(a, (list, tuple, deque)):
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        if isinstance(a, deque):
            assert a.maxlen == b.maxlen, f"{path}.maxlen"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{path}[{i}]", seen)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    elif callable(a) and not hasattr(a, "__dict__"):
        assert getattr(a, "__qualname__", a) == getattr(b, "__qualname__", b), path
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        seen.add(id(a))
        fields = {k: v for k, v in vars(a).items() if k not in NOT_STATE_ANYWHERE}
        other = {k: v for k, v in vars(b).items() if k not in NOT_STATE_ANYWHERE}
        _assert_same_state(fields, other, path, seen)
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def _global_rng() -> tuple:
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()


RUNS = {
    "rloo_adaptive_whiten": {
        "kl": {"adaptive": {"target": 0.5, "horizon": 20}},
        "reward": {
            "terms": [
                {"name": "tests.helpers.loop_rewards:letter_e_count", "transforms": ["whiten"]}
            ]
        },
    },
    "ppo": {
        "kl": {"estimator": "k1", "placement": "reward"},
        "algorithm": {"name": "ppo", "epochs": 2, "num_minibatches": 2},
    },
    "fdpg_moments_refits": {
        "kl": {"divergence": "js"},
        "reward": {
            "terms": [
                {"name": "tests.helpers.fdpg_rewards:has_letter_e"},
                {"name": "tests.helpers.fdpg_rewards:has_letter_a"},
            ]
        },
        "generation": {"min_new_tokens": 0},
        "algorithm": {
            "name": "fdpg",
            "num_generations": 4,
            "fdpg": {"target": "moments", "moments": [0.999, 0.4], "refit_every": 1},
        },
    },
    "fdpg_offline": {
        "kl": {"divergence": "forward_kl"},
        "reward": {"terms": [{"name": "tests.helpers.fdpg_rewards:has_letter_e"}]},
        "generation": {"min_new_tokens": 0},
        "algorithm": {
            "name": "fdpg",
            "num_generations": 4,
            "fdpg": {"target": "constraint", "proposal": "offline"},
        },
    },
}


@pytest.mark.parametrize("run", list(RUNS))
def test_every_stateful_attribute_is_in_the_checkpoint(tiny_model, tmp_path, run):
    """Run 3 steps and save; resume a fresh trainer from that checkpoint (the global RNGs are
    equal); both take step 4 (so lazily rebuilt caches, such as the sampler's epoch order, are
    filled in both); the two trainers' object graphs (everything but NOT_STATE) are equal."""
    raw = loop_config_raw(tiny_model, tmp_path / "run", **copy.deepcopy(RUNS[run]))
    raw["trainer"].update({"max_steps": 3, "save_every": 3, "learning_rate": 1e-2})
    if raw["algorithm"]["name"] == "fdpg":
        del raw["kl"]["coef"]  # β of the rlhf target only
    cfg = config_from_dict(raw)
    going = Trainer(cfg)
    going.fit()
    rng, record = _global_rng(), checkpoint.capture_rng()
    resumed = Trainer(cfg, resume="auto")
    assert resumed.state.step == going.state.step == 3
    _assert_same_state(_global_rng(), rng, "global RNG", set())
    for trainer in (going, resumed):
        checkpoint.restore_rng(record)  # the same global RNGs for both steps
        trainer.train_step()
    skip = set(NOT_STATE)
    fields_a = {k: v for k, v in vars(going).items() if k not in skip}
    fields_b = {k: v for k, v in vars(resumed).items() if k not in skip}
    _assert_same_state(fields_a, fields_b, "trainer", set())
