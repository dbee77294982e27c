"""Prompts longer than ``data.max_prompt_tokens`` (after the chat template).

``generate`` keeps the *end* of a long prompt (left truncation): the end holds the user's last
words and, with a chat template, the assistant header the completion must follow; cutting the
right would make the model continue the system prompt instead. ``data.on_long_prompt`` chooses:

- ``truncate`` (default): keep the last ``max_prompt_tokens`` tokens; each step counts the
  samples whose prompt was cut (``data/truncated_prompts``);
- ``skip``: drop those rows from the dataset at start-up (the count is printed);
- ``error``: stop at start-up naming the first rows and their lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kltrain.config import DataConfig
from kltrain.data import DataError, render_prompt


def prompt_lengths(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Tokens of each rendered prompt text, tokenized as ``generate`` does (no special tokens
    added: the chat template writes its own)."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [len(row) for row in ids]


def count_truncated(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> int:
    return sum(n > max_tokens for n in prompt_lengths(tokenizer, texts))


def screen_long_prompts(dataset: Any, tokenizer: Any, cfg: DataConfig) -> Any:
    """``dataset`` as the run will use it under ``cfg.on_long_prompt`` (see the module doc):
    unchanged for ``truncate``; without the long rows for ``skip``; an error for ``error``."""
    if cfg.on_long_prompt == "truncate":
        return dataset
    texts = [
        render_prompt(tokenizer, p, cfg.chat_template, cfg.system_prompt) for p in dataset["prompt"]
    ]
    lengths = prompt_lengths(tokenizer, texts)
    long = [i for i, n in enumerate(lengths) if n > cfg.max_prompt_tokens]
    if not long:
        return dataset
    shown = ", ".join(f"row {i} ({lengths[i]} tokens)" for i in long[:5])
    more = f" and {len(long) - 5} more" if len(long) > 5 else ""
    if cfg.on_long_prompt == "error":
        raise DataError(
            f"{cfg.prompts}: {len(long)} prompt(s) are longer than "
            f"data.max_prompt_tokens={cfg.max_prompt_tokens} after the chat template: "
            f"{shown}{more} (rows count from 0). Raise data.max_prompt_tokens, or set "
            f"data.on_long_prompt to truncate (keep each prompt's end) or skip (drop them)"
        )
    if len(long) == len(lengths):
        raise DataError(
            f"{cfg.prompts}: every prompt is longer than data.max_prompt_tokens="
            f"{cfg.max_prompt_tokens} (data.on_long_prompt=skip would drop them all); raise it"
        )
    print(
        f"kltrain: data.on_long_prompt=skip: dropped {len(long)} of {len(lengths)} prompts "
        f"longer than data.max_prompt_tokens={cfg.max_prompt_tokens}: {shown}{more}",
        flush=True,
    )
    drop = set(long)
    return dataset.select([i for i in range(len(lengths)) if i not in drop])
