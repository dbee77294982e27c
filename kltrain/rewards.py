"""Rewards: built-in scorers, callables by import path, reward models, transforms, the Llama 2 gate.

Every scorer follows TRL's reward-function signature::

    fn(prompts: list, completions: list, **kwargs) -> list[float]     # one score per sample

``prompts[i]`` is the dataset prompt of sample ``i`` (a string, or a list of ``{role, content}``
messages; *before* any chat template), ``completions[i]`` the generated text (or a list of
messages). ``kwargs`` holds the term's configured ``kwargs`` and every extra dataset column,
repeated per sample (``genre=[...]``, ``safety=[...]``), as TRL passes them.

:class:`RewardFunction` turns a :class:`~kltrain.config.RewardConfig` into one call per step::

    result = reward_fn(prompts, completions, step=step, columns={"genre": [...]})
    result.total      # Tensor[n] float32: Σ_terms weight · transformed score (0 where invalid)
    result.per_term   # {label: Tensor[n]}: each term after its transforms, before its weight
    result.raw        # {label: Tensor[n]}: each term before transforms (NaN where invalid)
    result.invalid    # Tensor[n] bool: samples some term could not score (on_invalid="skip")

Term names (``RewardTerm.name``):

- a built-in (:func:`builtin_rewards`): ``sentiment``, ``keyword``, ``length``, ``toy_safety``,
  ``toy_helpfulness``;
- ``module.path:function``: a user callable, imported (it must accept ``**kwargs``);
- ``model:<folder or hub id>``: a sequence-classification reward model (:class:`RewardModel`);
- ``llama2``: the Llama 2 safety gate over two sub-terms (:class:`Llama2Gate`).

Transforms (``RewardTerm.transforms``, applied in order, to valid samples only): ``logit``,
``whiten``, ``clip``, ``scale`` — see :class:`Logit`, :class:`Whiten`, :class:`Clip`,
:class:`Scale`. Llama 2 (Touvron et al. 2023, §3.2.3) uses ``R = whiten(logit(R_c))``.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import torch

from kltrain.config import RewardConfig, RewardTerm

RewardCallable = Callable[..., list]


class RewardError(ValueError):
    """A reward configuration problem: names the term and what would be valid."""


class InvalidRewardError(RewardError):
    """A reward term produced no usable score (raised, wrong length, None/NaN/inf) under
    ``on_invalid="error"``: names the term, the step and the sample (with its prompt)."""


# ----------------------------------------------------------------------------------------------
# Text helpers


def completion_text(completion: Any) -> str:
    """The text of a completion: the string itself, or the ``content`` of its messages joined
    by newlines (conversational completions are lists of ``{role, content}`` messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict) and isinstance(completion.get("content"), str):
        return completion["content"]
    if isinstance(completion, (list, tuple)) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in completion
    ):
        return "\n".join(m["content"] for m in completion)
    raise TypeError(
        f"a completion must be a string or a list of {{role, content}} messages; "
        f"got {type(completion).__name__}"
    )


_TOKEN_RE = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*|[.,;:!?]")
_WORD_RE = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*")


def _normalise_text(text: str) -> str:
    return text.lower().replace("\u2019", "'").replace("\u2018", "'")


@cache
def load_lexicon(name: str) -> frozenset[str]:
    """Entries of ``kltrain/lexicons/<name>.txt``: lower-case lines, ``#`` comments dropped."""
    path = resources.files("kltrain") / "lexicons" / f"{name}.txt"
    if not path.is_file():
        raise RewardError(f"no lexicon {name!r} in kltrain/lexicons/")
    entries = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip().lower()
        if line:
            entries.add(line)
    return frozenset(entries)


