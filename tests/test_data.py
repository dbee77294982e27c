"""kltrain.data: prompt loading in every format, validation messages, chat templates, the
seeded resumable sampler and per-process shares."""

from __future__ import annotations

import json

import datasets
import pandas as pd
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kltrain.config import DataConfig
from kltrain.data import (
    DataError,
    PromptSampler,
    builtin_prompt_sets,
    load_prompts,
    process_share,
    render_prompt,
)

ROWS = [
    {"text": "I just watched", "genre": "drama", "stars": 4},
    {"text": "My thoughts on the new thriller", "genre": "thriller", "stars": 2},
    {"text": "Review of the film 'The Last Harbor':", "genre": "thriller", "stars": 5},
]
CHAT = [
    {"prompt": [{"role": "user", "content": "Review a film."}], "id": 0},
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Review another film."},
        ],
        "id": 1,
    },
]


def write(tmp_path, fmt: str, rows: list[dict]) -> str:
    path = tmp_path / f"prompts.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif fmt == "parquet":
        pd.DataFrame(rows).to_parquet(path, index=False)
    return str(path)


# ----------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_each_local_format_renames_the_prompt_column_and_keeps_the_rest(tmp_path, fmt):
    ds = load_prompts(DataConfig(prompts=write(tmp_path, fmt, ROWS), prompt_column="text"))
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["prompt", "genre", "stars"]
    assert ds["prompt"] == [r["text"] for r in ROWS]
    assert ds["genre"] == [r["genre"] for r in ROWS]
    assert ds["stars"] == [4, 2, 5]


def test_json_object_of_columns(tmp_path):
    path = tmp_path / "cols.json"
    path.write_text(json.dumps({"prompt": ["a b", "c d"], "safety": [True, False]}))
    ds = load_prompts(DataConfig(prompts=str(path)))
    assert ds["prompt"] == ["a b", "c d"]
    assert ds["safety"] == [True, False]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_conversational_prompts_load_as_message_lists(tmp_path, fmt):
    ds = load_prompts(DataConfig(prompts=write(tmp_path, fmt, CHAT)))
    assert ds[1]["prompt"] == CHAT[1]["prompt"]
    assert ds["id"] == [0, 1]


def test_builtin_sets():
    assert {"movie_reviews", "safety_mix"} <= set(builtin_prompt_sets())
    movies = load_prompts(DataConfig(prompts="builtin:movie_reviews"))
    assert len(movies) >= 200
    assert len(set(movies["prompt"])) == len(movies)  # no duplicates
    assert "genre" in movies.column_names
    assert all(isinstance(p, str) and 0 < len(p) <= 80 for p in movies["prompt"])
    safety = load_prompts(DataConfig(prompts="builtin:safety_mix"))
    assert len(safety) >= 40
    assert set(safety["safety"]) == {True, False}
    assert all(isinstance(s, bool) for s in safety["safety"])


def test_unknown_builtin_lists_the_available_sets():
    with pytest.raises(DataError, match=r"no built-in prompt set 'nope'.*builtin:movie_reviews"):
        load_prompts(DataConfig(prompts="builtin:nope"))


def test_missing_column_names_column_source_and_existing_columns(tmp_path):
    path = write(tmp_path, "jsonl", ROWS)
    with pytest.raises(DataError) as err:
        load_prompts(DataConfig(prompts=path, prompt_column="question"))
    msg = str(err.value)
    assert "'question'" in msg and path in msg and "text, genre, stars" in msg


