"""RLOO and GRPO on an enumerable bandit: one-token completions over a small vocabulary.

The policy is a free logit vector (a one-dimensional hidden state times a trainable lm_head),
trained through the same path as the loop: algorithm.prepare → per-token policy loss + β·exact
divergence inside the chunked lm_head kernel. It must converge to MATH.md's closed-form optimum
of reward − β·D(π‖π_ref) for the given β."""

from __future__ import annotations

import torch

from kltrain.algorithms import make_algorithm
from kltrain.config import KLConfig, config_from_dict
from kltrain.divergence.lm_head import fused_token_loss
from kltrain.objective import build_regulariser
from kltrain.rollout import Rollout
from tests.conftest import fp32_tol

V = 6
BETA = 0.5


def _problem():
    g = torch.Generator().manual_seed(0)
    ref_logits = torch.randn(V, generator=g)
    reward = torch.tensor([1.0, 0.0, 0.5, -0.5, 0.8, 0.2])
    return ref_logits, reward


def reverse_kl_optimum(ref_logits, reward, beta):
    """π*(y) = π_ref(y)·exp(R(y)/β) / Z."""
    return torch.softmax(ref_logits + reward / beta, dim=0)


def forward_kl_optimum(ref_logits, reward, beta):
    """π*(y) = β·π_ref(y)/(λ − R(y)), λ > max R chosen by bisection so that Σπ* = 1."""
    p_ref = torch.softmax(ref_logits.double(), dim=0)
    r = reward.double()
    lo, hi = r.max().item() + 1e-12, r.max().item() + beta * 1e3
    for _ in range(200):
        lam = (lo + hi) / 2
        total = (beta * p_ref / (lam - r)).sum().item()
        lo, hi = (lam, hi) if total > 1 else (lo, lam)
    return (beta * p_ref / (lam - r)).float()


def _bandit_rollout(tokens: torch.Tensor, k: int) -> Rollout:
    b = tokens.numel()
    return Rollout(
        prompt_indices=[i // k for i in range(b)],
        group_ids=torch.arange(b // k).repeat_interleave(k),
        prompts=["x"] * b,
        completions=[""] * b,
        input_ids=tokens.view(b, 1),
        attention_mask=torch.ones(b, 1, dtype=torch.long),
        completion_mask=torch.ones(b, 1, dtype=torch.bool),
        prompt_length=0,
    )


def train_bandit(algorithm: str, divergence: str, steps: int = 500, prompts: int = 16, k: int = 8):
    torch.manual_seed(1)
    ref_logits, reward = _problem()
    cfg = config_from_dict(
        {
            "algorithm": {"name": algorithm, "num_generations": k},
            "kl": {"divergence": divergence, "estimator": "exact", "placement": "loss"},
        }
    )
    algo = make_algorithm(cfg)
    reg = build_regulariser(KLConfig(divergence=divergence, estimator="exact", placement="loss"))
    weight = torch.nn.Parameter(ref_logits.clone().view(V, 1))
    ref_weight = ref_logits.view(V, 1)
    opt = torch.optim.Adam([weight], lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-3)
    n = prompts * k
    ones = torch.ones(n, 1)
    for _ in range(steps):
        with torch.no_grad():
            probs = torch.softmax(weight.view(-1), dim=0)
            tokens = torch.multinomial(probs, n, replacement=True)
            old = torch.log(probs)[tokens]
        batch = algo.prepare(_bandit_rollout(tokens, k), reward[tokens], None)
        adv = batch.advantages.view(-1)

        def loss_fn(chunk, adv=adv, old=old):
            per_token, _ = algo.token_loss(chunk.logprobs, old[chunk.index], adv[chunk.index])
            return (per_token + BETA * chunk.divergence).sum() / n

        opt.zero_grad()
        loss = fused_token_loss(
            ones.requires_grad_(),
            weight,
            tokens,
            loss_fn,
            ref_hidden=ones,
            ref_weight=ref_weight,
            divergence=reg.divergence,
        )
        loss.backward()
        opt.step()
        sched.step()
    return torch.softmax(weight.detach().view(-1), dim=0), ref_logits, reward


def test_reverse_kl_in_loss_reaches_closed_form_optimum():
    pi, ref_logits, reward = train_bandit("rloo", "reverse_kl")
    target = reverse_kl_optimum(ref_logits, reward, BETA)
    assert (pi - target).abs().max() < 0.02, (pi, target)
    # and it moved far from the reference, so the test can fail
    assert (torch.softmax(ref_logits, 0) - target).abs().max() > 0.15


def test_forward_kl_in_loss_reaches_closed_form_optimum():
    pi, ref_logits, reward = train_bandit("rloo", "forward_kl")
    target = forward_kl_optimum(ref_logits, reward, BETA)
    # forward_kl_optimum returns float32: V roundings of the terms, plus the sum of V of them
    assert abs(float(target.sum()) - 1) <= fp32_tol(2 * V + 1)
    assert (pi - target).abs().max() < 0.02, (pi, target)
    # reverse and forward optima differ here, so swapping the directions would fail
    assert (target - reverse_kl_optimum(ref_logits, reward, BETA)).abs().max() > 0.05


def test_grpo_moves_toward_the_reward_and_stays_regularised():
    """GRPO divides advantages by the group std, so its fixed point is not the closed form for
    β; it must still raise the expected reward and keep π between π_ref and the argmax."""
    pi, ref_logits, reward = train_bandit("grpo", "reverse_kl", steps=200)
    p_ref = torch.softmax(ref_logits, 0)
    assert float(pi @ reward) > float(p_ref @ reward) + 0.1
    assert float(pi.max()) < 0.99


def test_invalid_sample_moves_no_baseline():
    """A sample the loop marked invalid (mask cleared) changes nobody's advantage."""
    cfg = config_from_dict({"algorithm": {"name": "rloo", "num_generations": 3}})
    algo = make_algorithm(cfg)
    tokens = torch.tensor([0, 1, 2, 3, 4, 5])
    rollout = _bandit_rollout(tokens, 3)
    rewards = torch.tensor([1.0, 2.0, 0.0, 3.0, 5.0, 7.0])
    clean = algo.prepare(rollout, rewards, None).advantages.view(-1)
    rollout.completion_mask[2] = False  # the loop's mark for reward.on_invalid: skip
    for filler in (0.0, 1e6):  # whatever the invalid sample's reward slot holds
        adv = algo.prepare(
            rollout, rewards.index_put((torch.tensor([2]),), torch.tensor(filler)), None
        )
        adv = adv.advantages.view(-1)
        assert adv[2] == 0
        assert adv[:2].tolist() == [1.0 - 2.0, 2.0 - 1.0]  # baseline: the other valid sample
        assert torch.equal(adv[3:], clean[3:])