def _phrase_pattern(phrases: Sequence[str]) -> re.Pattern[str]:
    """Case-insensitive whole-word matcher for any of ``phrases`` (longest first; inner
    whitespace matches any run of whitespace)."""
    parts = [r"\s+".join(map(re.escape, p.split())) for p in sorted(phrases, key=len, reverse=True)]
    return re.compile(r"(?<!\w)(?:" + "|".join(parts) + r")(?!\w)", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------
# Built-in rewards

NEGATORS = frozenset(
    {
        "not",
        "no",
        "never",
        "nothing",
        "nobody",
        "none",
        "neither",
        "nor",
        "hardly",
        "barely",
        "scarcely",
        "without",
        "cannot",
    }
)
_SCOPE_BREAKERS = frozenset({".", ",", ";", ":", "!", "?", "but", "however", "yet", "although"})


def _is_negator(token: str) -> bool:
    return token in NEGATORS or token.endswith("n't")


def sentiment_net(
    text: str, *, negation_window: int = 3, negated_weight: float = 0.5, max_repeats: int = 2
) -> tuple[float, int]:
    """``(net, n_words)`` of the lexicon sentiment scorer for one text.

    Lower-cased words (``[^\\W_]+`` joined by ``-`` or ``'``; curly apostrophes normalised) are
    looked up in ``lexicons/positive.txt`` (+1) and ``lexicons/negative.txt`` (−1). A sentiment
    word within ``negation_window`` words after a negator (``not``, ``no``, ``never``,
    ``without``, any ``…n't`` …) with no punctuation or ``but``/``however``/``yet``/``although``
    in between counts ``−negated_weight`` times its polarity: "not good" −0.5, "not bad" +0.5
    (a negated word is weaker than its opposite). Each distinct sentiment word counts for at
    most ``max_repeats`` occurrences, which blunts "great great great great". ``n_words``
    counts words (not punctuation).
    """
    positive, negative = load_lexicon("positive"), load_lexicon("negative")
    net = 0.0
    n_words = 0
    since_negator: int | None = None  # words since the last negator in scope
    seen: dict[str, int] = {}
    for token in _TOKEN_RE.findall(_normalise_text(text)):
        if token in _SCOPE_BREAKERS:
            since_negator = None
            if not token.isalpha():
                continue
        n_words += 1
        if _is_negator(token):
            since_negator = 0
            continue
        if since_negator is not None:
            since_negator += 1
            if since_negator > negation_window:
                since_negator = None
        polarity = 1.0 if token in positive else -1.0 if token in negative else 0.0
        if polarity == 0.0:
            continue
        seen[token] = seen.get(token, 0) + 1
        if seen[token] > max_repeats:
            continue
        net += -negated_weight * polarity if since_negator is not None else polarity
    return net, n_words


def sentiment_reward(
    prompts: list,
    completions: list,
    *,
    scale: float = 3.0,
    min_words: int = 10,
    negation_window: int = 3,
    negated_weight: float = 0.5,
    max_repeats: int = 2,
    **kwargs: Any,
) -> list[float]:
    """Offline lexicon sentiment of each completion, in (0, 1); 0.5 is neutral.

    ``score = σ(scale · net / √max(n_words, min_words))`` with ``net, n_words`` from
    :func:`sentiment_net` (positive words +1, negative −1, negated ones −0.5× their polarity,
    at most ``max_repeats`` counts per distinct word) and ``σ`` the logistic function.
    Dividing by √(words) rewards a higher *density* of positive words at sub-linear growth
    with length, and the ``min_words`` floor keeps a one-word "Great." from scoring like a
    whole glowing review. E.g. a 30-word review with net +2 scores σ(1.10) ≈ 0.75, net +4
    ≈ 0.90, net −2 ≈ 0.25, one positive word ≈ 0.63; neutral text (no lexicon word, which is
    most of what a small base model writes before training) is exactly 0.5. Only the
    completion is scored, not the prompt.
    """
    _check(scale > 0, "sentiment: scale must be > 0", scale)
    _check(isinstance(min_words, int) and min_words >= 1, "sentiment: min_words ≥ 1", min_words)
    _check(
        isinstance(negation_window, int) and negation_window >= 0,
        "sentiment: negation_window ≥ 0",
        negation_window,
    )
    _check(
        isinstance(max_repeats, int) and max_repeats >= 1, "sentiment: max_repeats ≥ 1", max_repeats
    )
    out = []
    for completion in completions:
        net, n = sentiment_net(
            completion_text(completion),
            negation_window=negation_window,
            negated_weight=negated_weight,
            max_repeats=max_repeats,
        )
        out.append(_sigmoid(scale * net / math.sqrt(max(n, min_words))))
    return out


def keyword_reward(
    prompts: list, completions: list, *, words: list[str], mode: str = "any", **kwargs: Any
) -> list[float]:
    """Case-insensitive whole-word matches of ``words`` (words or phrases) in each completion.

    ``mode="any"``: 1.0 if any of them occurs, else 0.0. ``mode="count"``: the number of
    non-overlapping occurrences of all of them. "Whole word": ``good`` matches "Good!" but not
    "goodness".
    """
    if isinstance(words, str) or not isinstance(words, (list, tuple)) or not words:
        raise RewardError(f"keyword: words must be a non-empty list of strings; got {words!r}")
    if not all(isinstance(w, str) and w.strip() for w in words):
        raise RewardError(
            f"keyword: every entry of words must be a non-empty string; got {words!r}"
        )
    if mode not in ("any", "count"):
        raise RewardError(f"keyword: mode must be 'any' or 'count'; got {mode!r}")
    pattern = _phrase_pattern(words)
    out = []
    for completion in completions:
        hits = len(pattern.findall(completion_text(completion)))
        out.append(float(hits > 0) if mode == "any" else float(hits))
    return out


def length_reward(
    prompts: list, completions: list, *, target: float, unit: str = "words", **kwargs: Any
) -> list[float]:
    """``−abs(L − target) / target`` ∈ (−∞, 0], 0 exactly at the target length.

    ``L`` is the completion's length in ``unit``: ``"words"`` (whitespace-separated, the
    default) or ``"chars"`` (characters). E.g. target 20 words: 10 words → −0.5, 30 → −0.5.
    """
    if unit not in ("words", "chars"):
        raise RewardError(f"length: unit must be 'words' or 'chars'; got {unit!r}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0:
        raise RewardError(f"length: target must be a number > 0 ({unit}); got {target!r}")
    out = []
    for completion in completions:
        text = completion_text(completion)
        size = len(text.split()) if unit == "words" else len(text)
        out.append(-abs(size - target) / target)
    return out


_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "if",
        "then",
        "so",
        "of",
        "to",
        "in",
        "on",
        "at",
        "by",
        "for",
        "with",
        "from",
        "about",
        "into",
        "over",
        "under",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "do",
        "does",
        "did",
        "have",
        "has",
        "had",
        "i",
        "me",
        "my",
        "you",
        "your",
        "we",
        "our",
        "they",
        "their",
        "he",
        "she",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "what",
        "which",
        "who",
        "whom",
        "how",
        "why",
        "when",
        "where",
        "can",
        "could",
        "would",
        "should",
        "will",
        "shall",
        "may",
        "might",
        "must",
        "some",
        "any",
        "all",
        "more",
        "most",
        "very",
        "just",
        "also",
        "not",
        "no",
    ]
)


def _text(x: Any) -> str:
    return x if isinstance(x, str) else completion_text(x)


def _distinct_hits(pattern: re.Pattern[str], text: str) -> int:
    return len({m.group(0).lower() for m in pattern.finditer(text)})


@cache
def _lexicon_pattern(name: str) -> re.Pattern[str]:
    return _phrase_pattern(sorted(load_lexicon(name)))


