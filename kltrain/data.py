"""Prompt datasets, prompt formats, chat templates and a seeded, resumable prompt sampler.

Prompts come from `data.prompts` (see :func:`load_prompts`) in one of TRL's two prompt formats:

- *standard*: the prompt is a string, e.g. ``"Review of the film 'The Last Harbor':"``;
- *conversational*: the prompt is a list of messages ``[{"role": "user", "content": "..."}]``.

Every other column of the dataset is kept: the trainer repeats it per sample and passes it to
reward callables as keyword arguments (as TRL does), e.g. ``genre=[...]`` or ``safety=[...]``.

Order: :class:`PromptSampler` draws a fresh permutation of ``range(num_prompts)`` per epoch from
``(seed, epoch)``, so a run resumed from ``state_dict()`` sees exactly the prompts it would
have seen uninterrupted; :func:`process_share` then gives each process its contiguous slice.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, get_args

import datasets
import numpy as np

from kltrain.config import ChatTemplateMode, DataConfig

BUILTIN_PREFIX = "builtin:"
LOCAL_FORMATS = (".jsonl", ".json", ".csv", ".parquet")
CHAT_TEMPLATE_MODES: tuple[str, ...] = get_args(ChatTemplateMode)
# Keyword names the reward call itself uses; a dataset column with one of these names would
# collide with them when columns are passed to reward callables as kwargs.
RESERVED_COLUMNS = ("prompts", "completions")
#: Rows are dataset indices (from 0); a .jsonl's "line N" is the file's line (from 1, as editors
#: show it). Every row message says which, since the two differ by one on the same line.
ROWS_FROM_0 = "(rows count from 0, file lines from 1)"


class DataError(ValueError):
    """A problem with the prompt data, phrased for the user: names the source, column or row."""


# ----------------------------------------------------------------------------------------------
# Loading


def builtin_prompt_sets() -> list[str]:
    """Names of the prompt sets shipped in ``kltrain/prompts/`` (usable as ``builtin:<name>``)."""
    folder = resources.files("kltrain") / "prompts"
    return sorted(p.name[: -len(".jsonl")] for p in folder.iterdir() if p.name.endswith(".jsonl"))


def load_prompts(cfg: DataConfig) -> datasets.Dataset:
    """Load, validate and normalise the prompt dataset named by ``cfg.prompts``.

    Sources:

    - ``builtin:<name>``: ``kltrain/prompts/<name>.jsonl`` (see :func:`builtin_prompt_sets`);
    - a local ``.jsonl`` (one object per line), ``.json`` (a list of objects, or one object of
      equal-length column lists), ``.csv`` or ``.parquet`` file;
    - anything else is treated as a Hugging Face hub dataset id (or a local dataset folder)
      and loaded with ``datasets.load_dataset(id, split=cfg.split)``; offline this fails with
      an error that says so.

    ``cfg.split`` applies to hub datasets only; built-in sets and local files have one split,
    so any other value than ``"train"`` is an error rather than silently ignored.

    Returns a ``Dataset`` of N ≥ 1 rows whose ``cfg.prompt_column`` is renamed to ``"prompt"``,
    all other columns kept. Every row is checked: a standard prompt is a non-blank string, a
    conversational prompt a non-empty list of ``{"role": str, "content": str}`` messages, and
    all rows use the same format. Errors name the source and the row index.
    """
    source = cfg.prompts
    if source.startswith(BUILTIN_PREFIX):
        _require_train_split(cfg, source)
        ds = _load_builtin(source[len(BUILTIN_PREFIX) :], cfg.prompt_column)
    elif Path(source).suffix.lower() in LOCAL_FORMATS or Path(source).is_file():
        _require_train_split(cfg, source)
        ds = _load_local(Path(source), cfg.prompt_column)
    else:
        ds = _load_hub(source, cfg.split)
    return _normalise(ds, cfg.prompt_column, source)


def _require_train_split(cfg: DataConfig, source: str) -> None:
    if cfg.split != "train":
        raise DataError(
            f"data.split={cfg.split!r}: {source} has a single split; data.split applies to hub "
            f"datasets only, so leave it at 'train' here"
        )


def _load_builtin(name: str, column: str) -> datasets.Dataset:
    available = builtin_prompt_sets()
    if name not in available:
        raise DataError(
            f"data.prompts: no built-in prompt set {name!r}; built-in sets: "
            + ", ".join(f"builtin:{n}" for n in available)
        )
    path = resources.files("kltrain") / "prompts" / f"{name}.jsonl"
    source = f"builtin:{name}"
    return _rows_to_dataset(_read_jsonl(path.read_text(encoding="utf-8"), source), column, source)


def _load_local(path: Path, column: str) -> datasets.Dataset:
    suffix = path.suffix.lower()
    if suffix not in LOCAL_FORMATS:
        raise DataError(
            f"data.prompts: {path} has an unsupported extension {suffix or '(none)'!r}; "
            f"local prompt files must be one of {', '.join(LOCAL_FORMATS)}"
        )
    if not path.is_file():
        raise DataError(f"data.prompts: file not found: {path}")
    try:
        if suffix in (".jsonl", ".json"):
            read = _read_jsonl if suffix == ".jsonl" else _read_json
            rows = read(path.read_text(encoding="utf-8"), str(path))
            return _rows_to_dataset(rows, column, str(path))
        if suffix == ".csv":
            import pandas as pd

            frame = pd.read_csv(path, keep_default_na=False)
            return datasets.Dataset.from_pandas(frame, preserve_index=False)
        import pyarrow.parquet as pq

        return datasets.Dataset(pq.read_table(path))
    except DataError:
        raise
    except Exception as err:  # a parser's own error, re-raised with the file named
        raise DataError(f"data.prompts: could not read {path}: {err}") from err


def _read_jsonl(text: str, source: str) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{source}: line {lineno} is not valid JSON: {err}") from err
        if not isinstance(row, dict):
            raise DataError(
                f"{source}: line {lineno} is a {type(row).__name__}; each line must be a JSON "
                f'object such as {{"prompt": "..."}}'
            )
        rows.append(row)
    return rows


def _read_json(text: str, source: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{source}: not valid JSON: {err}") from err
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) > 1:
            raise DataError(f"{source}: the column lists have different lengths {sorted(lengths)}")
        keys = list(data)
        return [dict(zip(keys, values)) for values in zip(*data.values())]
    if isinstance(data, list):
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise DataError(
                    f"{source}: row {i} is a {type(row).__name__}; a .json prompt file must be a "
                    f"list of objects or an object of equal-length column lists"
                )
        return data
    raise DataError(
        f"{source}: a .json prompt file must be a list of objects or an object of equal-length "
        f"column lists; got a {type(data).__name__}"
    )


def _rows_to_dataset(rows: list[dict[str, Any]], column: str, source: str) -> datasets.Dataset:
    """Python rows → Dataset. The prompt column is validated row by row *first*: Arrow cannot
    even hold a column that mixes strings and message lists, and its own error names no row."""
    if not rows:
        raise DataError(f"data.prompts: {source} has no rows")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    if column not in columns:
        raise DataError(
            f"data.prompt_column={column!r} is not a column of {source}; its columns are: "
            + ", ".join(columns)
        )
    for i, row in enumerate(rows):
        if column not in row:
            raise DataError(
                f"{source}: row {i} has no {column!r} (data.prompt_column) {ROWS_FROM_0}"
            )
    _check_prompts([row[column] for row in rows], source)
    try:
        return datasets.Dataset.from_dict({c: [row.get(c) for row in rows] for c in columns})
    except Exception as err:  # e.g. another column mixing types across rows
        raise DataError(f"{source}: the rows do not form a table: {err}") from err


def _load_hub(source: str, split: str) -> datasets.Dataset:
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as err:
        raise DataError(
            f"data.prompts: {source!r} is not a built-in set (builtin:<name>) or an existing local "
            f"{'/'.join(LOCAL_FORMATS)} file, so it was loaded as a hub dataset (split "
            f"{split!r}), which failed: {type(err).__name__}: {err}. Offline, use a built-in set "
            f"({', '.join('builtin:' + n for n in builtin_prompt_sets())}) or a local file."
        ) from err
    if isinstance(ds, datasets.DatasetDict):  # defensive: split=None is not possible from config
        raise DataError(f"data.prompts: {source!r} returned several splits; set data.split")
    return ds


# ----------------------------------------------------------------------------------------------
# Validation


def _normalise(ds: datasets.Dataset, column: str, source: str) -> datasets.Dataset:
    if len(ds) == 0:
        raise DataError(f"data.prompts: {source} has no rows")
    if column not in ds.column_names:
        have = ", ".join(ds.column_names)
        raise DataError(
            f"data.prompt_column={column!r} is not a column of {source}; its columns are: {have}"
        )
    if column != "prompt":
        if "prompt" in ds.column_names:
            raise DataError(
                f"{source}: data.prompt_column={column!r} would be renamed to 'prompt', but the "
                f"data already has a 'prompt' column; rename or drop one of them"
            )
        ds = ds.rename_column(column, "prompt")
    clash = [c for c in RESERVED_COLUMNS if c in ds.column_names]
    if clash:
        raise DataError(
            f"{source}: column(s) {', '.join(map(repr, clash))} would collide with the reward "
            f"call's own arguments (prompts, completions); rename them"
        )
    _check_prompts(ds["prompt"], source)
    return ds


def _check_prompts(prompts: Sequence[Any], source: str) -> None:
    """Every prompt well formed (:func:`prompt_format`) and all of one format."""
    first_format = None
    for i, prompt in enumerate(prompts):
        try:
            fmt = prompt_format(prompt, where=f"{source}: row {i}")
        except DataError as err:
            raise DataError(f"{err} {ROWS_FROM_0}") from None
        if first_format is None:
            first_format = fmt
        elif fmt != first_format:
            raise DataError(
                f"{source}: row {i} is a {fmt} prompt but row 0 is {first_format}; all rows must "
                f"use one format (strings, or lists of {{role, content}} messages) {ROWS_FROM_0}"
            )


def prompt_format(prompt: Any, where: str = "prompt") -> str:
    """``"standard"`` for a non-blank string, ``"conversational"`` for a non-empty list of
    ``{"role": str, "content": str}`` messages; anything else raises naming ``where``."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: the prompt is empty")
        return "standard"
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise DataError(f"{where}: the conversational prompt has no messages")
        for j, msg in enumerate(prompt):
            if not isinstance(msg, dict):
                raise DataError(
                    f"{where}: message {j} is a {type(msg).__name__}; messages must be "
                    f'{{"role": ..., "content": ...}} objects'
                )
            missing = [k for k in ("role", "content") if not isinstance(msg.get(k), str)]
            if missing:
                raise DataError(
                    f"{where}: message {j} needs string {' and '.join(missing)} "
                    f"(got keys {sorted(msg)})"
                )
        return "conversational"
    raise DataError(
        f"{where}: a prompt must be a string or a list of {{role, content}} messages; "
        f"got {type(prompt).__name__} {_short(prompt)}"
    )


