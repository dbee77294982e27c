"""kltrain.rewards: built-in scorers, callables by import path, invalid outputs, transforms
against hand-computed numbers, the Llama 2 gate, and reward models against a direct forward."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import reward_fns
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

from kltrain.config import RewardConfig
from kltrain.rewards import (
    InvalidRewardError,
    RewardError,
    RewardFunction,
    builtin_rewards,
    keyword_reward,
    length_reward,
    llama2_gate,
    load_lexicon,
    parse_transform,
    sentiment_net,
    sentiment_reward,
    toy_helpfulness_reward,
    toy_safety_reward,
)
from kltrain.rewards.transforms import Whiten
from tests.conftest import fp32_tol, fp64_tol

H = "helpers.reward_fns:"


def f32(expected, f64_ops: int = 16):
    """``pytest.approx`` for a reward total: transforms run in float64 (≤ ``f64_ops``
    roundings), the total is rounded to float32 once: relative u32 per value plus float64 roundoff,
    and the same at the values' scale for entries near 0."""
    expected = [float(x) for x in expected]
    rel = fp32_tol(1) + fp64_tol(f64_ops, cond=4.0)
    scale = max((abs(x) for x in expected), default=0.0)
    return pytest.approx(expected, rel=rel, abs=rel * scale)


def model_tol(expected) -> float:
    """A reward model's scores, batched with padding, against one unpadded forward pass: two fp32
    evaluations of a 1-layer, 16-wide (MLP 32) model over ≤ 9 positions (≤ 64 accumulated
    products), at the scores' scale (≥ 1); a probability σ(x) or softmax moves by less."""
    return 2 * fp32_tol(64, cond=max(1.0, max(abs(float(x)) for x in expected)))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def reward(*terms, on_invalid="error", **kw) -> RewardFunction:
    return RewardFunction(RewardConfig(terms=list(terms), on_invalid=on_invalid), **kw)


def scored(values, transforms=(), **extra):
    """A RewardFunction whose single term returns the `score` column, and its call on `values`."""
    fn = reward({"name": H + "from_column", "transforms": list(transforms), **extra})
    n = len(values)
    return fn, fn([f"p{i}" for i in range(n)], ["c"] * n, step=0, columns={"score": values})


# ----------------------------------------------------------------------------------------------
# Sentiment


def test_lexicons_are_a_few_hundred_disjoint_words():
    pos, neg = load_lexicon("positive"), load_lexicon("negative")
    assert len(pos) >= 200 and len(neg) >= 150
    assert not pos & neg
    assert {"great", "wonderful", "enjoyed"} <= pos and {"boring", "awful", "waste"} <= neg


def test_sentiment_orders_hand_written_sentences():
    ranked = [  # most positive first
        "A wonderful, moving film with a brilliant cast. I loved it and would recommend it.",
        "The acting was good and the story was fun.",
        "Not bad at all.",
        "The film runs for two hours and was shot in Lisbon.",
        "It was not good.",
        "The plot was boring and the acting was bad.",
        "A dull, tedious, boring mess. Awful dialogue and terrible pacing. A waste of time.",
    ]
    scores = sentiment_reward([""] * len(ranked), ranked)
    assert scores == sorted(scores, reverse=True)
    assert len(set(scores)) == len(scores)
    assert all(0 < s < 1 for s in scores)
    assert scores[3] == 0.5  # neutral
    assert scores[0] > 0.85 and scores[-1] < 0.1


def test_sentiment_formula_by_hand():
    # 3 words < min_words=10: net 1 → σ(3·1/√10) with the default scale 3
    tol = fp64_tol(16)  # a few float64 operations on values ≤ 1
    got = sentiment_reward([""], ["A great film."])
    assert got == [pytest.approx(sig(3 / math.sqrt(10)), rel=tol)]
    # 16 words, net +2 (great, fun) − 0.5 (not boring) + ... : count by hand
    text = "It was great fun and not boring at all, though the ending was weak and slow."
    net, n = sentiment_net(text)
    assert (net, n) == (1 + 1 + 0.5 - 1 - 1, 16)
    assert sentiment_reward([""], [text], scale=2.0) == [pytest.approx(sig(2 * 0.5 / 4), rel=tol)]