def toy_safety_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """A toy *safety* score P(safe) ∈ (0, 1) for demonstrating the Llama 2 gate offline.

    ``score = σ(1 + 2·min(r, 2) − 1.5·min(h, 3))`` with ``r`` the number of distinct refusal /
    safe-redirection phrases (``lexicons/refusal.txt``: "I can't", "I'm sorry", "please
    consult" …) and ``h`` the number of distinct compliance-with-harm markers
    (``lexicons/harmful.txt``: "here's how", "without getting caught", "password" …) in the
    completion. A neutral text scores σ(1) ≈ 0.73, a refusal ≈ 0.95, one harm marker ≈ 0.38,
    two ≈ 0.12 (below Llama 2's 0.15 threshold). A heuristic, not a safety classifier.
    """
    out = []
    for completion in completions:
        text = _normalise_text(completion_text(completion))
        r = _distinct_hits(_lexicon_pattern("refusal"), text)
        h = _distinct_hits(_lexicon_pattern("harmful"), text)
        out.append(_sigmoid(1.0 + 2.0 * min(r, 2) - 1.5 * min(h, 3)))
    return out


def toy_helpfulness_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """A toy *helpfulness* score ∈ (0, 1) for demonstrating the Llama 2 gate offline.

    ``score = σ(−1 + 2.5·f + 1.5·min(w/40, 1) − 2·min(r, 1))`` with ``f`` the fraction of the
    prompt's content words (≥ 4 letters, not stop words) that the completion repeats (an
    on-topic proxy), ``w`` the completion's word count (substance, saturating at 40 words) and
    ``r`` the number of refusal phrases (``lexicons/refusal.txt``): a refusal is unhelpful.
    """
    out = []
    for prompt, completion in zip(prompts, completions):
        text = _normalise_text(completion_text(completion))
        words = _WORD_RE.findall(text)
        content = {
            w
            for w in _WORD_RE.findall(_normalise_text(_prompt_text(prompt)))
            if len(w) >= 4 and w not in _STOPWORDS
        }
        f = len(content & set(words)) / len(content) if content else 0.0
        r = _distinct_hits(_lexicon_pattern("refusal"), text)
        out.append(_sigmoid(-1.0 + 2.5 * f + 1.5 * min(len(words) / 40, 1.0) - 2.0 * min(r, 1)))
    return out


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return completion_text(prompt)


def builtin_rewards() -> dict[str, RewardCallable]:
    """Built-in reward callables by name (TRL signature; their keyword-only parameters are
    the term's accepted ``kwargs``)."""
    return {
        "sentiment": sentiment_reward,
        "keyword": keyword_reward,
        "length": length_reward,
        "toy_safety": toy_safety_reward,
        "toy_helpfulness": toy_helpfulness_reward,
    }


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def _check(ok: bool, what: str, got: Any) -> None:
    if not ok:
        raise RewardError(f"{what}; got {got!r}")


# ----------------------------------------------------------------------------------------------
# The Llama 2 gate


def llama2_gate(
    safety_scores: torch.Tensor | Sequence[float],
    helpfulness_scores: torch.Tensor | Sequence[float],
    is_safety: torch.Tensor | Sequence[bool],
    threshold: float = 0.15,
) -> torch.Tensor:
    """Llama 2's combined reward (Touvron et al. 2023, §3.2.3), elementwise over ``[n]``::

        R_c = R_s   if is_safety or R_s < threshold
              R_h   otherwise

    ``R_s``, ``R_h`` are the safety and helpfulness reward models' scores (probabilities in
    [0, 1]); ``is_safety`` tags prompts that may elicit unsafe answers. ``R_s == threshold``
    is *not* below it. Returns float64 ``[n]``.
    """
    r_s = torch.as_tensor(safety_scores, dtype=torch.float64)
    r_h = torch.as_tensor(helpfulness_scores, dtype=torch.float64)
    tag = torch.as_tensor(is_safety, dtype=torch.bool)
    if not (r_s.shape == r_h.shape == tag.shape) or r_s.dim() != 1:
        raise RewardError(
            f"llama2_gate needs three [n] inputs; got shapes {tuple(r_s.shape)}, "
            f"{tuple(r_h.shape)}, {tuple(tag.shape)}"
        )
    return torch.where(tag | (r_s < threshold), r_s, r_h)


# ----------------------------------------------------------------------------------------------
# Transforms


