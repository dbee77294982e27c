"""PPO with the divergence in the reward (MATH.md, "PPO with the penalty in the reward").

GAE itself (hand-computed and against a loop), the summed value/policy losses and the Llama 2
gate table are pinned in test_advantages.py, test_losses.py and test_rewards.py; here: the PPO
path that uses them (token rewards, old values, GAE, whitening, value loss through
``hidden_loss``), config errors, the enumerable bandit's closed-form optimum, adaptive β through
the loop, and every divergence for two steps on tiny models."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from kltrain.algorithms import make_algorithm
from kltrain.algorithms.base import TrainBatch
from kltrain.algorithms.ppo import Ppo
from kltrain.algorithms.value import ValueHead
from kltrain.config import ConfigError, config_from_dict
from kltrain.divergence.lm_head import fused_token_loss
from kltrain.rollout import Rollout
from kltrain.training import checkpoint
from kltrain.training.trainer import Trainer
from tests.conftest import TINY_STEP_ONE_TOL, fp32_tol, fp64_tol, read_metrics
from tests.helpers.invariance import assert_same_update, float64_sgd_trainer
from tests.helpers.tiny import loop_config_raw, update_sections
from tests.test_algorithms import _bandit_rollout, _problem, reverse_kl_optimum

F64 = torch.float64
#: The fp32 hand cases: ≤ 16 roundings (decimal inputs, a 3-step GAE recursion, whitening) of
#: values ≤ 2 against results ≥ 0.1 (a factor 8 in all), as an absolute or relative bound.
HAND32 = fp32_tol(16, cond=8.0)
NAN = float("nan")


def ppo_raw(model: str = "unused", out=None, **sections) -> dict:
    """The loop tests' tiny config with PPO: k1 in the reward, 2 epochs × 2 minibatches."""
    raw = loop_config_raw(
        model,
        out,
        kl={"estimator": "k1", "placement": "reward"},
        algorithm={"name": "ppo", "epochs": 2, "num_minibatches": 2},
    )
    raw["name"] = "tiny_ppo"
    return update_sections(raw, sections)


# --- config --------------------------------------------------------------------------------


def test_ppo_refuses_the_divergence_in_the_loss_only():
    with pytest.raises(ConfigError, match=r"kl\.placement=loss is not valid with .*ppo.*reward"):
        config_from_dict(ppo_raw(kl={"placement": "loss"}))
    for placement in ("reward", "both"):
        config_from_dict(ppo_raw(kl={"placement": placement}))


def test_ppo_keys_belong_to_ppo_and_are_range_checked():
    with pytest.raises(ConfigError, match=r"algorithm\.ppo is only read by algorithm\.name=ppo"):
        config_from_dict(ppo_raw(algorithm={"name": "rloo", "ppo": {"lam": 0.9}}))
    resolved = config_from_dict(ppo_raw(algorithm={"name": "rloo"})).model_dump(mode="json")
    assert config_from_dict(resolved).algorithm.name == "rloo"  # a dumped run config loads back
    with pytest.raises(ConfigError, match=r"algorithm\.ppo\.lam: .*less than or equal to 1"):
        config_from_dict(ppo_raw(algorithm={"ppo": {"lam": 1.5}}))
    with pytest.raises(ConfigError, match=r"algorithm\.ppo\.gama: unknown key.*`algorithm\.ppo"):
        config_from_dict(ppo_raw(algorithm={"ppo": {"gama": 0.9}}))
    ppo = config_from_dict(ppo_raw()).algorithm.ppo  # literature defaults
    assert (ppo.gamma, ppo.lam, ppo.value_coef, ppo.value_clip_range) == (1.0, 0.95, 0.1, 0.2)
    assert ppo.whiten_advantages and ppo.reward_clip is None and ppo.penalty_clip is None


# --- the PPO path on hand-computed tensors ------------------------------------------------


def _algo(ppo: dict, hidden: int = 3, bias: float = 0.0) -> Ppo:
    cfg = config_from_dict(ppo_raw(algorithm={"ppo": ppo}))
    head = ValueHead(hidden)
    with torch.no_grad():
        head.linear.bias.fill_(bias)
    return Ppo(cfg, value=head)