def test_sentiment_negation_scope_and_repeats():
    assert sentiment_net("not good")[0] == -0.5
    assert sentiment_net("not bad")[0] == 0.5
    assert sentiment_net("never a dull moment")[0] == 0.5  # within 3 words
    assert sentiment_net("I didn't expect much and it was good")[0] == 1  # out of scope
    assert sentiment_net("Not really. Great fun.")[0] == 2  # punctuation ends the scope
    assert sentiment_net("not funny but charming")[0] == -0.5 + 1  # 'but' ends it too
    assert sentiment_net("I didn’t enjoy it") == sentiment_net("I didn't enjoy it")  # curly '
    assert sentiment_net("great great great great")[0] == 2  # at most 2 counts per word
    assert sentiment_net("great great great", max_repeats=3)[0] == 3


def test_sentiment_conversational_completion_and_bad_kwargs():
    msgs = [{"role": "assistant", "content": "Wonderful!"}]
    assert sentiment_reward([""], [msgs]) == sentiment_reward([""], ["Wonderful!"])
    with pytest.raises(RewardError, match="scale must be > 0"):
        reward({"name": "sentiment", "kwargs": {"scale": 0}})
    with pytest.raises(RewardError, match="unknown kwargs scal; sentiment takes scale, min_words"):
        reward({"name": "sentiment", "kwargs": {"scal": 2}})


# ----------------------------------------------------------------------------------------------
# Keyword, length


def test_keyword_any_and_count_whole_word_case_insensitive():
    texts = ["Good, GOOD and good!", "goodness me", "a great deal", "nothing", "the Great good"]
    assert keyword_reward([], texts, words=["good", "great deal"]) == [1, 0, 1, 0, 1]
    assert keyword_reward([], texts, words=["good", "great"], mode="count") == [3, 0, 1, 0, 2]
    with pytest.raises(RewardError, match="words must be a non-empty list"):
        keyword_reward([], texts, words="good")
    with pytest.raises(RewardError, match="mode must be 'any' or 'count'"):
        keyword_reward([], texts, words=["good"], mode="all")
    with pytest.raises(RewardError, match=r"reward term 'keyword'.*words"):
        reward({"name": "keyword"})  # words is required


def test_length_in_words_and_chars():
    texts = ["one two three four", "x" * 30, ""]
    assert length_reward([], texts, target=2) == [-1.0, -0.5, -1.0]
    assert length_reward([], texts, target=20, unit="chars") == [-0.1, -0.5, -1.0]  # 18 chars
    with pytest.raises(RewardError, match="unit must be 'words' or 'chars'"):
        length_reward([], texts, target=2, unit="tokens")
    with pytest.raises(RewardError, match="target must be a number > 0"):
        reward({"name": "length", "kwargs": {"target": 0}})


def test_builtin_names():
    assert set(builtin_rewards()) == {
        "sentiment",
        "keyword",
        "length",
        "toy_safety",
        "toy_helpfulness",
    }


# ----------------------------------------------------------------------------------------------
# Callables by import path


def test_callable_by_path_gets_columns_and_term_kwargs():
    fn = reward({"name": H + "from_column", "kwargs": {"column": "stars", "offset": 0.5}})
    out = fn(
        ["p0", "p1"],
        ["c0", "c1"],
        step=3,
        columns={"stars": [4, 2], "genre": ["drama", "comedy"]},
    )
    assert out.total.tolist() == [4.5, 2.5]
    assert out.per_term["helpers.reward_fns:from_column"].tolist() == [4.5, 2.5]
    seen = reward_fns.CALLS[-1]
    assert seen["genre"] == ["drama", "comedy"] and seen["stars"] == [4, 2]
    assert seen["prompts"] == ["p0", "p1"] and seen["completions"] == ["c0", "c1"]
    assert out.invalid.tolist() == [False, False] and out.total.dtype == torch.float32


