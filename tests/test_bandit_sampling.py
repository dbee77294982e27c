"""The enumerable bandit of tests/test_algorithms.py (one new token, free logits, closed-form
optimum of reward − β·D(π‖π_ref)) in the two settings of issue 12:

- off-policy: each rollout batch feeds ``epochs × num_minibatches`` = 16 optimizer steps, with
  k3 in the loss. With the importance ratio (k3·w, ``kl.importance_ratio: auto``) the policy
  reaches the reverse-KL optimum; without it (k3 on π_old's tokens) it does not.
- a sampler that bans EOS as the first token (``generation.min_new_tokens: 1``, applied by
  transformers' own logits processor): the policy piles mass on the arm it never samples. The
  default is now 0, and that bandit reaches its optimum.

The training step is the loop's: algorithm.prepare → per-token policy loss (clipped surrogate)
+ β·regulariser.loss_term inside the chunked lm_head kernel."""

from __future__ import annotations

import torch
from transformers import MinNewTokensLengthLogitsProcessor

from kltrain.algorithms import make_algorithm
from kltrain.config import config_from_dict
from kltrain.divergence.lm_head import fused_token_loss
from kltrain.objective import build_regulariser, optimizer_steps_per_batch
from tests.test_algorithms import BETA, V, _bandit_rollout, _problem, reverse_kl_optimum

EOS = 3  # arm 3 (reward −0.5, optimum 0.017) plays the end-of-sequence token


def _train(kl: dict, algorithm: dict, steps: int, min_new_tokens: int = 0, lr: float = 0.05):
    """Train the bandit's logits; returns (π, π_ref logits, reward, regulariser)."""
    torch.manual_seed(1)
    ref_logits, reward = _problem()
    k, prompts = 8, 16
    cfg = config_from_dict(
        {"algorithm": {"name": "rloo", "num_generations": k, **algorithm}, "kl": kl}
    )
    algo = make_algorithm(cfg)
    reg = build_regulariser(cfg.kl, optimizer_steps_per_batch(cfg))
    weight = torch.nn.Parameter(ref_logits.clone().view(V, 1))
    opt = torch.optim.Adam([weight], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-3)
    ban = MinNewTokensLengthLogitsProcessor(0, min_new_tokens, EOS)
    n = prompts * k
    ref_lp_all = torch.log_softmax(ref_logits, 0)
    for _ in range(steps):
        with torch.no_grad():
            logits = weight.view(1, V)
            scores = ban(torch.zeros(1, 0, dtype=torch.long), logits.clone()).view(-1)
            tokens = torch.multinomial(torch.softmax(scores, 0), n, replacement=True)
            old = torch.log_softmax(weight.view(-1), 0)[tokens]  # the policy's, as measure()
        batch = algo.prepare(_bandit_rollout(tokens, k), reward[tokens], None)
        adv = batch.advantages.view(-1)
        ref_lp = ref_lp_all[tokens]
        for _ in range(cfg.algorithm.epochs):
            order = torch.randperm(n)
            for rows in order.split(n // cfg.algorithm.num_minibatches):
                _update(algo, reg, weight, ref_logits, tokens[rows], old[rows], adv[rows],
                        ref_lp[rows], opt)  # fmt: skip
        sched.step()
    return torch.softmax(weight.detach().view(-1), 0), ref_logits, reward, reg


def _update(algo, reg, weight, ref_logits, tokens, old, adv, ref_lp, opt):
    m = tokens.numel()
    ones = torch.ones(m, 1)

    def loss_fn(chunk):
        sl = chunk.index
        per_token, _ = algo.token_loss(chunk.logprobs, old[sl], adv[sl])
        d = reg.loss_term(chunk.logprobs, ref_lp[sl], chunk.divergence, old[sl])
        return (per_token + BETA * d).sum() / m

    opt.zero_grad()
    loss = fused_token_loss(
        ones.requires_grad_(),
        weight,
        tokens,
        loss_fn,
        ref_hidden=ones if reg.exact else None,
        ref_weight=ref_logits.view(V, 1) if reg.exact else None,
        divergence=reg.divergence if reg.exact else None,
    )
    loss.backward()
    opt.step()


OFF_POLICY = {"epochs": 4, "num_minibatches": 4}


def test_off_policy_k3_with_the_ratio_reaches_the_reverse_kl_optimum():
    kl = {"divergence": "reverse_kl", "estimator": "k3", "placement": "loss", "coef": BETA}
    pi, ref_logits, reward, reg = _train(kl, OFF_POLICY, steps=150, lr=0.01)
    assert (reg.importance_ratio, reg.gradient.key) == ("on", "local reverse_kl")
    target = reverse_kl_optimum(ref_logits, reward, BETA)
    assert (pi - target).abs().max() < 0.02, (pi, target)
    assert (torch.softmax(ref_logits, 0) - target).abs().max() > 0.15  # it had to move


def test_off_policy_k3_without_the_ratio_misses_it():
    """The same run with w removed (opted in by name): k3's gradient on π_old's tokens is no
    named objective's, and the policy ends away from the reverse-KL optimum."""
    kl = {
        "divergence": "reverse_kl",
        "estimator": "k3",
        "placement": "loss",
        "coef": BETA,
        "importance_ratio": "off",
        "accept_gradient": "off_policy",
    }
    pi, ref_logits, reward, _ = _train(kl, OFF_POLICY, steps=150, lr=0.01)
    target = reverse_kl_optimum(ref_logits, reward, BETA)
    assert (pi - target).abs().max() > 0.03, (pi, target)  # (it ends 0.056 away)


def test_eos_bandit_reaches_its_optimum_with_the_default_min_new_tokens():
    kl = {"divergence": "reverse_kl", "estimator": "exact", "placement": "loss", "coef": BETA}
    default = config_from_dict({}).generation.min_new_tokens
    assert default == 0
    target = reverse_kl_optimum(*_problem(), BETA)
    pi, *_ = _train(kl, {}, steps=300, min_new_tokens=default)
    assert (pi - target).abs().max() < 0.02, (pi, target)
    banned, *_ = _train(kl, {}, steps=300, min_new_tokens=1)  # the old default
    assert banned[EOS] > target[EOS] + 0.1, (banned, target)  # mass on the unsampled arm
