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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kltrain.config import RewardConfig, RewardTerm
from kltrain.rewards.builtin import builtin_rewards
from kltrain.rewards.errors import RewardError
from kltrain.rewards.reward_model import RewardModel
from kltrain.rewards.terms import CallableTerm, Llama2Gate, Term, TermContext
from kltrain.rewards.transforms import Gather, Transform, parse_transform


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
        self.terms: list[Term] = []
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

    def _build(self, term: RewardTerm, label: str) -> Term:
        name, kwargs = term.name, dict(term.kwargs)
        if name == "llama2":
            return Llama2Gate(label, self._build_sub, **kwargs)
        return self._build_simple(name, kwargs, label)

    def _build_sub(self, spec: Any, label: str) -> Term:
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

    def _build_simple(self, name: str, kwargs: dict[str, Any], label: str) -> Term:
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
            return CallableTerm(label, model, {}, pass_columns=False)
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
            return CallableTerm(label, fn, kwargs)
        if ":" in name:
            return CallableTerm(label, _import_callable(name, label), kwargs)
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
        gather: Gather | None = None,
    ) -> RewardResult:
        """``gather``: all processes' values of a term (a collective), for the transforms that
        take statistics (``whiten``); None on one process."""
        n = len(prompts)
        if len(completions) != n:
            raise RewardError(f"{n} prompts but {len(completions)} completions")
        columns = dict(columns or {})
        for key, values in columns.items():
            if len(values) != n:
                raise RewardError(
                    f"column {key!r} has {len(values)} values for {n} samples; repeat it per sample"
                )
        ctx = TermContext(step=step, on_invalid=self.on_invalid, prompts=list(prompts))
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
                where = f"reward term {term.label!r}, transform {j} ({t.name}), step {step}"
                x = t(x, where, gather)
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