def test_empty_file_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="has no rows"):
        load_prompts(DataConfig(prompts=str(path), prompt_column="prompt"))
    csv = tmp_path / "empty.csv"
    csv.write_text("prompt,genre\n")
    with pytest.raises(DataError, match="has no rows"):
        load_prompts(DataConfig(prompts=str(csv)))


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("   ", r"row 1: the prompt is empty"),
        (7, r"row 1: a prompt must be a string or a list of \{role, content\} messages; got int"),
        ([], r"row 1: the conversational prompt has no messages"),
        ([{"role": "user"}], r"row 1: message 0 needs string content"),
        (["hi"], r"row 1: message 0 is a str"),
    ],
)
def test_bad_row_is_named_by_index(tmp_path, prompt, expected):
    rows = [{"prompt": "fine"}, {"prompt": prompt}] if not isinstance(prompt, list) else None
    if rows is None:  # keep one format per file so the message is about the row itself
        rows = [{"prompt": [{"role": "user", "content": "ok"}]}, {"prompt": prompt}]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=expected):
        load_prompts(DataConfig(prompts=str(path)))


def test_mixed_formats_are_refused(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": "a"}, {"prompt": "b"}, {"prompt": [{"role": "user", "content": "c"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="row 2 is a conversational prompt but row 0 is standard"):
        load_prompts(DataConfig(prompts=str(path)))


def test_bad_jsonl_line_and_file_errors(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_prompts(DataConfig(prompts=str(path)))
    with pytest.raises(DataError, match="file not found"):
        load_prompts(DataConfig(prompts=str(tmp_path / "missing.csv")))
    other = tmp_path / "prompts.txt"
    other.write_text("hello")
    with pytest.raises(DataError, match=r"unsupported extension '\.txt'.*\.jsonl"):
        load_prompts(DataConfig(prompts=str(other)))


def test_prompt_column_clash_and_reserved_names(tmp_path):
    path = write(tmp_path, "jsonl", [{"prompt": "x", "question": "y"}])
    with pytest.raises(DataError, match="already has a 'prompt' column"):
        load_prompts(DataConfig(prompts=path, prompt_column="question"))
    path = write(tmp_path, "jsonl", [{"prompt": "x", "completions": "y"}])
    with pytest.raises(DataError, match=r"'completions'.*collide"):
        load_prompts(DataConfig(prompts=path))


def test_split_is_for_hub_datasets_only(tmp_path):
    with pytest.raises(DataError, match=r"data.split='test'.*hub datasets only"):
        load_prompts(DataConfig(prompts="builtin:movie_reviews", split="test"))


def test_hub_dataset_fails_clearly_offline(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"loaded as a hub dataset.*Offline, use a built-in set"):
        load_prompts(DataConfig(prompts="no-such-user/no-such-prompts-xyz"))


# ----------------------------------------------------------------------------------------------
# Chat templates

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "[PAD]": 1, "review": 2, "film": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def test_string_prompt_with_template_auto_and_on():
    tok = tiny_tokenizer(TEMPLATE)
    expected = "<|user|>I just watched<|end|><|assistant|>"
    assert render_prompt(tok, "I just watched") == expected
    assert render_prompt(tok, "I just watched", "on") == expected
    assert render_prompt(tok, "I just watched", "off") == "I just watched"


def test_string_prompt_without_template():
    tok = tiny_tokenizer(None)
    assert render_prompt(tok, "I just watched", "auto") == "I just watched"
    assert render_prompt(tok, "I just watched", "off") == "I just watched"
    with pytest.raises(DataError, match="chat_template='on' needs a chat template"):
        render_prompt(tok, "I just watched", "on")
    with pytest.raises(DataError, match="system_prompt needs a chat template"):
        render_prompt(tok, "I just watched", "auto", system_prompt="Be kind.")


def test_conversational_prompt_needs_a_template():
    msgs = [{"role": "user", "content": "Review a film."}]
    with pytest.raises(DataError, match="conversational prompts need a chat template"):
        render_prompt(tiny_tokenizer(None), msgs)
    with pytest.raises(DataError, match="chat_template='off'"):
        render_prompt(tiny_tokenizer(TEMPLATE), msgs, "off")
    out = render_prompt(tiny_tokenizer(TEMPLATE), msgs)
    assert out == "<|user|>Review a film.<|end|><|assistant|>"


def test_system_prompt_is_prepended_once():
    tok = tiny_tokenizer(TEMPLATE)
    out = render_prompt(tok, "Hi", system_prompt="Be kind.")
    assert out == "<|system|>Be kind.<|end|><|user|>Hi<|end|><|assistant|>"
    with pytest.raises(DataError, match="already has a system message"):
        render_prompt(tok, CHAT[1]["prompt"], system_prompt="Be kind.")
    with pytest.raises(DataError, match="valid values: auto, on, off"):
        render_prompt(tok, "Hi", "yes")


# ----------------------------------------------------------------------------------------------
# Sampler


def test_sampler_is_deterministic_and_seed_dependent():
    a = PromptSampler(50, seed=3).next_batch(120)
    assert a == PromptSampler(50, seed=3).next_batch(120)
    assert a != PromptSampler(50, seed=4).next_batch(120)
    assert a[:50] != list(range(50))  # actually shuffled


def test_every_index_once_per_epoch_and_epochs_differ():
    s = PromptSampler(10, seed=0)
    epochs = [s.next_batch(10) for _ in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(10))
    assert epochs[0] != epochs[1]
    assert s.state_dict() == {"epoch": 3, "position": 0, "seed": 0, "num_prompts": 10}


def test_batches_cross_epoch_boundaries_seamlessly():
    reference = PromptSampler(7, seed=1)
    whole = reference.next_batch(7) + reference.next_batch(7) + reference.next_batch(7)
    s = PromptSampler(7, seed=1)
    pieces = s.next_batch(3) + s.next_batch(5) + s.next_batch(13)  # 5 crosses, 13 spans two
    assert pieces == whole
    assert s.state_dict()["epoch"] == 3 and s.state_dict()["position"] == 0


def test_no_shuffle_is_in_order():
    s = PromptSampler(4, seed=9, shuffle=False)
    assert s.next_batch(6) == [0, 1, 2, 3, 0, 1]


def test_resume_mid_epoch_continues_the_same_order():
    uninterrupted = PromptSampler(11, seed=5)
    expected = [uninterrupted.next_batch(4) for _ in range(8)]

    first = PromptSampler(11, seed=5)
    got = [first.next_batch(4) for _ in range(3)]  # stops at epoch 1, position 1
    state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
    assert state == {"epoch": 1, "position": 1, "seed": 5, "num_prompts": 11}
    resumed = PromptSampler(11, seed=123)  # the state's seed wins
    resumed.load_state_dict(state)
    got += [resumed.next_batch(4) for _ in range(5)]
    assert got == expected


def test_sampler_state_errors():
    s = PromptSampler(5, seed=0)
    with pytest.raises(DataError, match="saved for 6 prompts but the dataset now has 5"):
        s.load_state_dict({"epoch": 0, "position": 0, "seed": 0, "num_prompts": 6})
    with pytest.raises(DataError, match="lacks position"):
        s.load_state_dict({"epoch": 0, "seed": 0})
    with pytest.raises(DataError, match="out of range"):
        s.load_state_dict({"epoch": 0, "position": 5, "seed": 0})
    with pytest.raises(DataError, match="n ≥ 1"):
        s.next_batch(0)
    with pytest.raises(DataError, match="num_prompts ≥ 1"):
        PromptSampler(0, seed=0)


def test_process_share():
    idx = [9, 8, 7, 6, 5, 4]
    shares = [process_share(idx, r, 3) for r in range(3)]
    assert shares == [[9, 8], [7, 6], [5, 4]]
    assert process_share(idx, 0, 1) == idx
    with pytest.raises(DataError, match="6 prompts do not split evenly over 4 processes"):
        process_share(idx, 0, 4)
    with pytest.raises(DataError, match=r"rank must be in \[0, 2\)"):
        process_share(idx, 2, 2)