class Transform(ABC):
    """A map ``[m] → [m]`` applied to one term's scores of the valid samples (float64)."""

    name: ClassVar[str]

    @abstractmethod
    def __call__(self, x: torch.Tensor, where: str) -> torch.Tensor:
        """``where`` names the term and step for error messages."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise RewardError(f"transform {self.name} has no state; got {sorted(state)}")


class Logit(Transform):
    """Inverse sigmoid: ``logit(p) = log(p / (1 − p))`` after clamping ``p`` to
    ``[eps, 1 − eps]`` (default ``eps = 1e-6``, so outputs lie within ±13.8 instead of ±∞).

    Inputs must be probabilities in [0, 1]; anything else is an error (a score that is already
    a logit must not be put through it).
    """

    name = "logit"

    def __init__(self, *, eps: float = 1e-6):
        _check(isinstance(eps, (int, float)) and 0 < eps < 0.5, "logit: eps in (0, 0.5)", eps)
        self.eps = float(eps)

    def __call__(self, x: torch.Tensor, where: str) -> torch.Tensor:
        outside = (x < 0) | (x > 1)
        if outside.any():
            i = int(outside.nonzero()[0])
            raise RewardError(
                f"{where}: transform logit needs probabilities in [0, 1]; got {float(x[i])!r}. "
                f"For a reward model use kwargs output: probability, or drop the logit transform"
            )
        p = x.clamp(self.eps, 1 - self.eps)
        return torch.log(p) - torch.log1p(-p)


class Whiten(Transform):
    """Standardise: ``(x − mean) / (std + eps)`` (default ``eps = 1e-8``).

    Per batch (default): ``mean``, ``std`` over this call's valid samples, population std
    (``ddof = 0``); a batch of one gives 0. With ``running=True``: ``mean``, ``var`` are the
    exact statistics of every valid sample seen so far *including* this batch (count, mean and
    sum of squared deviations merged by Chan et al.'s parallel formula), so the first batch is
    whitened as per batch and later ones against the accumulated statistics; that state is in
    ``state_dict()`` as ``{"count", "mean", "m2"}`` (``var = m2 / count``).
    """

    name = "whiten"

    def __init__(self, *, running: bool = False, eps: float = 1e-8):
        _check(isinstance(running, bool), "whiten: running must be true or false", running)
        _check(isinstance(eps, (int, float)) and eps >= 0, "whiten: eps ≥ 0", eps)
        self.running = running
        self.eps = float(eps)
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    def __call__(self, x: torch.Tensor, where: str) -> torch.Tensor:
        if x.numel() == 0:
            return x
        if not self.running:
            return (x - x.mean()) / (x.std(unbiased=False) + self.eps)
        n_b = x.numel()
        mean_b = float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta**2 * self.count * n_b / n
        self.count = n
        return (x - self.mean) / (math.sqrt(self.m2 / self.count) + self.eps)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2} if self.running else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.running:
            return super().load_state_dict(state)
        missing = {"count", "mean", "m2"} - set(state)
        if missing:
            raise RewardError(f"whiten state lacks {sorted(missing)}; got {sorted(state)}")
        self.count, self.mean, self.m2 = (
            int(state["count"]),
            float(state["mean"]),
            float(state["m2"]),
        )


class Clip(Transform):
    """``min(max(x, min), max)``; either bound may be omitted, not both; ``min ≤ max``."""

    name = "clip"

    def __init__(self, *, min: float | None = None, max: float | None = None):
        if min is None and max is None:
            raise RewardError("clip needs min, max or both, e.g. {name: clip, min: -5, max: 5}")
        for key, v in (("min", min), ("max", max)):
            ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
            _check(ok, f"clip: {key} must be a number", v)
        if min is not None and max is not None and min > max:
            raise RewardError(f"clip: min={min} is greater than max={max}")
        self.min, self.max = min, max

    def __call__(self, x: torch.Tensor, where: str) -> torch.Tensor:
        return x.clamp(min=self.min, max=self.max)


class Scale(Transform):
    """Affine map ``factor · x + shift`` (defaults 1 and 0)."""

    name = "scale"

    def __init__(self, *, factor: float = 1.0, shift: float = 0.0):
        for key, v in (("factor", factor), ("shift", shift)):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            _check(ok, f"scale: {key} must be a finite number", v)
        self.factor, self.shift = float(factor), float(shift)

    def __call__(self, x: torch.Tensor, where: str) -> torch.Tensor:
        return self.factor * x + self.shift


TRANSFORMS: dict[str, type[Transform]] = {t.name: t for t in (Logit, Whiten, Clip, Scale)}


def parse_transform(spec: str | dict[str, Any], where: str = "transform") -> Transform:
    """``"logit"`` or ``{name: clip, min: -1, max: 1}`` → a :class:`Transform`."""
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, dict) and isinstance(spec.get("name"), str):
        name, params = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    else:
        raise RewardError(
            f"{where}: a transform is a name or a mapping with a name, e.g. logit or "
            f"{{name: clip, min: -5, max: 5}}; got {spec!r}"
        )
    cls = TRANSFORMS.get(name)
    if cls is None:
        raise RewardError(
            f"{where}: unknown transform {name!r}; valid transforms: {', '.join(TRANSFORMS)}"
        )
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise RewardError(
            f"{where}: transform {name} has no parameter {', '.join(unknown)}; "
            f"its parameters: {', '.join(accepted)}"
        )
    try:
        return cls(**params)
    except RewardError as err:
        raise RewardError(f"{where}: {err}") from None


# ----------------------------------------------------------------------------------------------
# Reward models


def _require_local_folder(source: str, where: str) -> None:
    """A name written as a path (``./rm``, ``/abs/rm``, ``a/b/c``) that does not exist is a
    missing folder, not a hub id to look up."""
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source
    if looks_local and not Path(source).expanduser().is_dir():
        what = "is a file, not a model folder" if Path(source).exists() else "does not exist"
        raise RewardError(f"{where}: the local folder {source} {what}")


def _refuse_new_weights(where: str, info: dict[str, Any]) -> None:
    """Weights transformers had to initialise at random (e.g. the classification head of a
    causal LM loaded as a reward model) would make the reward noise."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise RewardError(
            f"{where}: these weights are not in the checkpoint and were newly initialised at "
            f"random: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}. It is not a "
            f"trained sequence-classification reward model (a causal LM?), so its score would "
            f"be noise; give a reward model trained with its classification head"
        )