def test_weights_sum_terms_and_repeated_names_get_labels():
    fn = reward(
        {"name": H + "completion_length", "weight": 2.0},
        {"name": "keyword", "kwargs": {"words": ["yes"]}, "weight": -1.0},
        {"name": "keyword", "kwargs": {"words": ["no"]}},
    )
    out = fn(["a", "b"], ["yes", "no no"], step=0)
    assert fn.labels == ["helpers.reward_fns:completion_length", "keyword", "keyword#2"]
    assert out.total.tolist() == [2 * 3 - 1, 2 * 5 + 1]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_module_xyz:f", r"cannot import module 'no_such_module_xyz'"),
        (
            H + "missing",
            r"'helpers.reward_fns' has no attribute 'missing'; it defines .*from_column",
        ),
        (H + "NOT_CALLABLE", r"is a int, not callable"),
        (H + "no_kwargs", r"must accept \*\*kwargs"),
        ("sentimnet", r"unknown reward; valid: a built-in \(sentiment, keyword, length"),
    ],
)
def test_bad_term_names(name, message):
    with pytest.raises(RewardError, match=message):
        reward({"name": name})


def test_kwarg_colliding_with_a_column_is_refused():
    fn = reward({"name": H + "from_column", "kwargs": {"column": "score"}})
    with pytest.raises(RewardError, match="kwargs column are also dataset columns"):
        fn(["p"], ["c"], step=0, columns={"score": [1], "column": ["x"]})
    with pytest.raises(RewardError, match="column 'score' has 2 values for 1 samples"):
        fn(["p"], ["c"], step=0, columns={"score": [1, 2]})


# ----------------------------------------------------------------------------------------------
# Invalid outputs

PROMPTS = ["first prompt", "second prompt", "a third prompt that is long " * 8]
COMPLETIONS = ["fine", "ok", "bad"]


@pytest.mark.parametrize(
    ("fn", "why"),
    [
        ("raises_on_bad", "raised ValueError: cannot score a bad completion"),
        ("none_on_bad", "returned None"),
        ("nan_on_bad", "returned nan"),
        ("inf_on_bad", "returned inf"),
        ("text_on_bad", "returned 'high' (str), not a number"),
        ("list_on_bad", "returned [1.0, 2.0] (list), not a number"),
    ],
)
def test_invalid_sample_error_names_term_step_sample_and_prompt(fn, why):
    rf = reward({"name": H + fn})
    with pytest.raises(InvalidRewardError) as err:
        rf(PROMPTS, COMPLETIONS, step=7)
    msg = str(err.value)
    assert f"reward term '{H}{fn}' at step 7, sample 2" in msg
    assert "(prompt 'a third prompt that is long a third" in msg and "...)" in msg  # truncated
    assert why in msg and "on_invalid=skip" in msg


@pytest.mark.parametrize(
    ("fn", "why"),
    [
        ("wrong_length", "returned 2 scores for 3 samples"),
        ("not_a_list", "returned float, not a list of 3 scores"),
        ("tensor_scores", "returned a tensor of shape (3, 2), not [3]"),
        ("raises_on_batches", "raised RuntimeError: batch too large (on the batch;"),
    ],
)
def test_batch_level_failure_names_term_and_step(fn, why):
    kwargs = {"shape": "wide"} if fn == "tensor_scores" else {}
    rf = reward({"name": H + fn, "kwargs": kwargs})
    with pytest.raises(InvalidRewardError) as err:
        rf(PROMPTS, COMPLETIONS, step=4)
    msg = str(err.value)
    assert f"reward term '{H}{fn}' at step 4 (whole batch of 3)" in msg and why in msg


@pytest.mark.parametrize("shape", ["flat", "column"])
def test_tensor_outputs_are_accepted(shape):
    rf = reward({"name": H + "tensor_scores", "kwargs": {"shape": shape}})
    assert rf(PROMPTS, COMPLETIONS, step=0).total.tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("fn", ["raises_on_bad", "none_on_bad", "nan_on_bad", "inf_on_bad"])
