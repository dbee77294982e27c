"""``kltrain compare RUNS_OR_SWEEP_DIR [--out DIR]``: a table, PNG plots and report.html.

Runs are grouped by their overrides without ``seed`` (a sweep's own list/grid overrides; for
loose run folders, the config keys whose values differ between them); a group's number is the
mean over its seeds ± the sample standard deviation (n − 1; blank for one seed).

- ``reward (last 3)``: the mean of ``reward/mean`` over the run's last three training steps;
- ``held-out ...``: from the run's ``eval.json`` (``kltrain eval``): ``eval/reward/mean``,
  ``eval/divergence/{reverse_kl,forward_kl,js}`` (nats per sequence), distinct-2, self-BLEU;
- ``steps``: the last logged step; ``train time (s)``: Σ ``time/step_seconds``.

Plots (one colour per divergence, the same in every plot; seeds as a min–max band around their
mean): reward vs step, reverse KL to the reference vs step, and held-out reward against
held-out reverse KL with the Pareto front (higher reward, lower divergence) drawn.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kltrain.config import ConfigError
from kltrain.training import checkpoint

#: Colours by divergence name, fixed so that a divergence looks the same in every report.
COLOURS = {
    "reverse_kl": "#1f77b4",
    "forward_kl": "#ff7f0e",
    "js": "#2ca02c",
    "alpha": "#d62728",
    "tv": "#9467bd",
    "hellinger": "#8c564b",
    "chi2": "#e377c2",
}
OTHER_COLOURS = ("#7f7f7f", "#bcbd22", "#17becf", "#000000")
#: Config keys that never distinguish runs.
IGNORED_KEYS = (
    "name",
    "trainer.output_dir",
    "trainer.resume",
    "tracking.",
    "versions",
    "gradient_followed",
)
HELDOUT = {
    "held-out reward": "eval/reward/mean",
    "held-out reverse KL": "eval/divergence/reverse_kl",
    "held-out forward KL": "eval/divergence/forward_kl",
    "held-out JS": "eval/divergence/js",
    "distinct-2": "eval/diversity/distinct_2",
    "self-BLEU": "eval/diversity/self_bleu",
}


@dataclass
class Run:
    name: str
    folder: Path
    overrides: dict[str, Any]
    config: dict[str, Any]  # flattened resolved config
    history: list[dict[str, Any]]
    eval: dict[str, float]

    @property
    def divergence(self) -> str:
        return str(self.config.get("kl.divergence", "?"))

    @property
    def group(self) -> str:
        return (
            ", ".join(f"{k.split('.')[-1]}={v}" for k, v in self.overrides.items() if k != "seed")
            or "all"
        )

    def series(self, key: str) -> tuple[list[int], list[float]]:
        rows = [r for r in self.history if key in r]
        return [int(r["step"]) for r in rows], [float(r[key]) for r in rows]

    def figures(self) -> dict[str, float]:
        _, reward = self.series("reward/mean")
        _, seconds = self.series("time/step_seconds")
        out = {"reward (last 3)": statistics.fmean(reward[-3:]) if reward else math.nan}
        out.update({label: float(self.eval.get(key, math.nan)) for label, key in HELDOUT.items()})
        out["steps"] = float(self.history[-1]["step"]) if self.history else math.nan
        out["train time (s)"] = sum(seconds)
        return out


# ----------------------------------------------------------------------------------------------
# Loading


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """One sweep folder (its finished members: a running or stopped one is part-trained) or
    several run folders."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1 and (paths[0] / "sweep.json").is_file():
        state = json.loads((paths[0] / "sweep.json").read_text())
        done = [m for m in state["members"] if m.get("state") == "finished"]
        runs = [_load_run(Path(m["folder"]), m["name"], m["overrides"]) for m in done]
    else:
        runs = [_load_run(p, p.name, {}) for p in paths]
        _set_differing_overrides(runs)
    if not runs:
        raise ConfigError(f"no finished run in {', '.join(map(str, paths))}")
    return runs


def unfinished_members(path: Path) -> list[str]:
    """``name (state)`` of a sweep's members left out of its report."""
    if not (path / "sweep.json").is_file():
        return []
    state = json.loads((path / "sweep.json").read_text())
    return [f"{m['name']} ({m['state']})" for m in state["members"] if m["state"] != "finished"]