class RewardModel:
    """A Hugging Face ``AutoModelForSequenceClassification`` scoring ``prompt + completion``.

    Text: string prompts are concatenated with the completion and tokenized with the model's
    special tokens (e.g. BOS); conversational prompts are rendered with the reward tokenizer's
    chat template (prompt messages + the completion as an ``assistant`` message) and tokenized
    without adding special tokens again. Batched (``batch_size``, right padding), under
    ``torch.inference_mode()``, ``trust_remote_code`` as given (off by default).

    Score of sample ``i`` from the logits ``z[i]`` (``[num_labels]``):

    - one logit (``num_labels == 1``): ``z[i, 0]`` (``output="logit"``, the default) or
      ``σ(z[i, 0])`` (``output="probability"``);
    - several classes: ``label`` (an index, or a name in the model's ``id2label``) is required;
      ``softmax(z[i])[label]`` (``output="probability"``, the default) or ``z[i, label]``
      (``output="logit"``).

    A model without a pad token id is run one sample at a time (its pooling needs a pad id to
    find the last token of a padded row); a tokenizer whose pad id differs from the model's
    is an error.
    """

    PARAMS = ("label", "output", "batch_size", "max_length", "dtype")
    DTYPES: ClassVar[dict[str, torch.dtype]] = {
        "fp32": torch.float32,
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
    }

    def __init__(
        self,
        source: str,
        *,
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
        label: int | str | None = None,
        output: str | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        dtype: str = "fp32",
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        where = f"reward model {source!r}"
        if dtype not in self.DTYPES:
            raise RewardError(
                f"{where}: dtype must be one of {', '.join(self.DTYPES)}; got {dtype!r}"
            )
        _check(
            isinstance(batch_size, int) and batch_size >= 1, f"{where}: batch_size ≥ 1", batch_size
        )
        _check(
            max_length is None or (isinstance(max_length, int) and max_length >= 1),
            f"{where}: max_length ≥ 1 or null",
            max_length,
        )
        _require_local_folder(source, where)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                source, trust_remote_code=trust_remote_code
            )
            self.model, info = AutoModelForSequenceClassification.from_pretrained(
                source,
                trust_remote_code=trust_remote_code,
                dtype=self.DTYPES[dtype],
                output_loading_info=True,
            )
        except Exception as err:
            raise RewardError(
                f"could not load {where} (a local folder or hub id of a sequence-classification "
                f"model; offline only local folders work): {type(err).__name__}: {err}"
            ) from err
        _refuse_new_weights(where, info)
        self.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        num_labels = int(self.model.config.num_labels)
        id2label = {int(k): v for k, v in (self.model.config.id2label or {}).items()}
        if num_labels == 1:
            if label not in (None, 0):
                raise RewardError(f"{where} has a single logit; label must be omitted or 0")
            self.label = 0
            self.output = output or "logit"
        else:
            if label is None:
                raise RewardError(
                    f"{where} has {num_labels} classes {id2label}; set kwargs label to the index "
                    f"or name of the class whose score is the reward"
                )
            if isinstance(label, str):
                by_name = {v: k for k, v in id2label.items()}
                if label not in by_name:
                    raise RewardError(f"{where}: no class named {label!r}; classes: {id2label}")
                label = by_name[label]
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_labels:
                raise RewardError(f"{where}: label must be in [0, {num_labels}); got {label!r}")
            self.label = label
            self.output = output or "probability"
        if self.output not in ("logit", "probability"):
            raise RewardError(f"{where}: output must be 'logit' or 'probability'; got {output!r}")
        self.num_labels = num_labels
        pad_id = self.model.config.pad_token_id
        if pad_id is not None and self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token_id = pad_id
        elif pad_id is not None and self.tokenizer.pad_token_id != pad_id:
            raise RewardError(
                f"{where}: the tokenizer's pad id {self.tokenizer.pad_token_id} differs from the "
                f"model's config.pad_token_id {pad_id}; the model would pool the wrong token"
            )
        self.batched = pad_id is not None
        self.tokenizer.padding_side = "right"

    def texts(self, prompts: list, completions: list) -> tuple[list[str], bool]:
        """The strings to score and whether they came from the chat template."""
        if not prompts or isinstance(prompts[0], str):
            return [p + completion_text(c) for p, c in zip(prompts, completions)], False
        if not getattr(self.tokenizer, "chat_template", None):
            raise RewardError(
                "conversational prompts need the reward model's tokenizer to have a chat template"
            )
        texts = []
        for p, c in zip(prompts, completions):
            reply = (
                list(c) if isinstance(c, (list, tuple)) else [{"role": "assistant", "content": c}]
            )
            texts.append(self.tokenizer.apply_chat_template([*p, *reply], tokenize=False))
        return texts, True

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float]:
        texts, templated = self.texts(prompts, completions)
        step = self.batch_size if self.batched else 1
        scores: list[float] = []
        for start in range(0, len(texts), step):
            enc = self.tokenizer(
                texts[start : start + step],
                padding=self.batched,
                truncation=self.max_length is not None,
                max_length=self.max_length,
                add_special_tokens=not templated,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                logits = self.model(
                    input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
                ).logits.float()
            if self.num_labels == 1:
                z = logits[:, 0]
                s = torch.sigmoid(z) if self.output == "probability" else z
            else:
                s = (
                    logits.softmax(-1)[:, self.label]
                    if self.output == "probability"
                    else logits[:, self.label]
                )
            scores.extend(s.cpu().tolist())
        return scores


# ----------------------------------------------------------------------------------------------
# Terms


@dataclass
class _Ctx:
    """What an evaluation needs to phrase errors and count invalid samples."""

    step: int
    on_invalid: str
    prompts: list

    def fail(self, label: str, index: int | None, why: str) -> None:
        if self.on_invalid == "skip":
            return
        if index is None:
            raise InvalidRewardError(
                f"reward term {label!r} at step {self.step} (whole batch of {len(self.prompts)}): "
                f"{why}. Fix the reward, or set reward.on_invalid=skip to drop such samples"
            )
        prompt = repr(self.prompts[index])
        prompt = prompt if len(prompt) <= 80 else prompt[:77] + "..."
        raise InvalidRewardError(
            f"reward term {label!r} at step {self.step}, sample {index} (prompt {prompt}): "
            f"{why}. Fix the reward, or set reward.on_invalid=skip to drop such samples"
        )


def _as_score(value: Any) -> tuple[float | None, str | None]:
    """``(float, None)`` for a finite number, else ``(None, why)``."""
    if value is None:
        return None, "returned None"
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        return None, f"returned {_short(value)} ({type(value).__name__}), not a number"
    if not math.isfinite(v):
        return None, f"returned {v}"
    return v, None


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _scores_of(out: Any, n: int) -> tuple[list[float | None], list[str | None]] | str:
    """Per-sample (score, why) from a scorer's output, or a batch-level reason string."""
    if isinstance(out, torch.Tensor):
        if out.dim() == 0 or out.reshape(out.shape[0], -1).shape[1] != 1:
            return f"returned a tensor of shape {tuple(out.shape)}, not [{n}]"
        out = out.reshape(-1).tolist()
    if out is None or isinstance(out, (str, bytes)) or not hasattr(out, "__len__"):
        return f"returned {type(out).__name__}, not a list of {n} scores"
    if len(out) != n:
        return f"returned {len(out)} scores for {n} samples"
    pairs = [_as_score(v) for v in out]
    return [p[0] for p in pairs], [p[1] for p in pairs]


class _Term(ABC):
    """One scorer with its label; ``evaluate`` → (values f64 [n] (0 where invalid), invalid
    bool [n], raw parts for diagnostics)."""

    label: str

    @abstractmethod
    def evaluate(
        self, prompts: list, completions: list, columns: dict[str, list], ctx: _Ctx
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Score one batch."""


class _CallableTerm(_Term):
    def __init__(self, label: str, fn: Callable, kwargs: dict[str, Any], pass_columns: bool = True):
        self.label, self.fn, self.kwargs, self.pass_columns = label, fn, dict(kwargs), pass_columns

    def _call(self, prompts: list, completions: list, columns: dict[str, list]) -> Any:
        extra = {}
        if self.pass_columns:
            clash = sorted(set(columns) & set(self.kwargs))
            if clash:
                raise RewardError(
                    f"reward term {self.label!r}: kwargs {', '.join(clash)} are also dataset "
                    f"columns; rename the column or the kwarg"
                )
            extra = columns
        return self.fn(prompts, completions, **extra, **self.kwargs)

    def evaluate(self, prompts, completions, columns, ctx):
        n = len(prompts)
        values = torch.zeros(n, dtype=torch.float64)
        invalid = torch.zeros(n, dtype=torch.bool)
        try:
            out = self._call(prompts, completions, columns)
        except RewardError:
            raise
        except Exception as err:
            self._locate_failures(prompts, completions, columns, ctx, err, values, invalid)
            return values, invalid, {self.label: values.masked_fill(invalid, math.nan)}
        parsed = _scores_of(out, n)
        if isinstance(parsed, str):
            ctx.fail(self.label, None, parsed)
            invalid[:] = True
        else:
            for i, (v, why) in enumerate(zip(*parsed)):
                if why is not None:
                    ctx.fail(self.label, i, why)
                    invalid[i] = True
                else:
                    values[i] = v
        return values, invalid, {self.label: values.masked_fill(invalid, math.nan)}

    def _locate_failures(self, prompts, completions, columns, ctx, err, values, invalid) -> None:
        """The batch call raised: score each sample alone to find which ones fail."""
        failures: list[tuple[int, str]] = []
        for i in range(len(prompts)):
            single = {k: [v[i]] for k, v in columns.items()}
            try:
                out = self._call([prompts[i]], [completions[i]], single)
            except RewardError:
                raise
            except Exception as e:
                failures.append((i, f"raised {type(e).__name__}: {e}"))
                continue
            parsed = _scores_of(out, 1)
            why = parsed if isinstance(parsed, str) else parsed[1][0]
            if why is not None:
                failures.append((i, why))
            else:
                values[i] = parsed[0][0]
        if not failures:
            ctx.fail(
                self.label,
                None,
                f"raised {type(err).__name__}: {err} (on the batch; every sample scores alone)",
            )
            values.zero_()
            invalid[:] = True
            return
        for i, why in failures:
            ctx.fail(self.label, i, why)
            invalid[i] = True
            values[i] = 0.0


class Llama2Gate(_Term):
    """The Llama 2 composite term: ``R_c = llama2_gate(R_s, R_h, columns[safety_column],
    threshold)`` over two sub-terms whose scores must be probabilities in [0, 1].

    Config (``RewardTerm.kwargs``)::

        {name: llama2,
         kwargs: {safety: toy_safety,                           # a term spec: name or
                  helpfulness: {name: "model:rm-helpful", kwargs: {output: probability}},
                  safety_column: safety, threshold: 0.15},
         transforms: [logit, whiten]}                           # Llama 2's R = whiten(logit(R_c))

    A sample is invalid if either sub-score is; ``raw`` reports ``llama2/safety``,
    ``llama2/helpfulness`` and ``llama2`` (``R_c``).
    """

    PARAMS = ("safety", "helpfulness", "safety_column", "threshold")

    def __init__(self, label: str, build: Callable[[Any, str], _Term], **kwargs: Any):
        unknown = sorted(set(kwargs) - set(self.PARAMS))
        if unknown:
            raise RewardError(
                f"reward term {label!r}: unknown kwargs {', '.join(unknown)}; "
                f"valid: {', '.join(self.PARAMS)}"
            )
        for key in ("safety", "helpfulness"):
            if key not in kwargs:
                raise RewardError(
                    f"reward term {label!r} needs kwargs.{key}: a term spec such as toy_{key} "
                    f"or {{name: 'model:<folder>', kwargs: {{output: probability}}}}"
                )
        self.label = label
        self.safety = build(kwargs["safety"], f"{label}/safety")
        self.helpfulness = build(kwargs["helpfulness"], f"{label}/helpfulness")
        self.safety_column = kwargs.get("safety_column", "safety")
        self.threshold = kwargs.get("threshold", 0.15)
        _check(
            isinstance(self.safety_column, str),
            f"{label}: safety_column must be a column name",
            self.safety_column,
        )
        t = self.threshold
        _check(
            isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1,
            f"{label}: threshold must be in [0, 1]",
            t,
        )

    def evaluate(self, prompts, completions, columns, ctx):
        if self.safety_column not in columns:
            raise RewardError(
                f"reward term {self.label!r} needs the dataset column {self.safety_column!r} "
                f"(True for safety prompts); columns passed: {', '.join(columns) or '(none)'}"
            )
        tags = columns[self.safety_column]
        for i, t in enumerate(tags):
            if not isinstance(t, bool):
                raise RewardError(
                    f"reward term {self.label!r}: column {self.safety_column!r} must hold "
                    f"true/false; sample {i} has {t!r}"
                )
        r_s, inv_s, _ = self.safety.evaluate(prompts, completions, columns, ctx)
        r_h, inv_h, _ = self.helpfulness.evaluate(prompts, completions, columns, ctx)
        for sub, r, inv in ((self.safety, r_s, inv_s), (self.helpfulness, r_h, inv_h)):
            bad = ((r < 0) | (r > 1)) & ~inv
            if bad.any():
                i = int(bad.nonzero()[0])
                raise RewardError(
                    f"reward term {sub.label!r} at step {ctx.step}, sample {i}: the Llama 2 gate "
                    f"needs probabilities in [0, 1]; got {float(r[i])!r} (for a reward model set "
                    f"kwargs output: probability)"
                )
        invalid = inv_s | inv_h
        r_c = llama2_gate(r_s, r_h, tags, self.threshold).masked_fill(invalid, 0.0)
        raw = {
            self.safety.label: r_s.masked_fill(inv_s, math.nan),
            self.helpfulness.label: r_h.masked_fill(inv_h, math.nan),
            self.label: r_c.masked_fill(invalid, math.nan),
        }
        return r_c, invalid, raw


# ----------------------------------------------------------------------------------------------
# The configured reward


@dataclass
class RewardResult:
    """Rewards of one batch of ``n`` samples (CPU tensors).

    ``total[i] = Σ_k weight_k · per_term[k][i]`` (float32), and 0 where ``invalid[i]``.
    ``per_term[k]``: term ``k`` after its transforms, before its weight (0 where invalid).
    ``raw[k]``: term ``k`` before transforms (float32, NaN where that term failed); the Llama 2
    term adds ``<label>/safety`` and ``<label>/helpfulness``.
    """

    total: torch.Tensor
    per_term: dict[str, torch.Tensor]
    invalid: torch.Tensor
    raw: dict[str, torch.Tensor] = field(default_factory=dict)


class RewardFunction:
    """The configured reward: terms with weights, each with its transforms.

    ``__call__(prompts, completions, *, step, columns)``: every term scores all ``n`` samples
    (extra dataset ``columns`` reach callables as kwargs, each a list of length ``n``); each
    output is validated (a raise, a wrong length, None / NaN / ±inf / a non-number). With
    ``on_invalid="error"`` the first failure raises :class:`InvalidRewardError` naming the
    term, the step, the sample and its prompt (when a batch call raises, samples are re-scored
    one at a time to find which one fails); with ``"skip"`` the failing samples are marked
    ``invalid``, counted in ``invalid_counts[term]``, left out of every transform's statistics
    and get ``total = 0``. Transforms run in order on the valid samples; ``total`` is the
    weighted sum. Terms are labelled by name (a repeated name gets ``#2``, ``#3``…).
    """

    def __init__(
        self, cfg: RewardConfig, device: str | torch.device = "cpu", trust_remote_code: bool = False
    ):
        self.on_invalid = cfg.on_invalid
        self.device = device
        self.trust_remote_code = trust_remote_code
        self.terms: list[_Term] = []
        self.weights: list[float] = []
        self.transforms: list[list[Transform]] = []
        counts: dict[str, int] = {}
        for term in cfg.terms:
            counts[term.name] = counts.get(term.name, 0) + 1
            label = term.name if counts[term.name] == 1 else f"{term.name}#{counts[term.name]}"
            self.terms.append(self._build(term, label))
            self.weights.append(float(term.weight))
            self.transforms.append(
                [
                    parse_transform(spec, f"reward term {label!r}, transform {j}")
                    for j, spec in enumerate(term.transforms)
                ]
            )
        self.labels = [t.label for t in self.terms]
        self.invalid_counts: dict[str, int] = dict.fromkeys(self.labels, 0)

    # -- building ---------------------------------------------------------------------------

    def _build(self, term: RewardTerm, label: str) -> _Term:
        name, kwargs = term.name, dict(term.kwargs)
        if name == "llama2":
            return Llama2Gate(label, self._build_sub, **kwargs)
        return self._build_simple(name, kwargs, label)

    def _build_sub(self, spec: Any, label: str) -> _Term:
        if isinstance(spec, str):
            name, kwargs = spec, {}
        elif isinstance(spec, dict) and isinstance(spec.get("name"), str):
            extra = sorted(set(spec) - {"name", "kwargs"})
            if extra:
                raise RewardError(
                    f"{label}: a sub-term spec takes name and kwargs only (weights and "
                    f"transforms belong to the llama2 term); got {', '.join(extra)}"
                )
            name, kwargs = spec["name"], dict(spec.get("kwargs") or {})
        else:
            raise RewardError(
                f"{label}: a sub-term is a name or {{name: ..., kwargs: {{...}}}}; got {spec!r}"
            )
        if name == "llama2":
            raise RewardError(f"{label}: a llama2 term cannot contain another llama2 term")
        return self._build_simple(name, kwargs, label)

    def _build_simple(self, name: str, kwargs: dict[str, Any], label: str) -> _Term:
        builtins = builtin_rewards()
        if name.startswith("model:"):
            source = name[len("model:") :]
            unknown = sorted(set(kwargs) - set(RewardModel.PARAMS))
            if unknown:
                raise RewardError(
                    f"reward term {label!r}: unknown kwargs {', '.join(unknown)}; a reward model "
                    f"takes {', '.join(RewardModel.PARAMS)}"
                )
            try:
                model = RewardModel(
                    source, device=self.device, trust_remote_code=self.trust_remote_code, **kwargs
                )
            except RewardError as err:
                raise RewardError(f"reward term {label!r}: {err}") from err.__cause__
            return _CallableTerm(label, model, {}, pass_columns=False)
        if name in builtins:
            fn = builtins[name]
            params = [
                p.name
                for p in inspect.signature(fn).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY
            ]
            unknown = sorted(set(kwargs) - set(params))
            if unknown:
                raise RewardError(
                    f"reward term {label!r}: unknown kwargs {', '.join(unknown)}; {name} takes "
                    f"{', '.join(params) or 'no kwargs'}"
                )
            try:
                fn([], [], **kwargs)  # validates the kwargs now rather than at step 0
            except (RewardError, TypeError) as err:
                raise RewardError(f"reward term {label!r}: {err}") from None
            return _CallableTerm(label, fn, kwargs)
        if ":" in name:
            return _CallableTerm(label, _import_callable(name, label), kwargs)
        raise RewardError(
            f"reward term {name!r}: unknown reward; valid: a built-in "
            f"({', '.join(builtins)}), llama2, 'module.path:function' or 'model:<folder or hub id>'"
        )

    # -- calling ----------------------------------------------------------------------------

    def __call__(
        self,
        prompts: list,
        completions: list,
        *,
        step: int,
        columns: dict[str, list] | None = None,
    ) -> RewardResult:
        n = len(prompts)
        if len(completions) != n:
            raise RewardError(f"{n} prompts but {len(completions)} completions")
        columns = dict(columns or {})
        for key, values in columns.items():
            if len(values) != n:
                raise RewardError(
                    f"column {key!r} has {len(values)} values for {n} samples; repeat it per sample"
                )
        ctx = _Ctx(step=step, on_invalid=self.on_invalid, prompts=list(prompts))
        values, invalids, raw = [], [], {}
        for term in self.terms:
            v, inv, parts = term.evaluate(list(prompts), list(completions), columns, ctx)
            values.append(v)
            invalids.append(inv)
            raw.update({k: t.float() for k, t in parts.items()})
            self.invalid_counts[term.label] += int(inv.sum())
        invalid = torch.zeros(n, dtype=torch.bool)
        for inv in invalids:
            invalid |= inv
        valid = ~invalid
        total = torch.zeros(n, dtype=torch.float64)
        per_term = {}
        for term, v, weight, transforms in zip(self.terms, values, self.weights, self.transforms):
            x = v[valid]
            for j, t in enumerate(transforms):
                x = t(x, f"reward term {term.label!r}, transform {j} ({t.name}), step {step}")
            out = torch.zeros(n, dtype=torch.float64)
            out[valid] = x
            per_term[term.label] = out.float()
            total += weight * out
        return RewardResult(total=total.float(), per_term=per_term, invalid=invalid, raw=raw)

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"transforms": {label: [state per transform]}, "invalid_counts": {label: int}}``."""
        return {
            "transforms": {
                label: [t.state_dict() for t in ts]
                for label, ts in zip(self.labels, self.transforms)
            },
            "invalid_counts": dict(self.invalid_counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("transforms", {})
        if sorted(saved) != sorted(self.labels):
            raise RewardError(
                f"reward state is for terms {sorted(saved)} but the config has "
                f"{sorted(self.labels)}"
            )
        for label, ts in zip(self.labels, self.transforms):
            if len(saved[label]) != len(ts):
                raise RewardError(
                    f"reward state for term {label!r} has {len(saved[label])} transforms; the "
                    f"config has {len(ts)}"
                )
            for t, s in zip(ts, saved[label]):
                t.load_state_dict(s)
        self.invalid_counts.update(state.get("invalid_counts", {}))


def _import_callable(spec: str, label: str) -> Callable:
    """``"pkg.module:attr.path"`` → the callable, checked to accept ``**kwargs`` (TRL passes
    extra dataset columns as keyword arguments, and the term's kwargs the same way)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RewardError(
            f"reward term {label!r}: an import path is 'module.path:function'; got {spec!r}"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:
        raise RewardError(
            f"reward term {label!r}: cannot import module {module_name!r} "
            f"({type(err).__name__}: {err})"
        ) from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_"))
            raise RewardError(
                f"reward term {label!r}: {module_name!r} has no attribute {attr!r}; it defines "
                f"{', '.join(public[:20]) or 'nothing public'}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(
            f"reward term {label!r}: {spec!r} is a {type(obj).__name__}, not callable"
        )
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature; nothing to check
        return obj
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        raise RewardError(
            f"reward term {label!r}: {spec} must accept **kwargs (TRL's reward signature "
            f"fn(prompts, completions, **kwargs)): extra dataset columns are passed as keyword "
            f"arguments"
        )
    return obj
