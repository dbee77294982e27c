"""Per-sample sampling streams (kltrain/models/sampling.py, rollout.generate(seeds=...)): each
completion depends on its own seed only, never on the batch it is generated in, and its law is
that of do_sample=True with the same temperature / top-k / top-p."""

from __future__ import annotations

import math

import pytest
import torch

from kltrain.models.loading import load_models
from kltrain.models.sampling import PerSampleGumbel, sample_seed
from kltrain.rollout import generate
from tests.helpers.tiny import make_tiny_model_dir


def test_seeds_are_deterministic_and_distinct_for_neighbours():
    seeds = {sample_seed(7, step, i) for step in range(1, 4) for i in range(64)}
    assert len(seeds) == 3 * 64
    assert sample_seed(7, 2, 5) == sample_seed(7, 2, 5)
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.8)]
)
def test_gumbel_argmax_draws_from_the_warped_softmax(temperature, top_k, top_p):
    """Frequencies of argmax over n independent seeds vs the target law, computed here from the
    definitions (temperature, then keep the top-k, then the smallest nucleus with mass ≥ top_p).
    Each frequency is a binomial mean: |f − p| ≤ 5·sqrt(p(1−p)/n) (5σ; false alarm < 1e-5 per
    entry); tokens outside the support are never drawn."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    scaled = logits[0].double() / temperature
    keep = torch.ones(6, dtype=torch.bool)
    if top_k:
        keep &= scaled >= scaled.topk(top_k).values[-1]
    p = torch.where(keep, scaled, -math.inf).softmax(-1)
    if top_p < 1:
        order = p.argsort(descending=True)
        before = p[order].cumsum(0) - p[order]  # mass of the tokens ranked above
        nucleus = torch.zeros(6, dtype=torch.bool)
        nucleus[order[before < top_p]] = True
        p = torch.where(nucleus, p, 0.0)
        p = p / p.sum()
    n = 20000
    processor = PerSampleGumbel(
        [sample_seed(0, 1, i) for i in range(n)], temperature, top_k, top_p, "cpu"
    )
    draws = processor(torch.zeros(n, 1, dtype=torch.long), logits.expand(n, 6)).argmax(-1)
    freq = torch.bincount(draws, minlength=6).double() / n
    assert (freq[p == 0] == 0).all()
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), (freq, p)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from kltrain.config import ModelConfig

    path = make_tiny_model_dir(tmp_path_factory.mktemp("sampling") / "m", seed=3)
    return load_models(ModelConfig(policy=str(path)))


def _completions(models, texts, seeds, batch_size):
    ids, _, mask, p = generate(
        models,
        texts,
        max_prompt_tokens=16,
        max_new_tokens=8,
        min_new_tokens=0,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        batch_size=batch_size,
        seeds=seeds,
    )
    return [row[m].tolist() for row, m in zip(ids[:, p:], mask, strict=True)]


def test_a_sample_does_not_depend_on_its_batch(tiny_models):
    """The same (prompt, seed) pairs generated as one batch of 4, as two batches of 2 (two
    processes' shares: other left padding) and one by one, in another order too: the same
    completions. Before, sampling drew from one global stream, so a sample depended on which
    process and which batch position it had."""
    texts = ["The film", "A long and boring review of the movie:", "Great", "I hated the plot"]
    seeds = [sample_seed(5, 1, i) for i in range(4)]
    whole = _completions(tiny_models, texts, seeds, batch_size=4)
    halves = _completions(tiny_models, texts[:2], seeds[:2], 2) + _completions(
        tiny_models, texts[2:], seeds[2:], 2
    )
    singles = [_completions(tiny_models, [t], [s], 1)[0] for t, s in zip(texts, seeds, strict=True)]
    reversed_ = _completions(tiny_models, texts[::-1], seeds[::-1], batch_size=4)[::-1]
    assert whole == halves == singles == reversed_
    other = _completions(tiny_models, texts, [sample_seed(5, 2, i) for i in range(4)], 4)
    assert other != whole  # the seed does change the draw