def _load_run(folder: Path, name: str, overrides: dict[str, Any]) -> Run:
    if not (folder / "metrics.jsonl").is_file():
        raise ConfigError(f"{folder}: not a run folder (no metrics.jsonl)")
    history = [
        json.loads(line)
        for line in (folder / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    config = checkpoint.flatten_config(yaml.safe_load((folder / "config.yaml").read_text()) or {})
    eval_file = folder / "eval.json"
    metrics = json.loads(eval_file.read_text())["metrics"] if eval_file.is_file() else {}
    return Run(name, folder, dict(overrides), config, history, metrics)


def _set_differing_overrides(runs: list[Run]) -> None:
    keys = sorted({k for r in runs for k in r.config})
    differing = [
        k
        for k in keys
        if not k.startswith(IGNORED_KEYS)
        and len({json.dumps(r.config.get(k), default=str) for r in runs}) > 1
    ]
    for run in runs:
        run.overrides = {k: run.config.get(k) for k in differing}


# ----------------------------------------------------------------------------------------------
# Table


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return groups


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with n − 1) over the finite values; std NaN for fewer than two."""
    kept = [v for v in values if math.isfinite(v)]
    if not kept:
        return math.nan, math.nan
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else math.nan


def summary_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per group: ``{"group", "n", "divergence", <figure>: (mean, std), ...}``."""
    rows = []
    for label, members in group_runs(runs).items():
        figures = [m.figures() for m in members]
        row: dict[str, Any] = {
            "group": label,
            "n": len(members),
            "divergence": members[0].divergence,
        }
        for key in figures[0]:
            row[key] = mean_std([f[key] for f in figures])
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    keys = [k for k in rows[0] if k not in ("group", "n", "divergence")]
    lines = ["| " + " | ".join(["run (seeds)", *keys]) + " |", "|" + "---|" * (len(keys) + 1)]
    for row in rows:
        cells = [f"{row['group']} ({row['n']})", *(_cell(k, row[k]) for k in keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(key: str, value: tuple[float, float]) -> str:
    mean, std = value
    if not math.isfinite(mean):
        return "—"
    if key in ("steps", "train time (s)"):
        return f"{mean:.0f}"
    return f"{mean:.3f}" + (f" ± {std:.3f}" if math.isfinite(std) else "")


# ----------------------------------------------------------------------------------------------
# Plots


def colour_of(divergence: str, order: Sequence[str]) -> str:
    if divergence in COLOURS:
        return COLOURS[divergence]
    others = [d for d in order if d not in COLOURS]
    return OTHER_COLOURS[others.index(divergence) % len(OTHER_COLOURS)]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (x lower or equal and y higher or equal, one
    strictly), ordered by x: the best reward at each level of divergence."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (xo <= x and yo >= y) and (xo < x or yo > y)
            for j, (xo, yo) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def plot_over_steps(runs: Sequence[Run], key: str, ylabel: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    order = sorted({r.divergence for r in runs})
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    styles = ["-", "--", ":", "-."]
    seen: dict[str, int] = {}
    for label, members in group_runs(runs).items():
        div = members[0].divergence
        style = styles[seen.get(div, 0) % len(styles)]
        seen[div] = seen.get(div, 0) + 1
        steps, mean, low, high = _band([m.series(key) for m in members])
        if not steps:
            continue
        colour = colour_of(div, order)
        band = "; band: min–max over seeds" if len(members) > 1 else ""
        ax.plot(steps, mean, style, color=colour, label=f"{label} (n={len(members)}{band})")
        if len(members) > 1:
            ax.fill_between(steps, low, high, color=colour, alpha=0.18, linewidth=0)
    ax.set(xlabel="training step", ylabel=ylabel, title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _band(series: Sequence[tuple[list[int], list[float]]]):
    """Steps every seed logged; the mean, min and max over seeds at each."""
    common = sorted(set.intersection(*(set(s) for s, _ in series))) if series else []
    values = [[dict(zip(s, v))[t] for s, v in series] for t in common]
    return (
        common,
        [statistics.fmean(v) for v in values],
        [min(v) for v in values],
        [max(v) for v in values],
    )


def plot_frontier(runs: Sequence[Run], path: Path) -> bool:
    """Held-out reward against held-out reverse KL per run, the Pareto front over all runs.
    False (nothing drawn) when no run has an eval.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have = [
        r for r in runs if "eval/reward/mean" in r.eval and "eval/divergence/reverse_kl" in r.eval
    ]
    if not have:
        return False
    order = sorted({r.divergence for r in runs})
    points = [(r.eval["eval/divergence/reverse_kl"], r.eval["eval/reward/mean"]) for r in have]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for div in order:
        pts = [p for p, r in zip(points, have) if r.divergence == div]
        if pts:
            ax.scatter(*zip(*pts), s=36, color=colour_of(div, order), label=div, zorder=3)
    front = [points[i] for i in pareto_front(points)]
    ax.plot(*zip(*front), "k--", linewidth=1, label="Pareto front", zorder=2)
    ax.set(
        xlabel="held-out reverse KL to the reference (nats per sequence)",
        ylabel="held-out reward (mean per sample)",
        title="Reward against drift on held-out prompts (one point per run)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------
# Writing


def compare(paths: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Write report.md, report.html, summary.json and the PNGs; returns the report folder."""
    runs = load_runs(paths)
    out = Path(out) if out else (Path(paths[0]) / "report" if len(paths) == 1 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(runs)
    images = {
        "reward_vs_step.png": "Reward during training",
        "reverse_kl_vs_step.png": "Reverse KL to the reference during training",
    }
    plot_over_steps(
        runs,
        "reward/mean",
        "reward (mean per sample)",
        images["reward_vs_step.png"],
        out / "reward_vs_step.png",
    )
    plot_over_steps(
        runs, "divergence/reverse_kl", "reverse KL to the reference (nats per sequence)",
        images["reverse_kl_vs_step.png"], out / "reverse_kl_vs_step.png",
    )  # fmt: skip
    if plot_frontier(runs, out / "frontier.png"):
        images["frontier.png"] = "Held-out reward against held-out reverse KL"
    table = markdown_table(rows)
    (out / "summary.json").write_text(json.dumps(rows, indent=1, allow_nan=True))
    left = unfinished_members(Path(paths[0])) if len(paths) == 1 else []
    (out / "report.md").write_text(_markdown(runs, table, images, left))
    (out / "report.html").write_text(_html(runs, rows, images, out))
    return out


def _markdown(runs: Sequence[Run], table: str, images: dict[str, str], left: list[str]) -> str:
    missing = [r.name for r in runs if not r.eval]
    parts = [
        "# Comparison\n",
        f"{len(runs)} runs; mean ± sample std over seeds; held-out columns from each run's "
        "eval.json.",
        ("Runs without eval.json: " + ", ".join(missing)) if missing else "",
        ("Not finished, left out: " + ", ".join(left)) if left else "",
        table,
        "",
        *[f"![{title}]({name})\n" for name, title in images.items()],
    ]
    return "\n\n".join(p for p in parts if p)


def _html(
    runs: Sequence[Run], rows: Sequence[dict[str, Any]], images: dict[str, str], out: Path
) -> str:
    keys = [k for k in rows[0] if k not in ("group", "n", "divergence")]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["run (seeds)", *keys])
    body = "".join(
        "<tr>"
        + f"<td>{html.escape(row['group'])} ({row['n']})</td>"
        + "".join(f"<td>{html.escape(_cell(k, row[k]))}</td>" for k in keys)
        + "</tr>"
        for row in rows
    )
    figures = "".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,'
        f'{base64.b64encode((out / name).read_bytes()).decode()}"><figcaption>{html.escape(title)}'
        "</figcaption></figure>"
        for name, title in images.items()
    )
    style = (
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}td:first-child{text-align:left}"
        "img{max-width:100%}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>kltrain comparison</title>"
        f"<style>{style}</style></head><body><h1>kltrain comparison</h1>"
        f"<p>{len(runs)} runs; mean ± sample std over seeds.</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{figures}</body></html>"
    )
