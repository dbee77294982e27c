"""Built-in reward scorers, each with TRL's signature
``fn(prompts, completions, **kwargs) -> list[float]``: ``sentiment``, ``keyword``, ``length``,
``toy_safety``, ``toy_helpfulness``."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import cache
from typing import Any

from kltrain.rewards.errors import RewardError, check
from kltrain.rewards.text import (
    TOKEN_RE,
    WORD_RE,
    completion_text,
    load_lexicon,
    normalise_text,
    phrase_pattern,
)

RewardCallable = Callable[..., list]


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
    for token in TOKEN_RE.findall(normalise_text(text)):
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
    check(scale > 0, "sentiment: scale must be > 0", scale)
    check(isinstance(min_words, int) and min_words >= 1, "sentiment: min_words ≥ 1", min_words)
    check(
        isinstance(negation_window, int) and negation_window >= 0,
        "sentiment: negation_window ≥ 0",
        negation_window,
    )
    check(
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
    pattern = phrase_pattern(words)
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


def _distinct_hits(pattern: re.Pattern[str], text: str) -> int:
    return len({m.group(0).lower() for m in pattern.finditer(text)})


@cache
def _lexicon_pattern(name: str) -> re.Pattern[str]:
    return phrase_pattern(sorted(load_lexicon(name)))


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
        text = normalise_text(completion_text(completion))
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
        text = normalise_text(completion_text(completion))
        words = WORD_RE.findall(text)
        content = {
            w
            for w in WORD_RE.findall(normalise_text(completion_text(prompt)))
            if len(w) >= 4 and w not in _STOPWORDS
        }
        f = len(content & set(words)) / len(content) if content else 0.0
        r = _distinct_hits(_lexicon_pattern("refusal"), text)
        out.append(_sigmoid(-1.0 + 2.5 * f + 1.5 * min(len(words) / 40, 1.0) - 2.0 * min(r, 1)))
    return out


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


# ----------------------------------------------------------------------------------------------