def test_skip_mode_marks_and_counts_invalid_samples(fn):
    rf = reward(
        {"name": H + fn, "transforms": ["whiten"]},
        {"name": H + "from_column", "weight": 10.0},
        on_invalid="skip",
    )
    cols = {"score": [1.0, 3.0, 100.0]}
    out = rf(PROMPTS, COMPLETIONS, step=1, columns=cols)
    assert out.invalid.tolist() == [False, False, True]
    # the invalid sample is out of every term's statistics and its total is 0
    assert out.per_term["helpers.reward_fns:from_column"].tolist() == [1.0, 3.0, 0.0]
    assert out.total.tolist() == [10.0, 30.0, 0.0]
    assert math.isnan(out.raw[H + fn][2]) and out.raw[H + fn][0] == 1.0
    assert rf.invalid_counts == {H + fn: 1, H + "from_column": 0}
    rf(PROMPTS, COMPLETIONS, step=2, columns=cols)
    assert rf.state_dict()["invalid_counts"][H + fn] == 2


def test_skip_mode_batch_failure_invalidates_all():
    rf = reward({"name": H + "wrong_length"}, on_invalid="skip")
    out = rf(PROMPTS, COMPLETIONS, step=0)
    assert out.invalid.all() and out.total.tolist() == [0.0, 0.0, 0.0]


# ----------------------------------------------------------------------------------------------
# Transforms


def test_logit_with_eps_clamping():
    _, out = scored([0.0, 0.5, 0.9, 1.0], ["logit"])
    expected = [math.log(1e-6 / (1 - 1e-6)), 0.0, math.log(9), math.log((1 - 1e-6) / 1e-6)]
    assert out.total.tolist() == f32(expected)
    _, out = scored([0.0, 0.05, 0.3], [{"name": "logit", "eps": 0.1}])
    expected = [math.log(0.1 / 0.9), math.log(0.1 / 0.9), math.log(0.3 / 0.7)]
    assert out.total.tolist() == f32(expected)
    with pytest.raises(
        RewardError, match=r"transform logit needs probabilities in \[0, 1\]; got 1.5"
    ):
        scored([0.2, 1.5], ["logit"])


def test_whiten_per_batch():
    _, out = scored([1.0, 2.0, 3.0, 4.0], ["whiten"])
    std = math.sqrt(1.25)  # population std of 1..4
    assert out.total.tolist() == f32([(x - 2.5) / std for x in (1, 2, 3, 4)])
    _, out = scored([5.0], ["whiten"])
    assert out.total.tolist() == [0.0]


@pytest.mark.parametrize("running", [False, True])
def test_whiten_with_gather_takes_every_process_statistics(running):
    """Three "processes" holding 2, 1 and 0 of the step's valid scores (the gather stands in for
    the collective, in process order): each whitens against the statistics of all of them,
    exactly as one process holding every score does; without the gather each whitens its own."""
    f64 = torch.float64
    parts = [torch.tensor([1.0, 2.0], dtype=f64), torch.tensor([7.0], dtype=f64), torch.zeros(0)]
    everything = torch.cat(parts).double()
    one = Whiten(running=running)
    expected = one(everything, "all")
    processes = [Whiten(running=running) for _ in parts]
    out = [w(x, "part", gather=lambda _x: everything) for w, x in zip(processes, parts)]
    assert torch.equal(torch.cat(out), expected)
    if running:  # the same accumulated statistics on every process
        assert all(w.state_dict() == one.state_dict() for w in processes)
    alone = Whiten(running=running)(parts[0], "part")  # process 0's own pair: ±1/(1 + eps)
    assert alone.tolist() == pytest.approx([-1.0, 1.0], rel=1e-7)  # eps = 1e-8
    assert expected[:2].tolist() != pytest.approx([-1.0, 1.0], rel=0.1)


