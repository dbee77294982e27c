"""Rows that share a prompt run it once (``kltrain.models.shared_prefix``, issue 13): the hidden
states, their gradients and the samples are those of running every row whole.

Checked in float64 on a tiny random Llama, where the two ways differ only in the summation
order of the same sums (other batch sizes: ~2^-53 × the ~10^2 terms of each sum × 2 layers,
far below the 1e-9 asserted), while a row reading another row's prompt, a shifted position or
a missed mask differs at O(1). The models' RMSNorms compute in float64 too
(``tests.helpers.invariance.to_float64``): transformers' own round to float32, which would turn
the gradients' other summation orders into float32 differences."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from kltrain.config import ModelConfig
from kltrain.models.loading import load_models
from kltrain.models.logits import final_hidden_states
from kltrain.models.shared_prefix import group_prefixes, hidden_after_shared_prefix
from kltrain.rollout import completion_hidden, generate, prompt_positions
from tests.helpers.invariance import to_float64
from tests.helpers.tiny import make_tiny_model_dir

TOL = {"rtol": 1e-9, "atol": 1e-9}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")
    m = load_models(ModelConfig(policy=str(path)))
    to_float64(m.policy)
    return m


def test_rows_are_grouped_by_equal_ids_and_mask():
    ids = torch.tensor([[5, 6], [1, 2], [5, 6], [1, 2], [7, 8], [5, 6]])
    mask = torch.ones_like(ids)
    mask[5, 0] = 0  # same ids as rows 0 and 2, but its first token is padding: another prefix
    groups = group_prefixes(ids, mask)
    assert groups is not None
    assert groups.first.numel() == 4
    rep = groups.first[groups.of_row]  # every row's representative has its ids and mask
    assert torch.equal(ids[rep], ids) and torch.equal(mask[rep], mask)
    assert sorted(groups.first.tolist()) == [0, 1, 4, 5]  # each group's first row


def test_no_groups_when_nothing_repeats_or_the_prefix_is_empty():
    ids = torch.tensor([[1, 2], [1, 3]])
    assert group_prefixes(ids, torch.ones_like(ids)) is None
    assert group_prefixes(ids[:, :0], torch.ones_like(ids)[:, :0]) is None
    assert group_prefixes(ids[:1], torch.ones_like(ids[:1])) is None


def batch(models, seed=0):
    """Three prompts of different lengths (left-padded), two of them three times each, with
    random completions of different lengths (right-padded)."""
    tok = models.tokenizer
    tok.padding_side = "left"
    texts = ["great movie", "the plot was slow and", "awful"]
    rows = [texts[0]] * 3 + [texts[1]] * 3 + [texts[2]]
    enc = tok(rows, return_tensors="pt", padding=True, add_special_tokens=False)
    g = torch.Generator().manual_seed(seed)
    b, t = len(rows), 6
    completion = torch.randint(3, len(tok), (b, t), generator=g)
    lengths = torch.tensor([6, 4, 1, 6, 5, 3, 2])
    completion_mask = torch.arange(t) < lengths[:, None]
    completion = completion.masked_fill(~completion_mask, tok.pad_token_id)
    ids = torch.cat([enc["input_ids"], completion], 1)
    att = torch.cat([enc["attention_mask"], completion_mask.long()], 1)
    return ids, att, completion_mask, enc["input_ids"].shape[1]


def whole_rows(model, ids, att, p):
    """The reference computation: every row run whole, as before prefixes were shared."""
    return final_hidden_states(model, ids, att, position_ids=prompt_positions(att))[:, p - 1 : -1]


def test_hidden_states_equal_running_every_row_whole(models):
    ids, att, mask, p = batch(models)
    model = models.policy
    with torch.no_grad():
        pos = prompt_positions(att)
        shared = hidden_after_shared_prefix(model, ids[:, :-1], att[:, :-1], pos[:, :-1], p - 1)
        assert shared is not None  # the shared path ran (two prompts repeat)
        got = completion_hidden(model, ids, att, p)
        want = whole_rows(model, ids, att, p)
    assert got.shape == want.shape == (ids.shape[0], mask.shape[1], model.config.hidden_size)
    torch.testing.assert_close(got[mask], want[mask], **TOL)
    torch.testing.assert_close(shared[mask], want[mask], **TOL)


def test_gradients_equal_running_every_row_whole(models):
    ids, att, mask, p = batch(models, seed=1)
    model = models.policy
    model.train()
    weights = torch.randn((*mask.shape, model.config.hidden_size), dtype=torch.float64)

    def grads(fn):
        model.zero_grad(set_to_none=True)
        (fn(model, ids, att, p)[mask] * weights[mask]).sum().backward()
        return {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}

    got, want = grads(completion_hidden), grads(whole_rows)
    model.zero_grad(set_to_none=True)
    model.eval()
    assert got.keys() == want.keys() and len(want) > 0
    for name in want:  # the prompts' tokens and positions get gradient through the shared cache
        torch.testing.assert_close(got[name], want[name], **TOL, msg=name)


def test_gradient_checkpointing_runs_every_row_whole(models, tmp_path):
    path = make_tiny_model_dir(tmp_path / "model")
    m = load_models(ModelConfig(policy=str(path), gradient_checkpointing=True))
    policy = to_float64(m.policy)
    policy.train()
    ids, att, mask, p = batch(m)
    pos = prompt_positions(att)
    # transformers drops the cache of a checkpointed layer: sharing is declined, not broken
    assert hidden_after_shared_prefix(policy, ids, att, pos, p - 1) is None
    with torch.no_grad():  # no backward to replay: checkpointing is off, sharing runs
        assert hidden_after_shared_prefix(policy, ids, att, pos, p - 1) is not None
    got = completion_hidden(policy, ids, att, p)
    policy.eval()
    with torch.no_grad():
        want = whole_rows(policy, ids, att, p)
    torch.testing.assert_close(got.detach()[mask], want[mask], **TOL)


def test_a_sliding_window_model_runs_every_row_whole(models):
    config = MistralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, sliding_window=3,
    )  # fmt: skip
    model = MistralForCausalLM(config).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]] * 2 + [[7, 8, 9, 10, 11, 12]])
    att = torch.ones_like(ids)
    # its cache keeps a window, not every position: not a plain full-attention cache
    with torch.no_grad():
        assert hidden_after_shared_prefix(model, ids, att, prompt_positions(att), 4) is None


def sample(models, texts, batch_size, hidden_out, seeds):
    return generate(
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
        hidden_out=hidden_out,
    )


def test_generation_runs_each_distinct_prompt_once_and_samples_the_same(models):
    texts = ["great movie"] * 3 + ["the plot was slow and"] * 3 + ["awful"]
    seeds = list(range(100, 107))
    seen = []
    decoder = models.policy.get_decoder()
    handle = decoder.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        shared_hidden = []
        ids, _, mask, p = sample(models, texts, len(texts), shared_hidden, seeds)
    finally:
        handle.remove()
    assert seen[0] == (3, p - 1)  # the three distinct prompts' first P - 1 tokens, once each
    assert seen[1] == (len(texts), 1)  # then each row's last prompt token samples token 1
    # one row at a time shares nothing: whole prompts, the same per-row draws
    alone_hidden = []
    alone = sample(models, texts, 1, alone_hidden, seeds)
    assert torch.equal(alone[0], ids) and torch.equal(alone[2], mask)
    torch.testing.assert_close(shared_hidden[0], alone_hidden[0], **TOL)
