"""The loop on tiny random models: every algorithm × placement × divergence runs and writes the
run-folder contract; micro-batching does not change the update; the reference never changes;
failures keep what was written."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from kltrain.config import config_from_dict
from kltrain.rewards import InvalidRewardError
from kltrain.training.trainer import Trainer
from tests.conftest import (
    TINY_NEW_TOKENS,
    TINY_STEP_ONE_TOL,
    U32,
    fp32_tol,
    read_jsonl,
    read_metrics,
    reduction_order_tol,
)
from tests.helpers.invariance import assert_same_update, float64_sgd_trainer
from tests.helpers.tiny import loop_config_raw


def tiny_config(model_path: str, out, **sections):
    return config_from_dict(loop_config_raw(model_path, out, **sections))


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "js"])
@pytest.mark.parametrize("placement", ["loss", "reward"])
@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_two_steps_write_the_run_folder(tiny_model, tmp_path, algorithm, placement, divergence):
    out = tmp_path / "run"
    cfg = tiny_config(
        tiny_model,
        out,
        kl={"divergence": divergence, "placement": placement},
        algorithm={"name": algorithm},
    )
    summary = Trainer(cfg).fit()
    assert summary["steps"] == 2
    assert rows_after_step_2_moved(out)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for name in ("reverse_kl", "forward_kl", "js"):
        assert abs(rows[0][f"divergence/{name}"]) <= TINY_STEP_ONE_TOL  # policy = reference
    for row in rows:
        # the trained regulariser is the exact per-token divergence the loop also measures, on
        # the same samples: the same ≤ 2·6 token sums per sequence, mean of 4
        want = row[f"divergence/{divergence}"]
        assert row[f"train/{divergence}/exact"] == pytest.approx(want, rel=fp32_tol(12), abs=0)
        assert row["train/coef"] == 0.1  # fixed β
        assert (row["train/applied"], row["train/skipped"]) == (1.0, 0.0)
        assert math.isfinite(row["train/loss"]) and 0 < row["train/grad_norm"] < math.inf
    samples = read_jsonl(out / "samples.jsonl")
    assert {s["step"] for s in samples} == {1, 2}
    assert len(samples) == 2 * 2 * 2  # steps × prompts × samples per prompt
    written = (out / "config.yaml").read_text()
    assert "gradient_followed" in written and "transformers" in written
    assert (out / "final" / "model.safetensors").is_file()
    assert any((out / "checkpoints").iterdir())


@pytest.mark.parametrize("divergence", ["reverse_kl", "js"])
def test_compiled_cpu_lm_head_ops_train_the_measured_divergence(
    tiny_model, tmp_path, monkeypatch, divergence
):
    """The compiled CPU ops (``kltrain fit`` uses them from 512 tokens a call; the tiny steps
    are smaller, so forced on here) compute the trained exact divergence, which must equal the
    one the loop measures with torch ops, at the test above's bound."""
    from kltrain.divergence.kernels import cpu

    monkeypatch.setenv(cpu.ENV_SWITCH, "1")
    calls = []
    stats = cpu.CompiledChunkOps.stats

    def spy(self, *args):
        calls.append(args[-1])
        return stats(self, *args)

    monkeypatch.setattr(cpu.CompiledChunkOps, "stats", spy)
    test_two_steps_write_the_run_folder(tiny_model, tmp_path, "grpo", "loss", divergence)
    assert calls and {d.name for d in calls} == {divergence}


def rows_after_step_2_moved(out) -> bool:
    """The policy moved after step 1, so step 2's divergences are positive (above roundoff)."""
    last = read_metrics(out)[-1]
    names = ("reverse_kl", "forward_kl", "js")
    return all(last[f"divergence/{n}"] > TINY_STEP_ONE_TOL for n in names)


def test_step_one_is_on_policy_and_divergence_starts_at_zero(tiny_model, tmp_path):
    """Before any update the policy equals the reference: every divergence is 0 up to the
    roundoff of two forward passes; the first pass is on-policy, its ratio exactly 1."""
    cfg = tiny_config(tiny_model, tmp_path / "run", trainer={"max_steps": 1})
    trainer = Trainer(cfg)
    result = trainer.train_step()
    for name in ("reverse_kl", "forward_kl", "js"):
        assert abs(result.metrics[f"divergence/{name}"]) <= TINY_STEP_ONE_TOL
    # approx_kl_old per token is (r − 1) − log r ≈ ½δ² for the log ratio δ (the roundoff between
    # the rollout's and the update's forward passes, per token at most the per-sequence bound
    # over the tokens), plus the fp32 rounding of r = e^δ and of the subtraction (≤ 2u)
    delta = TINY_STEP_ONE_TOL / TINY_NEW_TOKENS
    assert 0 <= result.metrics["train/approx_kl_old"] <= delta**2 / 2 + 2 * U32


