"""Tiny random causal LMs with a real (small) BPE tokenizer, built offline in a few hundred ms,
so that the loop can be exercised end to end on CPU in unit tests."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<|endoftext|>", "<|pad|>"]


@lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    from importlib.resources import files

    text = files("kltrain").joinpath("prompts/movie_reviews.jsonl").read_text()
    prompts = [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
    extra = ["great wonderful awful terrible good bad movie film plot acting loved hated"] * 5
    return tuple(prompts + extra)


def make_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        padding_side="left",
    )


def make_tiny_model_dir(
    path: Path, seed: int = 0, hidden: int = 32, layers: int = 2, tied: bool = False
) -> Path:
    """Save a tiny random Llama and its tokenizer as a normal transformers folder; ``tied``: its
    lm_head is its input embedding (as in the embedded smollm2-135m)."""
    tok = make_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def loop_config_raw(model_path: str, out, **sections) -> dict:
    """A raw config for 2 quick steps of the loop on a tiny model: RLOO, exact reverse KL in
    the loss, a reward tiny models can move, no W&B. ``sections`` update a section's keys."""
    raw = {
        "name": "tiny",
        "model": {"policy": str(model_path)},
        "data": {
            "prompts": "builtin:movie_reviews",
            "chat_template": "off",
            "max_prompt_tokens": 16,
        },
        "generation": {"max_new_tokens": 6},
        "reward": {"terms": [{"name": "tests.helpers.loop_rewards:letter_e_count"}]},
        "kl": {"divergence": "reverse_kl", "estimator": "exact", "placement": "loss", "coef": 0.1},
        "algorithm": {"name": "rloo", "num_generations": 2},
        "trainer": {
            "max_steps": 2,
            "prompts_per_step": 2,
            "micro_batch_size": 4,
            "learning_rate": 1e-3,
            "output_dir": str(out),
            "log_samples_every": 1,
        },
        "tracking": {"wandb": {"mode": "disabled"}, "progress": False},
    }
    return update_sections(raw, sections)


def update_sections(raw: dict, sections: dict) -> dict:
    """Update each named section's keys in place (other keys of the section are kept)."""
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def tiny_tied_llama(layers: int = 2) -> LlamaForCausalLM:
    """A tiny random Llama in memory (50 tokens, hidden 16, no tokenizer) whose lm_head is its
    input embedding: for checkpoint round trips of tied weights."""
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)