def is_conversational(prompt: Any) -> bool:
    """True for a list of messages, False for a string prompt (validates either way)."""
    return prompt_format(prompt) == "conversational"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Chat templates


def render_prompt(
    tokenizer: Any,
    prompt: str | Sequence[dict[str, str]],
    chat_template: str = "auto",
    system_prompt: str | None = None,
) -> str:
    """The text the policy is conditioned on.

    - conversational prompt: always through the tokenizer's chat template (an error if it has
      none or ``chat_template == "off"``);
    - string prompt: wrapped as ``[{"role": "user", "content": prompt}]`` and put through the
      chat template when ``chat_template == "on"`` (an error without one) or ``"auto"`` and the
      tokenizer has one; otherwise (``"off"``, or ``"auto"`` without a template) the raw string.

    The template is applied with ``add_generation_prompt=True`` and ``tokenize=False``; the
    result is tokenized later by the caller (so special tokens the template writes, like a BOS,
    should not be added again). ``system_prompt`` is prepended as a ``system`` message; it needs
    a chat template, and a conversation that already has a system message is an error rather
    than silently getting two.
    """
    if chat_template not in CHAT_TEMPLATE_MODES:
        raise DataError(
            f"data.chat_template={chat_template!r}; valid values: {', '.join(CHAT_TEMPLATE_MODES)}"
        )
    has_template = bool(getattr(tokenizer, "chat_template", None))
    conversational = is_conversational(prompt)
    if conversational:
        if chat_template == "off":
            raise DataError(
                "conversational prompts (lists of messages) need a chat template, but "
                "data.chat_template='off'; use 'auto' or 'on', or string prompts"
            )
        use_template = True
    else:
        use_template = chat_template == "on" or (chat_template == "auto" and has_template)
    if use_template and not has_template:
        what = "conversational prompts need" if conversational else "data.chat_template='on' needs"
        raise DataError(
            f"{what} a chat template, but the tokenizer "
            f"({type(tokenizer).__name__}) has none; use string prompts with "
            f"data.chat_template='off' or 'auto', or a model with a chat template"
        )
    if not use_template:
        if system_prompt is not None:
            raise DataError(
                "data.system_prompt needs a chat template, but prompts are used as raw strings "
                f"(data.chat_template={chat_template!r}, tokenizer has a template: {has_template})"
            )
        return prompt  # type: ignore[return-value]
    messages = list(prompt) if conversational else [{"role": "user", "content": prompt}]
    if system_prompt is not None:
        if any(m["role"] == "system" for m in messages):
            raise DataError(
                "data.system_prompt is set but this prompt already has a system message; "
                "remove one of them"
            )
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ----------------------------------------------------------------------------------------------
# Held-out split