def test_reference_weights_are_bit_identical_after_training(tiny_model, tmp_path):
    cfg = tiny_config(tiny_model, tmp_path / "run", trainer={"max_steps": 3, "learning_rate": 1e-2})
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.models.reference.state_dict().items()}
    policy_before = {k: v.clone() for k, v in trainer.models.policy.state_dict().items()}
    trainer.fit()
    after = trainer.models.reference.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(
        torch.equal(policy_before[k], v) for k, v in trainer.models.policy.state_dict().items()
    )
    assert not any(p.requires_grad for p in trainer.models.reference.parameters())
    assert not trainer.models.reference.training
    on_disk = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    k = next(iter(on_disk))
    assert torch.equal(on_disk[k], trainer.models.policy.state_dict()[k].cpu())


@pytest.mark.parametrize("placement", ["loss", "reward"])
def test_gradient_accumulation_invariance(tiny_model, tmp_path, placement):
    """Micro-batches of 1 with accumulation give the same update as one batch of 4 (compared in
    float64, where only the order of the sums differs)."""
    trainers = []
    for micro in (1, 4):
        cfg = tiny_config(
            tiny_model,
            tmp_path / f"run{micro}",
            trainer={"micro_batch_size": micro, "max_grad_norm": None},
            kl={"placement": placement},
        )
        trainers.append(float64_sgd_trainer(cfg))
    start = {k: v.detach().clone() for k, v in trainers[0].models.policy.named_parameters()}
    first = trainers[0]
    rollout = first.make_rollout()
    rewards, _ = first.score(rollout, step=1)
    penalty = first.regulariser.reward_penalty(rollout.stats) * first.coef.value
    batch = first.algorithm.prepare(rollout, rewards, penalty if placement == "reward" else None)
    assert rollout.num_sequences == 4
    metrics = [t.optimise(batch, step=1) for t in trainers]
    # on-policy the loss is Σ_t (−A_t + β·d_t [loss placement]) / N ≈ 0: bound the difference
    # of two summation orders by its terms' absolute sum (the advantages are fp32)
    mask = rollout.completion_mask
    beta = first.coef.value if placement == "loss" else 0.0
    terms = batch.advantages.abs() + beta * rollout.stats["reverse_kl"].abs()
    n = int(mask.sum())
    tol = reduction_order_tol(n, float((terms * mask).sum()) / n)
    assert abs(metrics[0]["train/loss"] - metrics[1]["train/loss"]) <= tol
    p1 = dict(trainers[0].models.policy.named_parameters())
    p4 = dict(trainers[1].models.policy.named_parameters())
    assert assert_same_update(start, p1, p4) > 1e-4  # the update is not trivially zero


def test_failing_reward_keeps_what_was_written(tiny_model, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(
        tiny_model,
        out,
        trainer={"max_steps": 3},
        reward={"terms": [{"name": "tests.helpers.loop_rewards:fail_after_first_call"}]},
    )
    trainer = Trainer(cfg)
    with pytest.raises(InvalidRewardError) as err:
        trainer.fit()
    assert "step 2" in str(err.value)
    assert "tests.helpers.loop_rewards:fail_after_first_call" in str(err.value)
    assert "RuntimeError: reward service went away" in str(err.value)
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert (out / "config.yaml").is_file()


def test_lora_run_saves_an_adapter_and_uses_the_base_as_reference(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cfg = tiny_config(
        tiny_model,
        out,
        model={"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        trainer={"learning_rate": 1e-2},
    )
    trainer = Trainer(cfg)
    assert trainer.models.reference is None  # no second copy
    base_before = {
        k: v.clone() for k, v in trainer.models.policy.named_parameters() if "lora_" not in k
    }
    trainer.fit()
    # only adapter weights trained; the base (= the reference) is untouched
    for k, v in trainer.models.policy.named_parameters():
        if "lora_" not in k:
            assert torch.equal(base_before[k], v), k
    rows = read_metrics(out)
    # the adapter moved the policy off the base by more than roundoff
    assert rows[-1]["divergence/reverse_kl"] > TINY_STEP_ONE_TOL
    assert (out / "final" / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert isinstance(PeftModel.from_pretrained(base, out / "final"), PeftModel)


def test_bf16_policy_and_gradient_checkpointing_run(tiny_model, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(
        tiny_model,
        out,
        model={"dtype": "bf16", "reference_dtype": "fp32", "gradient_checkpointing": True},
    )
    trainer = Trainer(cfg)
    assert next(trainer.models.policy.parameters()).dtype == torch.bfloat16
    assert next(trainer.models.reference.parameters()).dtype == torch.float32
    trainer.fit()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["train/loss"]) for r in rows)
