"""What a run shows and leaves behind: the console progress bar and summary, ``config.yaml``,
``metrics.jsonl`` (one JSON object per step), ``samples.jsonl``, and W&B through Accelerate's
trackers. Only the main process writes.

A resumed run (``start(first_step=s)`` with s > 0) first cuts both JSONL files back to steps ≤ s,
so the steps a crashed attempt logged after its last checkpoint are replaced, not doubled; W&B
continues the same run id (``resume="allow"``) and steps it already holds are not sent again, so
its step axis never goes backwards."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor
from tqdm.auto import tqdm

from kltrain import __version__
from kltrain.algorithms import describe_objective
from kltrain.config import RunConfig, to_yaml
from kltrain.objective import Regulariser
from kltrain.rollout import Rollout

if TYPE_CHECKING:
    from accelerate import Accelerator

LIBRARIES = ("torch", "transformers", "accelerate", "datasets", "trl", "peft", "wandb")


@dataclass
class StepResult:
    """One finished step as the logger sees it: its metrics, samples and rewards [B]."""

    step: int
    metrics: dict[str, float]
    rollout: Rollout
    rewards: Tensor


def library_versions() -> dict[str, str]:
    versions = {"kltrain": __version__, "python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class RunLogger:
    def __init__(self, cfg: RunConfig, output_dir: Path, accelerator: Accelerator):
        self.cfg = cfg
        self.dir = Path(output_dir)
        self.acc = accelerator
        self.main = accelerator.is_main_process
        self.history: list[dict[str, Any]] = []
        self.bar: tqdm | None = None
        self.wandb_next_step = 0
        self.trained_metric: str | None = None
        self.reward_is_raw = not any(term.transforms for term in cfg.reward.terms)

    def start(
        self,
        regulariser: Regulariser,
        first_step: int = 0,
        run_id: str | None = None,
        world_size: int = 1,
        engine: str = "none",
    ) -> None:
        """``world_size`` and ``engine`` (none, ddp, fsdp2): the number of processes in the run
        and how they share the work, recorded in config.yaml."""
        if not self.main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.history = truncate_jsonl(self.dir / "metrics.jsonl", first_step)
        truncate_jsonl(self.dir / "samples.jsonl", first_step)
        followed, line = describe_objective(self.cfg, regulariser)
        if self.cfg.algorithm.name != "fdpg":  # under f-DPG, kl.* names the objective
            self.trained_metric = f"train/{regulariser.metric_name}"
        extra = {
            "versions": library_versions(),
            "gradient_followed": followed,
            "world_size": world_size,
            "engine": engine,
        }
        (self.dir / "config.yaml").write_text(to_yaml(self.cfg, extra))
        print(
            f"kltrain: run folder {self.dir}\nkltrain: {self.cfg.algorithm.name}, {line}",
            flush=True,
        )
        self._init_wandb(extra, run_id)
        self.bar = tqdm(
            total=self.cfg.trainer.max_steps,
            initial=first_step,
            desc=self.cfg.name,
            disable=not self.cfg.tracking.progress,
            dynamic_ncols=True,
        )

    def _init_wandb(self, extra: dict[str, Any], run_id: str | None) -> None:
        wb = self.cfg.tracking.wandb
        if wb.mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        init = {
            "mode": wb.mode,
            "group": wb.group,
            "tags": wb.tags or None,
            "name": wb.run_name or self.dir.name,
            "dir": str(self.dir),
        }
        if run_id:
            init.update(id=run_id, resume="allow")
        config = {**self.cfg.model_dump(mode="json"), **extra}
        self.acc.init_trackers(wb.project, config=config, init_kwargs={"wandb": init})
        run = self.acc.get_tracker("wandb", unwrap=True)
        self.wandb_next_step = int(getattr(run, "step", 0) or 0)

    def log_step(self, result: StepResult) -> None:
        metrics = {"step": result.step, **result.metrics}
        if self.cfg.tracking.wandb.mode != "disabled" and result.step >= self.wandb_next_step:
            self.acc.log(result.metrics, step=result.step)
        if not self.main:
            return
        self.history.append(metrics)
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(metrics, allow_nan=True) + "\n")
        every = self.cfg.trainer.log_samples_every
        if every and (result.step % every == 0 or result.step == 1):
            self._write_samples(result)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(progress_fields(metrics, self.trained_metric), refresh=False)

    def _write_samples(self, result: StepResult) -> None:
        r = result.rollout
        with open(self.dir / "samples.jsonl", "a") as fh:
            for i, completion in enumerate(r.completions):
                row = {
                    "step": result.step,
                    "prompt": r.prompts[i],
                    "completion": completion,
                    "reward": float(result.rewards[i]),
                    "length": int(r.completion_mask[i].sum()),
                }
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    def finish(self, completed: bool = True) -> dict[str, float]:
        """Close the trackers; for a ``completed`` run, print the summary and the folder."""
        if self.cfg.tracking.wandb.mode != "disabled":
            self.acc.end_training()
        if not self.main:
            return {}
        if self.bar is not None:
            self.bar.close()
        summary = summarise(self.history, trained_metric=self.trained_metric)
        if summary and completed:
            print("kltrain: summary " + summary_line(summary, self.reward_is_raw), flush=True)
            print(f"kltrain: wrote {self.dir}", flush=True)
        return summary


def truncate_jsonl(path: Path, last_step: int) -> list[dict[str, Any]]:
    """Keep the rows of ``path`` with ``step ≤ last_step`` (rewritten atomically); return them.
    A torn last line (the process was killed mid-write) is dropped."""
    if not path.is_file():
        return []
    rows, kept = [], []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", math.inf) <= last_step:
            rows.append(row)
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return rows


def progress_fields(metrics: dict[str, Any], trained_metric: str | None) -> dict[str, str]:
    """What the progress bar shows: each reward term's raw score (before transforms such as
    ``whiten``, which centre the reward every step), the trained divergence, β (``train/coef``),
    the exact reverse KL to the reference and the step time."""
    fields = {
        key.removeprefix("reward/raw/"): metrics[key]
        for key in sorted(metrics)
        if key.startswith("reward/raw/")
    }
    shown = {
        trained_metric: trained_metric.removeprefix("train/") if trained_metric else None,
        "train/coef": "coef",
        "divergence/reverse_kl": "reverse_kl",
        "time/step_seconds": "s/step",
    }
    for key, label in shown.items():
        if key and key in metrics:
            fields.setdefault(label, metrics[key])
    return {label: _short(value) for label, value in fields.items()}


def summarise(
    history: list[dict[str, Any]], window: int = 3, trained_metric: str | None = None
) -> dict[str, float]:
    """Mean reward over the first and last ``window`` steps, of the total (``reward/mean``, after
    transforms) and of each term's raw score (comparable across steps when a transform such as
    ``whiten`` centres the total); the final trained divergence, β and exact divergences."""
    if not history:
        return {}
    first, last = history[:window], history[-window:]
    out = {
        "steps": float(history[-1]["step"]),
        "reward_first": _avg(first, "reward/mean"),
        "reward_last": _avg(last, "reward/mean"),
    }
    for key in history[-1]:
        if key.startswith("reward/raw/"):
            term = key.removeprefix("reward/raw/")
            out[f"{term}_first"] = _avg(first, key)
            out[f"{term}_last"] = _avg(last, key)
    finals = ["divergence/reverse_kl", "divergence/forward_kl", "divergence/js", "train/coef"]
    if trained_metric:
        finals.insert(0, trained_metric)
    for key in finals:
        if key in history[-1]:
            out[key.removeprefix("train/").removeprefix("divergence/") + "_final"] = float(
                history[-1][key]
            )
    return out


def summary_line(summary: dict[str, float], reward_is_raw: bool, window: int = 3) -> str:
    """The summary for people: each raw reward term as first → last window means, the total
    after transforms only when no transform changes it (a whitened total is ≈ 0 by
    construction), then the last step's trained divergence, β and exact divergences."""
    parts = [f"{int(summary['steps'])} steps (means of the first → last {window} steps)"]
    for term in [k.removesuffix("_first") for k in summary if k.endswith("_first")]:
        if term == "reward" and not reward_is_raw:
            continue
        label = "reward" if term == "reward" else f"{term} (raw)"
        first, last = _short(summary[f"{term}_first"]), _short(summary[f"{term}_last"])
        parts.append(f"{label} {first} → {last}")
    finals = {k.removesuffix("_final"): v for k, v in summary.items() if k.endswith("_final")}
    parts += [f"{name} {_short(value)}" for name, value in finals.items()]
    return "; ".join(parts)


def _avg(rows: list[dict[str, Any]], key: str) -> float:
    vals = [float(r[key]) for r in rows if key in r]
    return sum(vals) / len(vals) if vals else math.nan


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
