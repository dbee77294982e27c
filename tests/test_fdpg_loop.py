"""f-DPG through the real loop on tiny random models: each target runs 2 steps and writes the
run-folder contract with finite f-DPG diagnostics; the loop adds no β·D(π‖π_ref)."""

from __future__ import annotations

import math

import pytest
import torch

from kltrain.config import config_from_dict
from kltrain.training.trainer import Trainer
from tests.conftest import fp64_tol, read_metrics

TARGETS = {
    "rlhf": ({"target": "rlhf"}, [{"name": "tests.helpers.loop_rewards:letter_e_count"}], "js"),
    "constraint": (
        {"target": "constraint"},
        [{"name": "tests.helpers.fdpg_rewards:has_letter_e"}],
        "forward_kl",
    ),
    "softened": (
        {"target": "constraint", "epsilon": 0.01},
        [{"name": "tests.helpers.fdpg_rewards:has_letter_e"}],
        "reverse_kl",
    ),
    "moments": (
        {"target": "moments", "moments": [0.5, 0.4], "lambdas": [0.3, -0.2], "refit_every": 1},
        [
            {"name": "tests.helpers.fdpg_rewards:has_letter_e"},
            {"name": "tests.helpers.fdpg_rewards:has_letter_a"},
        ],
        "js",
    ),
}


def fdpg_config(model, out, target: str):
    fdpg, terms, divergence = TARGETS[target]
    kl = {"divergence": divergence, **({"coef": 0.5} if target == "rlhf" else {})}
    raw = {
        "name": "tiny",
        "model": {"policy": model},
        "data": {"chat_template": "off", "max_prompt_tokens": 16},
        "generation": {"max_new_tokens": 6, "min_new_tokens": 0},
        "reward": {"terms": terms},
        "kl": kl,
        "algorithm": {"name": "fdpg", "num_generations": 4, "fdpg": fdpg},
        "trainer": {
            "max_steps": 2,
            "prompts_per_step": 2,
            "micro_batch_size": 8,
            "learning_rate": 1e-3,
            "output_dir": str(out),
            "log_samples_every": 1,
        },
        "tracking": {"wandb": {"mode": "disabled"}, "progress": False},
    }
    return config_from_dict(raw)


@pytest.mark.parametrize("target", list(TARGETS))
def test_two_fdpg_steps_write_the_run_folder(tiny_model, tmp_path, target):
    out = tmp_path / "run"
    trainer = Trainer(fdpg_config(tiny_model, out, target))
    summary = trainer.fit()
    assert summary["steps"] == 2
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("fdpg/log_z", "fdpg/ess", "fdpg/log_z_stderr", "diversity/distinct_2"):
            assert math.isfinite(row[key]), (key, row[key])
        for name in trainer.algorithm.diagnosed:
            assert math.isfinite(row[f"fdpg/target_divergence/{name}"])
            # each control-variate term is ≥ 0; its float64 value can only dip below 0 where
            # it cancels to ≈ 0 (u near 1), its ≤ 4 parts then each ≤ 1 in magnitude
            assert row[f"fdpg/target_divergence/{name}"] >= -fp64_tol(4, cond=4.0)
        assert 0 < row["fdpg/ess"] <= 1
        assert math.isfinite(row["train/loss"])
        assert "divergence/reverse_kl" in row and "completion/entropy_per_token" in row
        # no regulariser is trained under f-DPG, so none is reported as trained
        assert "train/coef" not in row and not any(k.endswith("/exact") for k in row)
    if target == "moments":
        assert {"fdpg/lambda/tests.helpers.fdpg_rewards:has_letter_e"} <= set(rows[-1])
    # the run's state carries the per-prompt Z estimates
    state = trainer.algorithm.state_dict()
    assert state["log_z"]["entries"] and state["steps"] == 2
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "samples.jsonl").is_file()
    assert f"sequence {trainer.cfg.kl.divergence} to target" in (out / "config.yaml").read_text()


def perturbed_trainer(model, out, target: str, coef: float) -> Trainer:
    """A trainer whose policy is moved off the reference by a fixed perturbation (so that
    D(π‖π_ref) is far from 0) and whose loop β (the value ``kl.coef`` sets) is ``coef``."""
    trainer = Trainer(fdpg_config(model, out, target))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainer.models.policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    trainer.coef.value = coef
    return trainer


@pytest.mark.parametrize("target", ["constraint", "rlhf"])
def test_fdpg_loss_has_no_regulariser_term(tiny_model, tmp_path, target):
    """The loop adds no β·D(π‖π_ref) under f-DPG: on one rollout, with the policy well away
    from the reference, a loop β of 0.1 and of 10 give the same loss and the same update, bit
    for bit. (For rlhf the target's β comes from the config, the same in both.)"""
    trainers = [perturbed_trainer(tiny_model, tmp_path / f"r{c}", target, c) for c in (0.1, 10.0)]
    rollout = trainers[0].make_rollout()
    rewards, _ = trainers[0].score(rollout, step=1)
    assert float(rollout.stats["reverse_kl"][rollout.completion_mask].mean()) > 1e-3
    batch = trainers[0].algorithm.prepare(rollout, rewards, None)
    metrics = [t.optimise(batch, step=1) for t in trainers]
    assert metrics[0]["train/loss"] == metrics[1]["train/loss"]
    a, b = (dict(t.models.policy.named_parameters()) for t in trainers)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# Offline proposal through the loop


