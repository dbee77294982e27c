"""The loop on tiny random models: every algorithm × placement × divergence runs and writes the
run-folder contract; micro-batching does not change the update; the reference never changes;
failures keep what was written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kltrain.config import config_from_dict
from kltrain.training.trainer import Trainer
from tests.helpers.tiny import loop_config_raw, make_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model"))


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
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for name in ("reverse_kl", "forward_kl", "js"):
            assert row[f"divergence/{name}"] >= -1e-5  # fp32 rounding around 0 at step 1
        assert f"train/{divergence}/exact" in row
        assert torch.isfinite(torch.tensor(row["train/loss"]))
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2}
    assert len(samples) == 2 * 2 * 2  # steps × prompts × samples per prompt
    written = (out / "config.yaml").read_text()
    assert "gradient_followed" in written and "transformers" in written
    assert (out / "final" / "model.safetensors").is_file()
    assert any((out / "checkpoints").iterdir())


def rows_after_step_2_moved(out) -> bool:
    """The policy moved after step 1, so step 2's divergences are positive."""
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return all(last[f"divergence/{n}"] > 1e-7 for n in ("reverse_kl", "forward_kl", "js"))


def test_step_one_is_on_policy_and_divergence_starts_at_zero(tiny_model, tmp_path):
    """Before any update the policy equals the reference: every divergence is 0 (to fp32)."""
    cfg = tiny_config(tiny_model, tmp_path / "run", trainer={"max_steps": 1})
    trainer = Trainer(cfg)
    result = trainer.train_step()
    for name in ("reverse_kl", "forward_kl", "js"):
        assert abs(result.metrics[f"divergence/{name}"]) < 1e-5
    assert result.metrics["train/approx_kl_old"] < 1e-6  # ratio is 1 on the first pass


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
    """Micro-batches of 1 with accumulation give the same update as one batch of 4."""
    trainers = []
    for micro in (1, 4):
        cfg = tiny_config(
            tiny_model,
            tmp_path / f"run{micro}",
            trainer={"micro_batch_size": micro, "max_grad_norm": None},
            kl={"placement": placement},
        )
        trainer = Trainer(cfg)
        # plain SGD: the parameter change is the gradient itself (Adam's first step is ≈ sign(g),
        # which would hide small gradient differences and magnify roundoff near zero)
        trainer.optimizer = torch.optim.SGD(trainer.params, lr=1.0)
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda _: 1.0)
        trainers.append(trainer)
    start = {k: v.detach().clone() for k, v in trainers[0].models.policy.named_parameters()}
    first = trainers[0]
    rollout = first.make_rollout()
    rewards, _ = first.score(rollout, step=1)
    penalty = first.regulariser.reward_penalty(rollout.stats) * first.coef.value
    batch = first.algorithm.prepare(rollout, rewards, penalty if placement == "reward" else None)
    assert rollout.num_sequences == 4
    metrics = [t.optimise(batch, step=1) for t in trainers]
    # on-policy, the surrogate's value is Σ A / N ≈ 0 (roundoff): compare it absolutely
    assert metrics[0]["train/loss"] == pytest.approx(metrics[1]["train/loss"], abs=1e-6)
    p1 = dict(trainers[0].models.policy.named_parameters())
    p4 = dict(trainers[1].models.policy.named_parameters())
    moved = 0.0
    for name, value in p1.items():
        delta1, delta4 = value - start[name], p4[name] - start[name]
        torch.testing.assert_close(delta1, delta4, rtol=1e-4, atol=1e-7)
        moved = max(moved, float(delta1.detach().abs().max()))
    assert moved > 1e-4  # the update is not trivially zero


def test_failing_reward_keeps_what_was_written(tiny_model, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(
        tiny_model,
        out,
        trainer={"max_steps": 3},
        reward={"terms": [{"name": "tests.helpers.loop_rewards:fail_after_first_call"}]},
    )
    trainer = Trainer(cfg)
    with pytest.raises(Exception) as err:
        trainer.fit()
    assert "step 2" in str(err.value)
    assert "tests.helpers.loop_rewards:fail_after_first_call" in str(err.value)
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1]
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
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["divergence/reverse_kl"] > 0  # the adapter moved the policy off the base
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
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows)