def heldout_indices(num_prompts: int, count: int, seed: int) -> list[int]:
    """The ``count`` dataset indices set aside for evaluation, sorted: the first ``count`` of
    ``numpy.random.default_rng([seed, 1 << 20]).permutation(num_prompts)`` (a stream of its own,
    so it never coincides with a sampler epoch's order). ``count`` must leave ≥ 1 for training."""
    if count == 0:
        return []
    if count >= num_prompts:
        raise DataError(
            f"data.heldout_prompts={count} leaves no prompt to train on: the dataset has "
            f"{num_prompts} prompts; use at most {num_prompts - 1}"
        )
    order = np.random.default_rng([seed, 1 << 20]).permutation(num_prompts)
    return sorted(int(i) for i in order[:count])


def split_heldout(ds: datasets.Dataset, cfg: DataConfig) -> tuple[datasets.Dataset, list[int]]:
    """(the training rows, the held-out dataset indices) for ``data.heldout_prompts``. Training
    samples only the returned rows, so it never sees a held-out prompt."""
    held = heldout_indices(len(ds), cfg.heldout_prompts, cfg.heldout_seed)
    if not held:
        return ds, []
    held_set = set(held)
    return ds.select([i for i in range(len(ds)) if i not in held_set]), held


# ----------------------------------------------------------------------------------------------
# Order