def offline_config(model, out, max_steps=3):
    cfg = fdpg_config(model, out, "rlhf")
    cfg.algorithm.fdpg.proposal = "offline"
    cfg.trainer.max_steps = max_steps
    cfg.trainer.learning_rate = 1e-2
    return cfg


def _scripted_decisions(trainer, replace_at: set[int]):
    """Make the update rule's comparison come out as scripted (step → replace q or not): the
    divergence estimates themselves are tested on the toy in test_fdpg.py."""
    algo = trainer.algorithm
    real = algo.global_mean
    calls = []

    def mean(values):
        real(values)  # every process still takes part in the reduction
        calls.append(None)
        step, first = (len(calls) + 1) // 2, len(calls) % 2 == 1
        replace = step in replace_at
        return (0.0 if replace else 1.0) if first else 0.5  # (policy's, then q's)

    algo.global_mean = mean


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_offline_proposal_generates_and_is_replaced_only_on_improvement(
    tiny_model, tmp_path, monkeypatch
):
    """Every step generates from q; q stays the starting policy while the policy moves, becomes
    the policy of step 2 (before its update) when step 2's rule fires, then stays again."""
    import kltrain.rollout as rollout_module

    out = tmp_path / "run"
    trainer = Trainer(offline_config(tiny_model, out))
    algo = trainer.algorithm
    assert algo.proposal is not None and algo.proposal is not trainer.models.policy
    assert not any(p.requires_grad for p in algo.proposal.parameters())
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in algo.proposal.parameters()}
    _scripted_decisions(trainer, replace_at={2})
    seen = []  # (model used, q's weights, the policy's weights) at each generation
    real_generate = rollout_module.generate  # what the loop's sample_rollout calls

    def spy(models, texts, **kw):
        seen.append((kw["model"], _snapshot(algo.proposal), _snapshot(models.policy)))
        return real_generate(models, texts, **kw)

    monkeypatch.setattr(rollout_module, "generate", spy)
    start = _snapshot(trainer.models.policy)
    trainer.fit()
    rows = read_metrics(out)
    assert [r["fdpg/proposal_updates"] for r in rows] == [0.0, 1.0, 1.0]
    for row in rows:
        for key in ("fdpg/proposal_divergence", "fdpg/policy_divergence", "fdpg/proposal_ess"):
            assert math.isfinite(row[key]), key
    assert all(model is algo.proposal for model, _, _ in seen) and len(seen) == 3
    (_, q1, pi1), (_, q2, pi2), (_, q3, pi3) = seen
    assert _same(q1, start) and _same(pi1, start) and _same(q2, start)  # q kept, π moved
    assert not _same(pi2, start)
    assert _same(q3, pi2) and not _same(q3, pi3)  # replaced by step 2's policy, then kept
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "checkpoints").is_dir()


def test_offline_proposal_survives_resume(tiny_model, tmp_path):
    """The checkpoint holds q (modules/proposal.safetensors) and the update count: resuming the
    finished run restores the q of step 2, not a fresh copy of the restored policy."""
    out = tmp_path / "run"
    trainer = Trainer(offline_config(tiny_model, out))
    _scripted_decisions(trainer, replace_at={2})
    trainer.fit()
    saved_q = _snapshot(trainer.algorithm.proposal)
    final_policy = _snapshot(trainer.models.policy)
    assert not _same(saved_q, final_policy)
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    assert (ckpt / "modules" / "proposal.safetensors").is_file()
    resumed = Trainer(offline_config(tiny_model, out), resume=str(out))
    assert resumed.state.step == 3
    assert _same(_snapshot(resumed.models.policy), final_policy)
    assert _same(_snapshot(resumed.algorithm.proposal), saved_q)
    assert resumed.algorithm.proposal_updates == 1
    assert not any(p.requires_grad for p in resumed.algorithm.proposal.parameters())


def test_a_proposal_with_tied_weights_round_trips_through_a_checkpoint(tmp_path):
    """A model copy with tied embeddings (as the embedded model has) is saved once per storage
    and reloaded through the tie; a plain state-dict save would refuse the shared tensors."""
    from kltrain.training import checkpoint
    from tests.helpers.tiny import tiny_tied_llama

    q = tiny_tied_llama(layers=1).requires_grad_(False)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    path = checkpoint.save(
        tmp_path / "ckpt",
        step=1,
        model=tiny_tied_llama(layers=1),
        optimizer=opt,
        scheduler=sched,
        states={},
        keep_last=1,
        modules={"proposal": q},
    )
    loaded = tiny_tied_llama(layers=1)
    checkpoint.load_modules(path, {"proposal": loaded})
    assert _same(_snapshot(loaded), _snapshot(q))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