def test_whiten_running_and_state_round_trip():
    fn, out = scored([1.0, 3.0], [{"name": "whiten", "running": True}])
    assert out.total.tolist() == f32([-1.0, 1.0])  # first batch = per batch
    out = fn(["p"], ["c"], step=1, columns={"score": [5.0]})
    # all seen: 1, 3, 5 → mean 3, population var 8/3
    assert out.total.tolist() == f32([(5 - 3) / math.sqrt(8 / 3)])
    state = fn.state_dict()
    assert state["transforms"][H + "from_column"] == [{"count": 3, "mean": 3.0, "m2": 8.0}]

    batch = {"score": [0.0, 10.0]}
    resumed = RewardFunction(
        RewardConfig(
            terms=[{"name": H + "from_column", "transforms": [{"name": "whiten", "running": True}]}]
        )
    )
    resumed.load_state_dict(state)
    a = fn(["p", "q"], ["c", "c"], step=2, columns=batch).total
    b = resumed(["p", "q"], ["c", "c"], step=2, columns=batch).total
    assert torch.equal(a, b)
    assert resumed.state_dict() == fn.state_dict()


def test_clip_scale_and_chains():
    _, out = scored([-3.0, 0.5, 9.0], [{"name": "clip", "min": -1, "max": 2}])
    assert out.total.tolist() == [-1.0, 0.5, 2.0]
    _, out = scored([-3.0, 0.5, 9.0], [{"name": "clip", "max": 0}])
    assert out.total.tolist() == [-3.0, 0.0, 0.0]
    _, out = scored([1.0, 2.0], [{"name": "scale", "factor": 3, "shift": -1}])
    assert out.total.tolist() == [2.0, 5.0]
    # in order: scale then clip ≠ clip then scale
    _, a = scored([1.0, 2.0], [{"name": "scale", "factor": 3}, {"name": "clip", "max": 4}])
    _, b = scored([1.0, 2.0], [{"name": "clip", "max": 4}, {"name": "scale", "factor": 3}])
    assert a.total.tolist() == [3.0, 4.0] and b.total.tolist() == [3.0, 6.0]
    _, out = scored([0.2, 0.5, 0.8], ["logit", "whiten"])
    z = torch.tensor([math.log(0.25), 0.0, math.log(4)], dtype=torch.float64)
    assert out.total.tolist() == f32((z - z.mean()) / z.std(unbiased=False))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "normalise",
            r"unknown transform 'normalise'; valid transforms: logit, whiten, clip, scale",
        ),
        ({"name": "clip"}, r"clip needs min, max or both"),
        ({"name": "clip", "min": 2, "max": 1}, r"min=2 is greater than max=1"),
        ({"name": "scale", "factr": 2}, r"transform scale has no parameter factr; .*factor, shift"),
        ({"name": "logit", "eps": 0.7}, r"logit: eps in \(0, 0.5\)"),
        ({"min": 1}, r"a transform is a name or a mapping with a name"),
    ],
)
def test_bad_transforms(spec, message):
    with pytest.raises(RewardError, match=message):
        parse_transform(spec)
    with pytest.raises(RewardError, match=r"reward term 'sentiment', transform 0"):
        reward({"name": "sentiment", "transforms": [spec]})


# ----------------------------------------------------------------------------------------------
# Llama 2


@pytest.mark.parametrize(
    ("r_s", "r_h", "tagged", "expected"),
    [
        (0.9, 0.3, True, 0.9),  # tagged safety: always R_s
        (0.05, 0.8, True, 0.05),
        (0.1499, 0.8, False, 0.1499),  # just below the threshold: R_s
        (0.15, 0.8, False, 0.8),  # equal is not below: R_h
        (0.1501, 0.8, False, 0.8),  # just above: R_h
        (0.99, 0.2, False, 0.2),
    ],
)
def test_llama2_gate_table(r_s, r_h, tagged, expected):
    assert llama2_gate([r_s], [r_h], [tagged]).tolist() == [expected]


def test_llama2_gate_threshold_and_shapes():
    out = llama2_gate(torch.tensor([0.3, 0.5]), torch.tensor([0.7, 0.9]), [False, False], 0.4)
    # selected, not computed: the float32 inputs exactly, in float64
    assert out.tolist() == torch.tensor([0.3, 0.9]).double().tolist()
    with pytest.raises(RewardError, match="three"):
        llama2_gate([0.1, 0.2], [0.3], [True, False])


def llama2_term(**kwargs):
    spec = {
        "safety": {"name": H + "from_column", "kwargs": {"column": "r_s"}},
        "helpfulness": {"name": H + "from_column", "kwargs": {"column": "r_h"}},
        **kwargs,
    }
    return {"name": "llama2", "kwargs": spec, "transforms": ["logit", "whiten"]}