class PromptSampler:
    """Seeded, resumable order over dataset indices ``0..num_prompts-1``.

    Epoch ``e`` visits every index exactly once, in the order
    ``numpy.random.default_rng([seed, e]).permutation(num_prompts)`` (or ``0..N-1`` when
    ``shuffle=False``). ``next_batch(n)`` returns the next ``n`` global indices, continuing
    into the next epoch's permutation when the current one runs out (so a batch may hold the
    same index twice only when ``n`` exceeds ``num_prompts`` or straddles an epoch boundary).

    State: ``{"epoch", "position", "seed", "num_prompts"}``, where ``position`` ∈ [0, N) is
    how many indices of epoch ``epoch`` were already returned. Since each permutation is a pure
    function of ``(seed, epoch)``, loading a state continues the uninterrupted order exactly.
    """

    def __init__(self, num_prompts: int, seed: int, shuffle: bool = True):
        if not isinstance(num_prompts, int) or num_prompts < 1:
            raise DataError(f"PromptSampler needs num_prompts ≥ 1; got {num_prompts!r}")
        self.num_prompts = num_prompts
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch])
                self._order = rng.permutation(self.num_prompts)
            else:
                self._order = np.arange(self.num_prompts)
        return self._order

    def next_batch(self, n: int) -> list[int]:
        """The next ``n`` ≥ 1 indices (global dataset indices), crossing epochs as needed."""
        if not isinstance(n, int) or n < 1:
            raise DataError(f"next_batch needs n ≥ 1; got {n!r}")
        out: list[int] = []
        while len(out) < n:
            order = self._epoch_order()
            take = min(n - len(out), self.num_prompts - self.position)
            out.extend(int(i) for i in order[self.position : self.position + take])
            self.position += take
            if self.position == self.num_prompts:
                self.epoch += 1
                self.position = 0
                self._order = None
        return out

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_prompts": self.num_prompts,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state``; the dataset size must be the one the state was saved with."""
        missing = [k for k in ("epoch", "position", "seed") if k not in state]
        if missing:
            raise DataError(
                f"PromptSampler state lacks {', '.join(missing)}; got keys {list(state)}"
            )
        saved_n = state.get("num_prompts", self.num_prompts)
        if saved_n != self.num_prompts:
            raise DataError(
                f"PromptSampler state was saved for {saved_n} prompts but the dataset now has "
                f"{self.num_prompts}; resuming would not continue the same order"
            )
        if not 0 <= state["position"] < self.num_prompts or state["epoch"] < 0:
            raise DataError(
                f"PromptSampler state out of range: epoch={state['epoch']}, "
                f"position={state['position']} (needs 0 ≤ position < {self.num_prompts})"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.seed = int(state["seed"])
        self._order = None


def process_share(indices: list[int], rank: int, world_size: int) -> list[int]:
    """Process ``rank``'s contiguous share: ``indices[rank·k : (rank+1)·k]``, ``k = len/world``.

    The global batch must split evenly (``len(indices) % world_size == 0``), so every process
    takes the same number of prompts and the union of the shares is the batch, in order.
    """
    if world_size < 1:
        raise DataError(f"world_size must be ≥ 1; got {world_size}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, {world_size}); got {rank}")
    if len(indices) % world_size:
        raise DataError(
            f"{len(indices)} prompts do not split evenly over {world_size} processes; use a "
            f"multiple of {world_size} prompts per step"
        )
    k = len(indices) // world_size
    return list(indices[rank * k : (rank + 1) * k])
