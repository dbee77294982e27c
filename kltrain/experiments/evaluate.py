"""``kltrain eval RUN_OR_CHECKPOINT``: load a run's checkpoint and config, choose its held-out
prompts (the run's ``data.heldout_prompts`` split, or a seeded slice its sampler never drew),
evaluate with :func:`kltrain.evaluation.evaluate_policy` and write ``eval.json``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from kltrain.config import ConfigError, RunConfig, config_from_dict
from kltrain.data import PromptSampler, heldout_indices, load_prompts
from kltrain.evaluation import EvalData, evaluate_policy
from kltrain.rewards import RewardFunction
from kltrain.training import checkpoint


def heldout_data(
    cfg: RunConfig, steps: int, num_prompts: int | None, prompts: str | None
) -> EvalData:
    """``--prompts FILE`` (every row, or the first ``num_prompts``); else the run's
    ``data.heldout_prompts`` split; else a seeded slice of the prompts training never sampled in
    its ``steps`` steps (its sampler replayed)."""
    if prompts is not None:
        dataset = load_prompts(cfg.data.model_copy(update={"prompts": prompts, "split": "train"}))
        indices = list(range(len(dataset)))[:num_prompts]
        return EvalData(dataset, indices, prompts)
    full = load_prompts(cfg.data)
    held = heldout_indices(len(full), cfg.data.heldout_prompts, cfg.data.heldout_seed)
    if held:
        return EvalData(full, held[:num_prompts], f"{cfg.data.prompts} (data.heldout_prompts)")
    unseen = unsampled_indices(cfg, len(full), steps)
    if not unseen:
        raise ConfigError(
            f"no held-out prompts: data.heldout_prompts is 0 and the run's {steps} steps sampled "
            f"every prompt of {cfg.data.prompts}; pass --prompts FILE"
        )
    return EvalData(
        full, unseen[:num_prompts], f"{cfg.data.prompts} (prompts training never sampled)"
    )


def unsampled_indices(cfg: RunConfig, num_prompts: int, steps: int) -> list[int]:
    """Dataset indices the run's sampler never returned in ``steps`` steps (training order
    replayed: it is a pure function of (seed, epoch)), in a seeded order."""
    sampler = PromptSampler(num_prompts, seed=cfg.seed, shuffle=cfg.data.shuffle)
    seen = set(sampler.next_batch(cfg.trainer.prompts_per_step * steps)) if steps else set()
    order = PromptSampler(num_prompts, seed=cfg.data.heldout_seed).next_batch(num_prompts)
    return [i for i in order if i not in seen]


# ----------------------------------------------------------------------------------------------
# ``kltrain eval``


def resolve_target(path: str | Path) -> tuple[Path, Path]:
    """(run folder, checkpoint) for a run folder (its newest complete checkpoint) or a
    checkpoint folder."""
    path = Path(path)
    if checkpoint.is_complete(path):
        return path.parent.parent, path
    found = checkpoint.latest(path / "checkpoints")
    if found is None:
        raise ConfigError(
            f"{path}: neither a complete checkpoint nor a run folder with one in checkpoints/ "
            f"(a run writes one at its last step and every trainer.save_every steps)"
        )
    return path, found


def load_run_config(ckpt: Path) -> RunConfig:
    raw = checkpoint.load_config_dict(ckpt)
    if raw is None:
        raise ConfigError(f"{ckpt}: no config.yaml in this checkpoint")
    for key in ("versions", "gradient_followed"):
        raw.pop(key, None)
    return config_from_dict(raw, source=str(ckpt / "config.yaml"))


def evaluate_run(
    path: str | Path,
    *,
    samples_per_prompt: int | None = None,
    seed: int = 0,
    num_prompts: int | None = None,
    prompts: str | None = None,
    progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Evaluate a run's newest checkpoint (or the given one); write and return eval.json."""
    from kltrain.algorithms import make_algorithm
    from kltrain.models.loading import load_models

    run_dir, ckpt = resolve_target(path)
    cfg = load_run_config(ckpt)
    step = int(checkpoint.load_state(ckpt)["step"])
    k = samples_per_prompt or cfg.algorithm.num_generations
    device = "cuda" if torch.cuda.is_available() and cfg.trainer.device != "cpu" else "cpu"
    models = load_models(cfg.model)
    checkpoint.load_model(ckpt, models.policy)
    models.policy.to(device).eval()
    if models.reference is not None:
        models.reference.to(device)
    algorithm = None
    if cfg.algorithm.name == "fdpg":
        algorithm = make_algorithm(cfg)
        algorithm.setup(models)
        algorithm.load_state_dict(checkpoint.load_state(ckpt)["algorithm"])
    data = heldout_data(cfg, step, num_prompts, prompts)
    reward_fn = RewardFunction(
        cfg.reward, device=device, trust_remote_code=cfg.model.trust_remote_code
    )
    reward_fn.load_state_dict(checkpoint.load_state(ckpt)["reward"])
    start = time.perf_counter()
    metrics = evaluate_policy(
        models, cfg, data, samples_per_prompt=k, seed=seed, reward_fn=reward_fn,
        algorithm=algorithm, progress=progress,
    )  # fmt: skip
    report = {
        "run": str(run_dir),
        "checkpoint": str(ckpt),
        "step": step,
        "prompts": data.source,
        "num_prompts": len(data.indices),
        "samples_per_prompt": k,
        "seed": seed,
        "seconds": time.perf_counter() - start,
        "metrics": {f"eval/{key}": value for key, value in metrics.items()},
    }
    out = run_dir / (
        "eval.json"
        if ckpt == checkpoint.latest(run_dir / "checkpoints")
        else f"eval-{ckpt.name}.json"
    )
    out.write_text(json.dumps(report, indent=1, allow_nan=True))
    return out, report
