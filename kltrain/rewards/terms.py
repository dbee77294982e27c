"""Reward terms: one configured scorer each (a callable, or the Llama 2 gate over two terms),
checking every output and applying its transforms."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kltrain.rewards.errors import InvalidRewardError, RewardError, check
from kltrain.rewards.llama2 import llama2_gate


@dataclass
class TermContext:
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


class Term(ABC):
    """One scorer with its label; ``evaluate`` → (values f64 [n] (0 where invalid), invalid
    bool [n], raw parts for diagnostics)."""

    label: str

    @abstractmethod
    def evaluate(
        self, prompts: list, completions: list, columns: dict[str, list], ctx: TermContext
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Score one batch."""


class CallableTerm(Term):
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


class Llama2Gate(Term):
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

    def __init__(self, label: str, build: Callable[[Any, str], Term], **kwargs: Any):
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
        check(
            isinstance(self.safety_column, str),
            f"{label}: safety_column must be a column name",
            self.safety_column,
        )
        t = self.threshold
        check(
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