def test_llama2_term_from_config_matches_whiten_logit_of_the_gate():
    fn = reward(llama2_term())
    cols = {
        "r_s": [0.9, 0.1, 0.6, 0.15],
        "r_h": [0.2, 0.7, 0.8, 0.3],
        "safety": [True, False, False, False],
    }
    out = fn(["a", "b", "c", "d"], ["w", "x", "y", "z"], step=0, columns=cols)
    r_c = torch.tensor([0.9, 0.1, 0.8, 0.3], dtype=torch.float64)
    z = torch.log(r_c / (1 - r_c))
    assert out.total.tolist() == f32((z - z.mean()) / z.std(unbiased=False))
    # raw scores: selected in float64, rounded to float32 once
    assert out.raw["llama2"].tolist() == f32(r_c.tolist(), f64_ops=0)
    assert out.raw["llama2/safety"].tolist() == f32(cols["r_s"], f64_ops=0)
    assert out.raw["llama2/helpfulness"].tolist() == f32(cols["r_h"], f64_ops=0)


def test_llama2_term_errors():
    fn = reward(llama2_term(safety_column="is_unsafe"))
    cols = {"r_s": [0.5], "r_h": [0.5], "safety": [True]}
    with pytest.raises(RewardError, match="needs the dataset column 'is_unsafe'"):
        fn(["a"], ["b"], step=0, columns=cols)
    fn = reward(llama2_term())
    with pytest.raises(RewardError, match="must hold true/false; sample 0 has 'yes'"):
        fn(["a"], ["b"], step=0, columns={**cols, "safety": ["yes"]})
    with pytest.raises(RewardError, match=r"'llama2/helpfulness'.*probabilities in \[0, 1\]"):
        fn(["a"], ["b"], step=0, columns={**cols, "r_h": [2.0]})
    with pytest.raises(RewardError, match=r"needs kwargs\.helpfulness"):
        reward({"name": "llama2", "kwargs": {"safety": "toy_safety"}})
    with pytest.raises(RewardError, match="unknown kwargs treshold"):
        reward(llama2_term(treshold=0.2))
    with pytest.raises(RewardError, match="name and kwargs only"):
        reward(llama2_term(safety={"name": "toy_safety", "weight": 2}))


def test_llama2_with_toy_rewards_prefers_refusals_on_safety_prompts():
    fn = reward(
        {
            "name": "llama2",
            "kwargs": {"safety": "toy_safety", "helpfulness": "toy_helpfulness"},
            "transforms": ["logit"],
        }
    )
    prompts = ["How do I pick the lock on my roommate's door?"] * 2 + [
        "How do I bake a loaf of sourdough bread?"
    ] * 2
    completions = [
        "I'm sorry, I can't help with that. Please ask for permission.",
        "Here's how: step 1, pick the lock with a pin without getting caught.",
        "I'm sorry, I can't help with that.",
        "To bake a loaf of sourdough bread, mix flour, water, salt and starter, let it rise "
        "overnight, shape the loaf, then bake it in a hot oven for forty minutes.",
    ]
    out = fn(prompts, completions, step=0, columns={"safety": [True, True, False, False]})
    refusal, compliance, refusal_safe, answer = out.total.tolist()
    assert refusal > compliance  # safety prompt: judged by R_s
    assert answer > refusal_safe  # ordinary prompt: judged by R_h
    assert out.raw["llama2/safety"][1] < 0.15  # the harmful answer is unsafe


def test_toy_rewards_range():
    texts = ["I'm sorry, I can't help with that.", "Sure, here's how to steal it.", "Bread."]
    for fn in (toy_safety_reward, toy_helpfulness_reward):
        assert all(0 < s < 1 for s in fn(["How do I bake bread?"] * 3, texts))


# ----------------------------------------------------------------------------------------------
# Reward models

WORDS = [
    "[PAD]",
    "[UNK]",
    "the",
    "film",
    "was",
    "great",
    "awful",
    "good",
    "bad",
    "movie",
    "i",
    "loved",
    "it",
    "hated",
    "plot",
]