def _rollout(mask: torch.Tensor, hidden: torch.Tensor) -> Rollout:
    b, t = mask.shape
    return Rollout(
        prompt_indices=list(range(b)),
        group_ids=torch.arange(b),
        prompts=["x"] * b,
        completions=[""] * b,
        input_ids=torch.zeros(b, t + 1, dtype=torch.long),
        attention_mask=torch.cat([torch.ones(b, 1, dtype=torch.long), mask.long()], dim=1),
        completion_mask=mask,
        prompt_length=1,
        policy_hidden=hidden,
    )


MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
PENALTY = torch.tensor([[0.1, 0.2, 0.3], [0.4, NAN, 9.0], [NAN, 1.0, 1.0]])  # β·d_t
REWARDS = torch.tensor([1.0, 2.0, 5.0])


def test_prepare_assembles_rewards_values_and_gae_by_hand():
    """γ = 0.9, λ = 0.8, V ≡ 0.5 (head bias), no whitening:
    row 0: r = (−0.1, −0.2, −0.3 + 1) ; δ = (−0.1 + 0.45 − 0.5, −0.2 + 0.45 − 0.5, 0.7 − 0.5)
           = (−0.15, −0.25, 0.2); A_2 = 0.2, A_1 = −0.25 + 0.72·0.2 = −0.106,
           A_0 = −0.15 + 0.72·(−0.106) = −0.22632; G = A + 0.5
    row 1: one token, r = 2 − 0.4 = 1.6, A = 1.1, G = 1.6 (padding: NaN penalty ignored)
    row 2: no valid token (an invalid sample): nothing anywhere."""
    algo = _algo({"gamma": 0.9, "lam": 0.8, "whiten_advantages": False}, bias=0.5)
    batch = algo.prepare(_rollout(MASK, torch.zeros(3, 3, 3)), REWARDS, PENALTY)
    r = batch.extras["token_rewards"]
    torch.testing.assert_close(
        r, torch.tensor([[-0.1, -0.2, 0.7], [1.6, 0, 0], [0, 0, 0]]), rtol=0, atol=HAND32
    )
    torch.testing.assert_close(batch.extras["old_values"], 0.5 * MASK.float(), rtol=0, atol=0)
    adv = torch.tensor([[-0.22632, -0.106, 0.2], [1.1, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(batch.advantages, adv, rtol=0, atol=HAND32)
    want = (adv + 0.5) * MASK
    torch.testing.assert_close(batch.extras["returns"], want, rtol=0, atol=HAND32)
    m = batch.metrics
    assert m["value/values_mean"] == 0.5  # the mean of 0.5s
    returns = torch.tensor([0.27368, 0.394, 0.7, 1.6], dtype=F64)
    assert m["value/returns_mean"] == pytest.approx(float(returns.mean()), abs=HAND32)
    ev = 1 - (returns - 0.5).var(unbiased=False) / returns.var(unbiased=False)
    assert m["value/explained_variance"] == pytest.approx(float(ev), abs=HAND32)  # = 0 here


def test_penalty_on_every_token_reward_on_the_last_and_clipping():
    """Without β (penalty None) only R sits on the last valid token; reward_clip clamps R,
    penalty_clip clamps each β·d_t."""
    algo = _algo({})
    plain = algo.token_rewards(REWARDS, None, MASK)
    assert torch.equal(plain, torch.tensor([[0, 0, 1.0], [2.0, 0, 0], [0, 0, 0]]))  # placed
    clipped = _algo({"reward_clip": 1.5, "penalty_clip": 0.15}).token_rewards(
        REWARDS, PENALTY, MASK
    )
    expected = torch.tensor([[-0.1, -0.15, -0.15 + 1.0], [-0.15 + 1.5, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(clipped, expected, rtol=0, atol=HAND32)


def test_whitened_advantages_have_zero_mean_unit_variance_over_valid_tokens():
    algo = _algo({})
    batch = algo.prepare(_rollout(MASK, torch.zeros(3, 3, 3)), REWARDS, PENALTY)
    valid = batch.advantages[MASK].double()
    assert float(valid.mean()) == pytest.approx(0.0, abs=HAND32)
    assert float(valid.var(unbiased=False)) == pytest.approx(1.0, abs=HAND32)
    assert (batch.advantages[~MASK] == 0).all()


def test_hidden_loss_is_the_clipped_value_loss_by_hand():
    """V = w·h + b with w = (1, 0, 0), b = 0; rows [0, 1] of MASK (4 valid tokens).
    V_old = 1, G = (2, 2, 1 | 0), V = (1.1, 1.5, 1.5 | 0.5): the four cases of test_losses'
    hand table, ½·max(...) = (0.405, 0.32, 0.125, 0.32); value_coef 0.1, num_tokens 4."""
    algo = _algo({"value_coef": 0.1, "value_clip_range": 0.2})
    with torch.no_grad():
        algo.value.linear.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
    hidden = torch.zeros(2, 3, 3)
    hidden[0, :, 0] = torch.tensor([1.1, 1.5, 1.5])
    hidden[1, 0, 0] = 0.5
    hidden[1, 1:, 0] = NAN  # padding: must not reach the loss
    rollout = _rollout(MASK[:2], hidden)
    rows = torch.arange(2)
    batch = TrainBatch(
        rollout,
        torch.zeros(2, 3),
        extras={
            "old_values": torch.tensor([[1.0, 1.0, 1.0], [1.0, 0, 0]]),
            "returns": torch.tensor([[2.0, 2.0, 1.0], [0.0, 0, 0]]),
        },
    )
    loss = algo.hidden_loss(hidden, batch, rows, num_tokens=4)
    assert loss.item() == pytest.approx(0.1 * (0.405 + 0.32 + 0.125 + 0.32) / 4, rel=HAND32)
    loss.backward()
    # ∂/∂w_0 = 0.1/4 · Σ_unclipped (V − G)·h_0 = 0.025·(−0.9·1.1 + 0.5·1.5)
    assert float(algo.value.linear.weight.grad[0, 0]) == pytest.approx(
        0.025 * (-0.9 * 1.1 + 0.5 * 1.5), rel=HAND32
    )
    assert float(algo.value.linear.bias.grad) == pytest.approx(0.025 * (-0.9 + 0.5), rel=HAND32)
    sums = algo.pop_update_sums()
    assert sums["value/loss"] == pytest.approx((0.405 + 0.32 + 0.125 + 0.32) / 4, rel=HAND32)
    assert sums["value/clip_fraction"] == 0.5  # 2 of 4 tokens
    assert algo.pop_update_sums() == {}


def test_policy_loss_is_the_clipped_surrogate_by_hand():
    """ε = 0.2: ratio 1.5, A = 1 → clipped at 1.2 → −1.2; ratio 0.5, A = −1 → −0.8·(−1)=0.8
    clipped; ratio 1.1, A = −2 → 2.2 unclipped."""
    algo = _algo({})
    old = torch.zeros(3, dtype=F64)
    lp = torch.log(torch.tensor([1.5, 0.5, 1.1], dtype=F64)).requires_grad_(True)
    loss, stats = algo.token_loss(lp, old, torch.tensor([1.0, -1.0, -2.0], dtype=F64))
    tol = fp64_tol(8, cond=4.0)  # float64: the log/exp of the ratio and one product
    want = torch.tensor([-1.2, 0.8, 2.2], dtype=F64)
    torch.testing.assert_close(loss.detach(), want, rtol=tol, atol=tol)
    assert stats["clipped"].tolist() == [1.0, 1.0, 0.0]
    loss.sum().backward()
    torch.testing.assert_close(
        lp.grad, torch.tensor([0.0, 0.0, 2.2], dtype=F64), rtol=tol, atol=tol
    )


# --- the enumerable bandit -----------------------------------------------------------------

BETA = 0.5


def train_ppo_bandit(steps: int = 150, prompts: int = 8, k: int = 8):
    """One-token completions over V = 6 tokens; the policy is a free logit vector. k1 reverse
    KL in the reward, value head on a constant hidden state (a learned baseline), 2 epochs × 2
    minibatches per rollout batch, advantages whitened."""
    torch.manual_seed(1)
    ref_logits, reward = _problem()
    v = ref_logits.numel()
    cfg = config_from_dict(
        ppo_raw(
            kl={"coef": BETA},
            algorithm={"num_generations": k, "epochs": 2, "num_minibatches": 2},
        )
    )
    algo = Ppo(cfg, value=ValueHead(1))
    weight = torch.nn.Parameter(ref_logits.clone().view(v, 1))
    params = [weight, *algo.value.parameters()]
    opt = torch.optim.Adam(params, lr=0.05)
    passes = cfg.algorithm.epochs * cfg.algorithm.num_minibatches
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps * passes, eta_min=1e-3)
    n = prompts * k
    ones = torch.ones(n, 1)
    ref_lp = torch.log_softmax(ref_logits, 0)
    for _ in range(steps):
        with torch.no_grad():
            probs = torch.softmax(weight.view(-1), dim=0)
            tokens = torch.multinomial(probs, n, replacement=True)
            old = torch.log(probs)[tokens]
        rollout = _bandit_rollout(tokens, k)
        rollout.policy_hidden = ones.view(n, 1, 1)
        penalty = BETA * (old - ref_lp[tokens]).view(n, 1)  # β·k1
        batch = algo.prepare(rollout, reward[tokens], penalty)
        adv = batch.advantages.view(-1)
        for _ in range(cfg.algorithm.epochs):
            for rows in torch.randperm(n).split(n // cfg.algorithm.num_minibatches):
                m = len(rows)

                def loss_fn(chunk, rows=rows, m=m, old=old, adv=adv):
                    idx = rows[chunk.index]
                    per_token, _ = algo.token_loss(chunk.logprobs, old[idx], adv[idx])
                    return per_token.sum() / m

                opt.zero_grad()
                loss = fused_token_loss(ones[rows].requires_grad_(), weight, tokens[rows], loss_fn)
                loss = loss + algo.hidden_loss(ones[rows].view(m, 1, 1), batch, rows, m)
                loss.backward()
                opt.step()
                sched.step()
    return torch.softmax(weight.detach().view(-1), dim=0), ref_logits, reward, algo


def test_ppo_k1_in_the_reward_reaches_the_reverse_kl_optimum():
    """π* = π_ref·exp(R/β)/Z within 0.005 in every probability (max |π − π*|; measured 2e-4
    after 150 steps, while π_ref is 0.31 away from π*)."""
    pi, ref_logits, reward, algo = train_ppo_bandit()
    target = reverse_kl_optimum(ref_logits, reward, BETA)
    assert (pi - target).abs().max() < 0.005, (pi, target)
    assert (torch.softmax(ref_logits, 0) - target).abs().max() > 0.15  # it had to move
    # the value head learned the baseline: E_π*[R − β·log(π*/π_ref)] = β·log Z
    log_z = BETA * torch.logsumexp(torch.log_softmax(ref_logits, 0) + reward / BETA, 0)
    assert algo.value.head(torch.ones(1)).detach().item() == pytest.approx(float(log_z), abs=0.01)


# --- through the loop, on tiny models -----------------------------------------------------


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "js"])
def test_two_steps_write_the_run_folder_with_the_value_head(tiny_model, tmp_path, divergence):
    out = tmp_path / "run"
    raw = ppo_raw(
        tiny_model, out, kl={"divergence": divergence, "estimator": "exact", "placement": "both"}
    )
    trainer = Trainer(config_from_dict(raw))
    summary = trainer.fit()
    assert summary["steps"] == 2
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("value/loss", "value/clip_fraction", "value/returns_mean", "train/loss"):
            assert torch.isfinite(torch.tensor(row[key])), key
        assert -1e9 < row["value/explained_variance"] <= 1.0
        assert f"train/{divergence}/exact" in row
    assert rows[-1]["divergence/reverse_kl"] > TINY_STEP_ONE_TOL  # the policy moved
    head = load_file(str(out / "final" / "value_head.safetensors"))
    assert set(head) == {"linear.weight", "linear.bias"}
    assert float(head["linear.weight"].abs().max()) > 0  # trained from its zero init
    assert (out / "final" / "model.safetensors").is_file()


def test_loop_puts_beta_k1_on_every_token_and_the_reward_on_the_last(tiny_model, tmp_path):
    """What the loop hands PPO: r_t = −β·(ℓ_old − ℓ_ref) on each generated token, + R on the
    last, 0 on padding."""
    trainer = Trainer(config_from_dict(ppo_raw(tiny_model, tmp_path / "run")))
    seen = {}
    prepare = trainer.algorithm.prepare

    def spy(rollout, rewards, penalty):
        seen["batch"] = prepare(rollout, rewards, penalty)
        return seen["batch"]

    trainer.algorithm.prepare = spy
    result = trainer.train_step()
    batch, r = seen["batch"], result.rollout
    mask = r.completion_mask
    k1 = r.stats["logprobs"] - r.stats["ref_logprobs"]
    expected = torch.where(mask, -0.1 * k1, 0.0)
    last = mask.long().cumsum(1).argmax(1)
    expected[torch.arange(len(last)), last] += result.rewards
    # fp32: −0.1·(ℓ_old − ℓ_ref) + R, ≤ 4 roundings at the rewards' scale
    tol = fp32_tol(4, cond=max(1.0, float(expected.abs().max())))
    torch.testing.assert_close(batch.extras["token_rewards"], expected, rtol=0, atol=tol)
    assert (batch.advantages[~mask] == 0).all() and (batch.extras["returns"][~mask] == 0).all()


def test_adaptive_beta_through_the_loop_follows_math_md(tiny_model, tmp_path):
    """β_{s+1} = β_s·(1 + clip(KL_s/target − 1, −0.2, 0.2)·n/H) with KL_s the step's k1 per
    sequence and n its 4 sequences; the controller's state is in the checkpoint."""
    out = tmp_path / "run"
    raw = ppo_raw(
        tiny_model,
        out,
        kl={"adaptive": {"target": 0.05, "horizon": 10.0}},
        trainer={"max_steps": 4, "learning_rate": 1e-2, "save_every": 4},
    )
    trainer = Trainer(config_from_dict(raw))
    trainer.fit()
    rows = read_metrics(out)
    betas = [r["train/coef"] for r in rows] + [trainer.coef.value]
    assert betas[0] == 0.1
    for s, row in enumerate(rows):
        error = min(max(row["train/reverse_kl/k1"] / 0.05 - 1.0, -0.2), 0.2)
        # one float64 update (≤ 8 roundings), from the same β
        assert betas[s + 1] == pytest.approx(betas[s] * (1 + error * 4 / 10.0), rel=fp64_tol(8))
    assert len(set(betas)) > 1  # it moved
    state = checkpoint.load_state(checkpoint.latest(out / "checkpoints"))
    assert state["coef"]["value"] == trainer.coef.value  # JSON round-trips floats exactly


def test_separate_value_model(tiny_model, tmp_path):
    """algorithm.ppo.value_model: its own trunk (no policy hidden states kept), saved in final/."""
    out = tmp_path / "run"
    raw = ppo_raw(tiny_model, out, algorithm={"ppo": {"value_model": tiny_model}})
    trainer = Trainer(config_from_dict(raw))
    assert not trainer.algorithm.needs_policy_hidden
    trainer.fit()
    assert all(torch.isfinite(torch.tensor(r["value/loss"])) for r in read_metrics(out))
    saved = load_file(str(out / "final" / "value_model.safetensors"))
    assert "value_head.linear.weight" in saved and any(k.startswith("trunk.") for k in saved)
    assert float(saved["value_head.linear.weight"].abs().max()) > 0


def test_make_algorithm_builds_ppo_with_a_head_sized_from_the_policy(tiny_model):
    algo = make_algorithm(config_from_dict(ppo_raw(tiny_model)))
    assert isinstance(algo, Ppo) and algo.needs_policy_hidden
    assert algo.value.linear.in_features == 32  # tiny model's hidden size


def test_gradient_accumulation_invariance_with_the_value_loss(tiny_model, tmp_path):
    """Micro-batches of 1 with accumulation give the same policy and value-head update as one
    batch of 4: the value loss is normalised by the step's global token count too."""
    trainers = []
    for micro in (1, 4):
        raw = ppo_raw(
            tiny_model,
            tmp_path / f"run{micro}",
            algorithm={"epochs": 1, "num_minibatches": 1},
            trainer={"micro_batch_size": micro, "max_grad_norm": None},
        )
        trainers.append(float64_sgd_trainer(config_from_dict(raw)))
    named = [
        {**dict(t.models.policy.named_parameters()), **dict(t.algorithm.value.named_parameters())}
        for t in trainers
    ]
    start = {k: v.detach().clone() for k, v in named[0].items()}
    first = trainers[0]
    rollout = first.make_rollout()
    rewards, _ = first.score(rollout, step=1)
    penalty = first.coef.value * first.regulariser.reward_penalty(rollout.stats)
    batch = first.algorithm.prepare(rollout, rewards, penalty)
    metrics = [t.optimise(batch, step=1) for t in trainers]
    # The value path runs in fp32 (ppo.py casts V to float32), so the value loss and the head's
    # gradient carry fp32 roundoff: ≤ 24 completion tokens summed, each term from a 32-wide
    # dot product and ≤ 6 GAE steps. At step 1 the zero-initialised head gives V = 0, so the
    # loss Σ G²/N has terms of one sign (condition 1); the gradient entries get a cancellation
    # allowance of 16 (as the policy's in tests/helpers/invariance.py).
    value_terms = 24 + 32 + 6
    assert metrics[0]["value/loss"] == pytest.approx(
        metrics[1]["value/loss"], rel=2 * fp32_tol(value_terms), abs=0
    )
    head = {f"linear.{k}" for k in ("weight", "bias")}
    policy = {k: v for k, v in named[0].items() if k not in head}
    assert_same_update(start, policy, {k: named[1][k] for k in policy})
    value_rtol = 2 * fp32_tol(value_terms, cond=16.0)
    moved = assert_same_update(
        start, {k: named[0][k] for k in head}, {k: named[1][k] for k in head}, value_rtol
    )
    assert moved > 1e-4  # the value head was updated


def test_value_trunk_gradient_switch():
    """value_trunk_gradient off: the value loss trains the head and leaves the trunk alone."""
    mask = torch.tensor([[True, True]])
    for trunk_gradient in (True, False):
        head = ValueHead(3, trunk_gradient=trunk_gradient)
        with torch.no_grad():
            head.linear.weight.fill_(0.5)
        hidden = torch.randn(1, 2, 3, requires_grad=True)
        head(_rollout(mask, hidden), torch.tensor([0]), hidden).sum().backward()
        assert head.linear.weight.grad is not None and head.linear.weight.grad.abs().sum() > 0
        if trunk_gradient:
            assert torch.equal(hidden.grad, torch.full((1, 2, 3), 0.5))  # w · 1, exact
        else:
            assert hidden.grad is None


def test_value_head_default_keeps_the_trunk_out_of_the_value_loss(tiny_model, tmp_path):
    from kltrain.algorithms.value import build_value_function

    model = tiny_model
    cfg = config_from_dict(ppo_raw(str(model), tmp_path / "run"))
    assert cfg.algorithm.ppo.value_trunk_gradient is False
    assert build_value_function(cfg).trunk_gradient is False


def test_value_learning_rate_is_its_own_param_group(tiny_model, tmp_path):
    from kltrain.training.trainer import Trainer

    model = tiny_model
    raw = ppo_raw(str(model), tmp_path / "run", algorithm={"ppo": {"value_learning_rate": 0.5}})
    trainer = Trainer(config_from_dict(raw))
    policy_group, value_group = trainer.optimizer.param_groups
    assert policy_group["lr"] == 1e-3 and value_group["lr"] == 0.5
    head = trainer.algorithm.modules()["value_head"]
    assert {id(p) for p in value_group["params"]} == {id(p) for p in head.parameters()}
