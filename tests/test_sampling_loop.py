"""The loop samples from the distribution it differentiates (issue 12): dropout off in every
forward by default, the tempered policy trained at temperature T ≠ 1, truncating samplers
refused for the RL algorithms, and the importance ratio's metrics and label."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from kltrain.config import ConfigError, ModelConfig, config_from_dict
from kltrain.models.loading import load_models
from kltrain.training.trainer import Trainer
from tests.helpers.tiny import loop_config_raw, make_tiny_model_dir

#: fp32 roundoff allowance for two forwards of identical weights on identical inputs that may
#: take different kernel paths: 2^-24 per operation × 64 (a generous count of accumulated
#: roundings in log_softmax and the sums over ≤ 12 tokens).
FP32_SLACK = 2.0**-24 * 64


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory):
    """The tiny Llama with attention dropout 0.5 (the HF attention reads it at forward time)."""
    path = make_tiny_model_dir(tmp_path_factory.mktemp("tiny_dropout") / "model")
    config = json.loads((path / "config.json").read_text())
    config["attention_dropout"] = 0.5
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def _cfg(model_path, out, **sections):
    return config_from_dict(loop_config_raw(model_path, out, **sections))


def _two_forwards(models, ids):
    with torch.no_grad():
        return models.policy(ids).logits, models.policy(ids).logits


def test_dropout_off_by_default_in_train_mode(dropout_model):
    ids = torch.tensor([[5, 9, 13, 21, 34]])
    models = load_models(ModelConfig(policy=dropout_model))
    assert models.policy.training  # train mode kept (gradient checkpointing needs it)
    a, b = _two_forwards(models, ids)
    assert torch.equal(a, b)
    kept = load_models(ModelConfig(policy=dropout_model, dropout=True))
    a, b = _two_forwards(kept, ids)
    assert not torch.allclose(a, b)  # the model does have dropout: the check can fail


def test_step_one_with_dropout_model_is_on_policy(dropout_model, tmp_path):
    """Policy = reference at step 1: the divergence to the reference is 0 and no token is
    clipped or off-policy. With dropout active (the old default) neither holds."""
    algo = {"name": "grpo", "epochs": 1, "num_minibatches": 1}
    result = Trainer(
        _cfg(dropout_model, tmp_path / "run", algorithm=algo, trainer={"max_steps": 1})
    ).train_step()
    m = result.metrics
    for name in ("reverse_kl", "forward_kl", "js"):
        assert abs(m[f"divergence/{name}"]) <= FP32_SLACK, (name, m[f"divergence/{name}"])
    assert m["train/clip_fraction"] == 0.0
    assert abs(m["train/importance_ratio_max"] - 1.0) <= FP32_SLACK
    assert abs(m["train/importance_ratio_mean"] - 1.0) <= FP32_SLACK
    kept = Trainer(
        _cfg(
            dropout_model,
            tmp_path / "kept",
            algorithm=algo,
            model={"dropout": True},
            trainer={"max_steps": 1},
        )
    ).train_step()
    # The logged divergences come from the sampling pass (eval mode: no dropout) since the
    # policy's hidden states are recorded while it generates; the training forward keeps
    # dropout, so the update sees a ratio ≠ 1 at step 1 although nothing has changed yet.
    assert kept.metrics["train/importance_ratio_max"] > 1.01


def test_temperature_trains_the_tempered_policy(tmp_path):
    """At T ≠ 1 the rollout's log-probs and divergences are those of logits/T for policy and
    reference (the distribution generate samples), checked against a plain forward."""
    model = str(make_tiny_model_dir(tmp_path / "model"))
    t = 0.7
    cfg = _cfg(model, tmp_path / "run", generation={"temperature": t, "max_new_tokens": 4})
    trainer = Trainer(cfg)
    with torch.no_grad():  # move the policy off the reference so the divergence is not 0
        for p in trainer.models.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rollout = trainer.make_rollout()
    mask, p_len = rollout.completion_mask, rollout.prompt_length
    pos = (rollout.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def tempered_logprobs(m):
        with torch.no_grad():
            logits = m(rollout.input_ids, attention_mask=rollout.attention_mask,
                       position_ids=pos).logits[:, p_len - 1 : -1].double()  # fmt: skip
        return torch.log_softmax(logits / t, -1)

    lp = tempered_logprobs(trainer.models.policy)
    lq = tempered_logprobs(trainer.models.reference)
    ids = rollout.completion_ids.unsqueeze(-1)
    want_lp = lp.gather(-1, ids).squeeze(-1)[mask]
    want_kl = (lp.exp() * (lp - lq)).sum(-1)[mask]
    got_lp = rollout.stats["logprobs"][mask].double()
    got_kl = rollout.stats["reverse_kl"][mask].double()
    # fp32 log-probs of magnitude ≤ ~10 over a 400-token vocabulary: 2^-24 × 10 × 64
    torch.testing.assert_close(got_lp, want_lp, rtol=0, atol=2.0**-24 * 640)
    torch.testing.assert_close(got_kl, want_kl, rtol=1e-4, atol=2.0**-24 * 640)
    untempered = torch.log_softmax(lp * t, -1).gather(-1, ids).squeeze(-1)[mask]
    assert (got_lp - untempered).abs().max() > 1e-3  # T changes them: the check can fail


@pytest.mark.parametrize("algorithm", ["rloo", "grpo", "ppo"])
@pytest.mark.parametrize(("key", "value"), [("top_k", 50), ("top_p", 0.9), ("min_new_tokens", 1)])
def test_truncating_samplers_are_refused_for_rl(algorithm, key, value):
    raw = {"algorithm": {"name": algorithm}, "generation": {key: value}}
    if algorithm == "ppo":
        raw["kl"] = {"estimator": "k1", "placement": "reward"}
    with pytest.raises(ConfigError, match=rf"generation\.{key}={value}.*{algorithm}.*untruncated"):
        config_from_dict(raw)
    ok = config_from_dict({**raw, "generation": {"temperature": 0.7}})  # tempered is fine
    assert ok.generation.temperature == 0.7


def test_lora_dropout_needs_model_dropout():
    raw = {"model": {"lora": {"dropout": 0.1}}}
    with pytest.raises(ConfigError, match=r"model\.lora\.dropout=0\.1.*model\.dropout"):
        config_from_dict(raw)
    config_from_dict({"model": {"lora": {"dropout": 0.1}, "dropout": True}})


def test_off_policy_run_weights_k3_and_logs_the_ratio(tmp_path):
    model = str(make_tiny_model_dir(tmp_path / "model"))
    out = tmp_path / "run"
    cfg = _cfg(
        model,
        out,
        kl={"estimator": "k3", "placement": "loss"},
        algorithm={"name": "grpo", "epochs": 2, "num_minibatches": 2},
    )
    trainer = Trainer(cfg)
    assert trainer.regulariser.importance_ratio == "on"
    trainer.fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["train/importance_ratio_max"] >= row["train/importance_ratio_mean"] > 0
        assert row["train/importance_ratio_max"] > 1.0  # later minibatches are off-policy
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["gradient_followed"] == "local reverse_kl"
    assert written["kl"]["importance_ratio"] == "auto"


def test_model_generation_defaults_do_not_change_the_sampler(tmp_path):
    """A model whose generation_config.json turns on a repetition penalty, an n-gram ban or a
    suppressed token would otherwise sample from another distribution than the one trained."""
    from kltrain.rollout import NEUTRAL_SAMPLING, sampling_kwargs

    models = load_models(ModelConfig(policy=str(make_tiny_model_dir(tmp_path / "model"))))
    gen = models.policy.generation_config
    gen.repetition_penalty, gen.no_repeat_ngram_size, gen.suppress_tokens = 1.7, 2, [5]
    gen.top_k, gen.typical_p = 20, 0.5
    kwargs = sampling_kwargs(
        max_new_tokens=4, min_new_tokens=0, temperature=1.0, top_k=0, top_p=1.0
    )
    resolved, _ = models.policy._prepare_generation_config(None, **kwargs)
    for key, neutral in {**NEUTRAL_SAMPLING, "top_k": None}.items():
        assert getattr(resolved, key) == neutral, key
    plain, _ = models.policy._prepare_generation_config(None, do_sample=True)
    assert plain.repetition_penalty == 1.7  # without them the file's values would apply
