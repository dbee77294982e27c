"""Held-out evaluation (kltrain/evaluation.py, behind kltrain eval and trainer.eval_every):
diversity worked by hand, divergences against an independent float64 computation on a tiny
model, determinism, the held-out split training never samples, ``trainer.eval_every`` and
``kltrain eval`` on a run folder."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kltrain import evaluation as ev
from kltrain.config import ConfigError, DataConfig, config_from_dict
from kltrain.data import heldout_indices, load_prompts, split_heldout
from kltrain.models.loading import load_models
from kltrain.rewards import RewardFunction
from tests.helpers.tiny import loop_config_raw, make_tiny_model_dir

# ----------------------------------------------------------------------------------------------
# Diversity on fixed strings, worked by hand


def words(*texts):
    return [t.split() for t in texts]


def test_distinct_n_by_hand():
    samples = words("the cat sat", "the cat ran")
    # 1-grams: the cat sat the cat ran → 4 distinct of 6; 2-grams: the-cat ×2, cat-sat, cat-ran
    assert ev.distinct_n(samples, 1) == 4 / 6
    assert ev.distinct_n(samples, 2) == 3 / 4
    assert ev.distinct_n(samples, 3) == 2 / 2
    assert math.isnan(ev.distinct_n(words("a", "b"), 2))  # no sample has two words


def test_bleu_by_hand():
    hyp, ref = words("the cat sat on the mat", "the cat sat on a mat")
    # clipped precisions: 1-grams 5/6 (second 'the' unmatched), 2-grams 3/5 (the-cat, cat-sat,
    # sat-on), 3-grams 2/4, 4-grams 1/3; equal lengths: BP = 1
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert ev.bleu(hyp, [ref]) == pytest.approx(expected, rel=1e-15)
    # no match at all: every order counts ε = 0.1 over max(#n-grams, 1) (NLTK method 1)
    assert ev.bleu(["a", "b"], [["c", "d"]]) == pytest.approx((0.1 / 2 * 0.1 * 0.1 * 0.1) ** 0.25)
    # shorter than the reference: BP = exp(1 − 3/2); precisions 2/2, 1/1, ε/1, ε/1
    short = ev.bleu(["the", "cat"], [["the", "cat", "sat"]])
    assert short == pytest.approx(math.exp(1 - 3 / 2) * (0.1 * 0.1) ** 0.25, rel=1e-15)
    # the closest reference length counts for BP (here 2, equal to c: BP = 1)
    two_refs = ev.bleu(["the", "cat"], [["the", "cat", "sat", "on"], ["the", "cat"]])
    assert two_refs == pytest.approx((0.1 * 0.1) ** 0.25, rel=1e-15)
    assert ev.bleu([], [["a"]]) == 0.0


def test_self_bleu_by_hand():
    same = words("a b c d", "a b c d")
    assert ev.self_bleu(same) == 1.0
    pair = words("the cat sat on the mat", "the cat sat on a mat")
    # symmetric here: either way the precisions are 5/6, 3/5, 2/4, 1/3
    assert ev.self_bleu(pair) == pytest.approx((1 / 12) ** 0.25, rel=1e-15)
    three = words("a b c d", "a b c d", "w x y z")
    # the two equal samples each find themselves (BLEU 1 against {copy, other}); the third
    # matches nothing: (ε/4 · ε/3 · ε/2 · ε/1)^¼
    lonely = (0.1 / 4 * 0.1 / 3 * 0.1 / 2 * 0.1 / 1) ** 0.25
    assert ev.self_bleu(three) == pytest.approx((1 + 1 + lonely) / 3, rel=1e-15)


def test_diversity_is_per_prompt_then_averaged():
    groups = [["the cat sat", "the cat ran"], ["a b c d", "a b c d"]]
    out = ev.diversity(groups)
    assert out["diversity/distinct_1"] == pytest.approx((4 / 6 + 4 / 8) / 2)
    assert out["diversity/self_bleu"] == pytest.approx((ev.self_bleu(words(*groups[0])) + 1) / 2)


# ----------------------------------------------------------------------------------------------
# Held-out split


def test_heldout_split_is_fixed_by_its_own_seed_and_disjoint_from_training():
    data = DataConfig(prompts="builtin:movie_reviews", heldout_prompts=10)
    full = load_prompts(data)
    train, held = split_heldout(full, data)
    assert len(held) == 10 and len(train) == len(full) - 10
    assert held == heldout_indices(len(full), 10, seed=0)  # the run's seed plays no part
    assert not {full[i]["prompt"] for i in held} & set(train["prompt"])
    assert heldout_indices(len(full), 10, seed=1) != held
    with pytest.raises(Exception, match="leaves no prompt to train on"):
        heldout_indices(5, 5, seed=0)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return str(make_tiny_model_dir(root / "policy", seed=0)), str(
        make_tiny_model_dir(root / "reference", seed=1)
    )


def test_training_never_samples_heldout_prompts(tiny_pair, tmp_path):
    from kltrain.training.trainer import Trainer

    raw = loop_config_raw(tiny_pair[0], tmp_path / "run")
    raw["data"]["heldout_prompts"] = 200  # of 242: the 42 left are drawn over and over
    trainer = Trainer(config_from_dict(raw))
    held = {trainer.full_dataset[i]["prompt"] for i in trainer.heldout}
    seen = set()
    for _ in range(30):  # 60 draws: every one of the 42 training prompts, some twice
        seen |= {trainer.dataset[i]["prompt"] for i in trainer.sampler.next_batch(2)}
    assert len(seen) == 42 and not seen & held


def test_eval_every_needs_a_heldout_split(tiny_pair, tmp_path):
    raw = loop_config_raw(tiny_pair[0], tmp_path / "run", trainer={"eval_every": 1})
    with pytest.raises(ConfigError, match=r"data\.heldout_prompts"):
        config_from_dict(raw)


# ----------------------------------------------------------------------------------------------
# Divergences and statistics against an independent float64 computation


def _independent(models, rollout):
    """Per-sequence reverse KL, forward KL, JS, entropy and −log π_ref(y) sums in float64 from
    full-vocabulary logits of plain forwards (no chunking, no kernel)."""
    policy = models.policy.to(torch.float64)
    reference = models.reference.to(torch.float64)
    ids, att, P = rollout.input_ids, rollout.attention_mask, rollout.prompt_length
    pos = (att.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        lp = policy(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, P - 1 : -1]
        lq = reference(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, P - 1 : -1]
    lp, lq = lp.log_softmax(-1), lq.log_softmax(-1)
    p, q = lp.exp(), lq.exp()
    lm = torch.log((p + q) / 2)
    per_token = {
        "reverse_kl": (p * (lp - lq)).sum(-1),
        "forward_kl": (q * (lq - lp)).sum(-1),
        "js": 0.5 * (p * (lp - lm)).sum(-1) + 0.5 * (q * (lq - lm)).sum(-1),
        "entropy": -(p * lp).sum(-1),
        "ref_nll": -lq.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1),
    }
    policy.to(torch.float32)
    reference.to(torch.float32)
    mask = rollout.completion_mask.double()
    return {k: (v * mask).sum(-1) for k, v in per_token.items()}, mask.sum(-1)


def test_eval_divergences_match_an_independent_float64_computation(
    tiny_pair, tmp_path, monkeypatch
):
    cfg = config_from_dict(
        loop_config_raw(
            tiny_pair[0], tmp_path / "run", model={"reference": tiny_pair[1]},
            generation={"max_new_tokens": 8},
        )
    )  # fmt: skip
    models = load_models(cfg.model)
    with torch.no_grad():  # sharpen the reference so that the divergences are far from 0
        models.reference.lm_head.weight.mul_(40.0)
    rollouts = []
    real_measure = ev.measure

    def spy(rollout, *args, **kwargs):
        real_measure(rollout, *args, **kwargs)
        rollouts.append(rollout)

    monkeypatch.setattr(ev, "measure", spy)
    full = load_prompts(cfg.data)
    data = ev.EvalData(full, list(range(10)), "test")
    reward_fn = RewardFunction(cfg.reward)
    metrics = ev.evaluate_policy(
        models, cfg, data, samples_per_prompt=3, seed=7, reward_fn=reward_fn, progress=False
    )
    assert len(rollouts) == 2  # 10 prompts in batches of PROMPTS_PER_BATCH = 8
    sums: dict[str, list] = {}
    lengths = []
    for r in rollouts:
        per_seq, n = _independent(models, r)
        lengths.append(n)
        for k, v in per_seq.items():
            sums.setdefault(k, []).append(v)
    per_seq = {k: torch.cat(v) for k, v in sums.items()}
    n_tok = float(torch.cat(lengths).sum())
    assert metrics["samples"] == 30 == len(per_seq["js"])
    # fp32 forward + chunked fp32 log-softmax against float64: a few thousand ulps of 2^-24
    rtol = 2**-24 * 4096
    for name in ("reverse_kl", "forward_kl", "js"):
        assert metrics[f"divergence/{name}"] == pytest.approx(float(per_seq[name].mean()), rel=rtol)
        total = float(per_seq[name].sum())
        assert metrics[f"divergence/{name}_per_token"] == pytest.approx(total / n_tok, rel=rtol)
        assert float(per_seq[name].mean()) > 0.1  # far from 0: the check has teeth
    entropy = float(per_seq["entropy"].sum()) / n_tok
    assert metrics["completion/entropy_per_token"] == pytest.approx(entropy, rel=rtol)
    ppl = math.exp(float(per_seq["ref_nll"].sum()) / n_tok)
    assert metrics["reference_perplexity"] == pytest.approx(ppl, rel=rtol * 10)
    completions = [c for r in rollouts for c in r.completions]
    expected = sum(c.count("e") + 0.1 * len(c) for c in completions) / len(completions)
    assert metrics["reward/mean"] == pytest.approx(expected, rel=1e-6)
    groups = [completions[i : i + 3] for i in range(0, 30, 3)]
    assert metrics["diversity/self_bleu"] == pytest.approx(
        ev.diversity(groups)["diversity/self_bleu"]
    )


def test_eval_is_deterministic_and_leaves_the_callers_rng_alone(tiny_pair, tmp_path):
    raw = loop_config_raw(tiny_pair[0], tmp_path / "run")
    raw["reward"]["terms"][0]["transforms"] = [{"name": "whiten", "running": True}]
    cfg = config_from_dict(raw)
    models = load_models(cfg.model)
    data = ev.EvalData(load_prompts(cfg.data), list(range(4)), "test")
    reward_fn = RewardFunction(cfg.reward)
    torch.manual_seed(123)
    before_rng, before_reward = torch.get_rng_state(), json.dumps(reward_fn.state_dict())
    kwargs = dict(samples_per_prompt=2, reward_fn=reward_fn, progress=False)
    first = ev.evaluate_policy(models, cfg, data, seed=5, **kwargs)
    assert torch.equal(torch.get_rng_state(), before_rng)
    assert json.dumps(reward_fn.state_dict()) == before_reward
    assert ev.evaluate_policy(models, cfg, data, seed=5, **kwargs) == first
    assert ev.evaluate_policy(models, cfg, data, seed=6, **kwargs) != first


# ----------------------------------------------------------------------------------------------
# trainer.eval_every and `kltrain eval` on a run folder


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_every_logs_eval_metrics_without_changing_training(tiny_pair, tmp_path):
    from kltrain.training.trainer import Trainer

    data = {"heldout_prompts": 6}
    plain = loop_config_raw(tiny_pair[0], tmp_path / "plain", data=data)
    evald = loop_config_raw(tiny_pair[0], tmp_path / "eval", data=data, trainer={"eval_every": 1})
    for raw in (plain, evald):
        raw["data"].update(
            prompts="builtin:movie_reviews", chat_template="off", max_prompt_tokens=16
        )
        Trainer(config_from_dict(raw)).fit()
    a, b = _rows(tmp_path / "plain" / "metrics.jsonl"), _rows(tmp_path / "eval" / "metrics.jsonl")
    assert all("eval/reward/mean" in row and "eval/divergence/js" in row for row in b)
    assert not any(k.startswith("eval/") for row in a for k in row)
    for row_a, row_b in zip(a, b, strict=True):  # the evaluation did not disturb training
        for key, value in row_a.items():
            if not key.startswith("time/"):
                assert row_b[key] == value, key
    assert b[0]["eval/samples"] == 6 * 2


def test_kltrain_eval_writes_eval_json_deterministically(tiny_pair, tmp_path, capsys):
    import yaml

    from kltrain.cli import main

    raw = loop_config_raw(tiny_pair[0], tmp_path / "run", data={"heldout_prompts": 4})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["fit", str(tmp_path / "c.yaml")]) == 0
    args = ["eval", str(tmp_path / "run"), "--samples-per-prompt", "2", "--seed", "3"]
    assert main(args) == 0
    first = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert (
        first["num_prompts"] == 4
        and first["step"] == 2
        and "data.heldout_prompts" in first["prompts"]
    )
    assert first["metrics"]["eval/samples"] == 8
    assert main(args) == 0
    again = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert again["metrics"] == first["metrics"]
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "neither a complete checkpoint" in capsys.readouterr().err


def test_fdpg_eval_reports_target_divergences_and_leaves_the_algorithm_alone(tiny_pair, tmp_path):
    from kltrain.training.trainer import Trainer

    rows = {}
    for name, every in (("plain", 0), ("eval", 1)):
        raw = loop_config_raw(
            tiny_pair[0], tmp_path / name, data={"heldout_prompts": 4},
            generation={"min_new_tokens": 0}, kl={"divergence": "js"},
            algorithm={"name": "fdpg", "num_generations": 4, "fdpg": {"target": "constraint"}},
            reward={"terms": [{"name": "tests.helpers.fdpg_rewards:has_letter_e"}]},
            trainer={"eval_every": every, "micro_batch_size": 8},
        )  # fmt: skip
        raw["kl"] = {"divergence": "js"}
        trainer = Trainer(config_from_dict(raw))
        trainer.fit()
        rows[name] = _rows(tmp_path / name / "metrics.jsonl")
    before = json.dumps(trainer.algorithm.state_dict(), default=str)
    assert "eval/fdpg/target_divergence/js" in trainer.evaluate_heldout()
    assert json.dumps(trainer.algorithm.state_dict(), default=str) == before
    for row in rows["eval"]:
        assert 0 <= row["eval/fdpg/alignment/constraint"] <= 1
        assert 0 <= row["eval/fdpg/target_divergence/js"] <= math.log(2) + 1e-9
        assert math.isfinite(row["eval/fdpg/log_z"])
    for a, b in zip(rows["plain"], rows["eval"], strict=True):  # Z, λ and step count restored
        assert {k: v for k, v in a.items() if not k.startswith("time/")} == {
            k: v for k, v in b.items() if not k.startswith(("time/", "eval/"))
        }


def test_heldout_prompts_never_share_a_training_prompts_z_estimate(tiny_pair, tmp_path):
    from kltrain.algorithms import make_algorithm

    raw = loop_config_raw(
        tiny_pair[0], tmp_path / "run", generation={"min_new_tokens": 0},
        algorithm={"name": "fdpg", "num_generations": 4, "fdpg": {"target": "constraint"}},
        reward={"terms": [{"name": "tests.helpers.fdpg_rewards:has_letter_e"}]},
    )  # fmt: skip
    raw["kl"] = {"divergence": "js"}
    cfg = config_from_dict(raw)
    models = load_models(cfg.model)
    data = ev.EvalData(load_prompts(cfg.data), [0, 1], "test")
    figures = []
    for stale in (False, True):
        algorithm = make_algorithm(cfg)
        algorithm.setup(models)
        if stale:  # a training prompt with row number 0 and a far-off Z
            algorithm.log_z.update(0, torch.full((4,), 30.0, dtype=torch.float64))
        figures.append(
            ev.evaluate_policy(
                models,
                cfg,
                data,
                samples_per_prompt=4,
                seed=1,
                progress=False,
                reward_fn=RewardFunction(cfg.reward),
                algorithm=algorithm,
            )
        )
    assert figures[0]["fdpg/log_z"] == figures[1]["fdpg/log_z"] < 1