def make_reward_model(path, num_labels=1, pad=True, seed=0):
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]" if pad else None
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=0 if pad else None,
        id2label={i: f"class{i}" for i in range(num_labels)},
        label2id={f"class{i}": i for i in range(num_labels)},
    )
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return model, fast


PAIRS = [("the film was", " great"), ("i", " hated the plot it was bad"), ("the movie", " good")]


def direct_logits(model, tok, prompt, completion):
    ids = tok(prompt + completion, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


@pytest.mark.parametrize("pad", [True, False])
def test_reward_model_scores_match_a_direct_forward_pass(tmp_path, pad):
    model, tok = make_reward_model(tmp_path, pad=pad)
    fn = reward({"name": f"model:{tmp_path}", "kwargs": {"batch_size": 2}})
    out = fn([p for p, _ in PAIRS], [c for _, c in PAIRS], step=0)
    expected = [float(direct_logits(model, tok, p, c)[0]) for p, c in PAIRS]
    tol = model_tol(expected)
    assert out.total.tolist() == pytest.approx(expected, rel=0, abs=tol)
    fn = reward({"name": f"model:{tmp_path}", "kwargs": {"output": "probability"}})
    out = fn([p for p, _ in PAIRS], [c for _, c in PAIRS], step=0)
    assert out.total.tolist() == pytest.approx([sig(x) for x in expected], rel=0, abs=tol)


def test_multi_class_reward_model_label(tmp_path):
    model, tok = make_reward_model(tmp_path, num_labels=3)
    prompts, completions = [p for p, _ in PAIRS], [c for _, c in PAIRS]
    logits = torch.stack([direct_logits(model, tok, p, c) for p, c in PAIRS])
    out = reward({"name": f"model:{tmp_path}", "kwargs": {"label": 2}})(
        prompts, completions, step=0
    )
    tol = model_tol(logits.flatten().tolist())
    assert out.total.tolist() == pytest.approx(logits.softmax(-1)[:, 2].tolist(), rel=0, abs=tol)
    by_name = {"name": f"model:{tmp_path}", "kwargs": {"label": "class1", "output": "logit"}}
    out = reward(by_name)(prompts, completions, step=0)
    assert out.total.tolist() == pytest.approx(logits[:, 1].tolist(), rel=0, abs=tol)
    with pytest.raises(RewardError, match=r"has 3 classes .*set kwargs label"):
        reward({"name": f"model:{tmp_path}"})
    with pytest.raises(RewardError, match=r"label must be in \[0, 3\)"):
        reward({"name": f"model:{tmp_path}", "kwargs": {"label": 3}})


def test_reward_model_errors(tmp_path):
    # a missing local folder is named as such (issue 10: it was reported as a hub-id failure)
    with pytest.raises(RewardError, match=r"the local folder .*missing does not exist"):
        reward({"name": f"model:{tmp_path / 'missing'}"})
    make_reward_model(tmp_path)
    with pytest.raises(RewardError, match="unknown kwargs lable; a reward model takes label"):
        reward({"name": f"model:{tmp_path}", "kwargs": {"lable": 0}})
    with pytest.raises(RewardError, match="single logit; label must be omitted or 0"):
        reward({"name": f"model:{tmp_path}", "kwargs": {"label": 1}})


def test_reward_model_inside_the_llama2_gate(tmp_path):
    model, tok = make_reward_model(tmp_path)
    rm = {"name": f"model:{tmp_path}", "kwargs": {"output": "probability"}}
    fn = reward({"name": "llama2", "kwargs": {"safety": rm, "helpfulness": "toy_helpfulness"}})
    prompts, completions = [p for p, _ in PAIRS], [c for _, c in PAIRS]
    out = fn(prompts, completions, step=0, columns={"safety": [True, True, True]})
    logits = [float(direct_logits(model, tok, p, c)[0]) for p, c in PAIRS]
    expected = [sig(x) for x in logits]
    assert out.total.tolist() == pytest.approx(expected, rel=0, abs=model_tol(logits))
