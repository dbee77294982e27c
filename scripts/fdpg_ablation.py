"""Forward KL vs reverse KL vs JS in f-DPG toward one pointwise constraint, equal budgets.

Each divergence trains the embedded smollm2-135m from the same seed, on the same prompt(s), for the
same number of steps and samples, toward the same target ``p ∝ π_ref·b_ε`` (b: the keyword
constraint of configs/fdpg_forward_kl.yaml; ``b_ε = ε + (1 − ε)·b``, the softening reverse KL
needs, used for all three so that "divergence to target" is measured against one p). Writes
``<out>/table.md`` and ``<out>/ablation.png``: constraint satisfaction, JS and forward KL to the
target, distinct-2 and per-token entropy against steps.

    python scripts/fdpg_ablation.py --steps 24 --out runs/fdpg_ablation
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's kltrain, whatever the environment has installed
DIVERGENCES = ("forward_kl", "reverse_kl", "js")
COLUMNS = {
    "constraint": "fdpg/alignment/constraint",
    "JS to p": "fdpg/target_divergence/js",
    "fwd KL to p": "fdpg/target_divergence/forward_kl",
    "rev KL to p": "fdpg/target_divergence/reverse_kl",
    "rev KL to π_ref": "divergence/reverse_kl",
    "distinct-1": "diversity/distinct_1",
    "distinct-2": "diversity/distinct_2",
    "distinct-3": "diversity/distinct_3",
    "entropy/token": "completion/entropy_per_token",
}


def run_one(divergence: str, args: argparse.Namespace) -> list[dict]:
    from kltrain.config import load_config
    from kltrain.training.trainer import Trainer

    out = Path(args.out) / divergence
    prompts = Path(args.out) / "prompts.jsonl"
    overrides = [
        f"data.prompts={prompts}" if args.prompt else "data.prompts=builtin:movie_reviews",
        f"name=ablation_{divergence}",
        f"kl.divergence={divergence}",
        f"algorithm.fdpg.epsilon={args.epsilon}",
        f"algorithm.num_generations={args.generations}",
        f"trainer.prompts_per_step={args.prompts}",
        f"trainer.max_steps={args.steps}",
        f"trainer.learning_rate={args.lr}",
        f"generation.max_new_tokens={args.max_new_tokens}",
        f"trainer.output_dir={out}",
        "trainer.log_samples_every=4",
        "tracking.wandb.mode=disabled",
        "tracking.progress=false",
    ]
    cfg = load_config(ROOT / "configs" / "fdpg_forward_kl.yaml", overrides)
    Trainer(cfg).fit()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def window_mean(rows: list[dict], key: str, window: int, last: bool) -> float:
    part = rows[-window:] if last else rows[:window]
    vals = [r[key] for r in part if key in r]
    return sum(vals) / len(vals) if vals else float("nan")


def table(results: dict[str, list[dict]], window: int) -> str:
    """Markdown: each metric's mean over the first and the last ``window`` steps."""
    head = "| divergence | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for div, rows in results.items():
        cells = [
            f"{window_mean(rows, k, window, False):.3f} → {window_mean(rows, k, window, True):.3f}"
            for k in COLUMNS.values()
        ]
        lines.append(f"| {div} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict]], path: Path, smooth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["constraint", "JS to p", "fwd KL to p", "distinct-2", "entropy/token"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, name in zip(axes, panels):
        key = COLUMNS[name]
        for div, rows in results.items():
            steps = [r["step"] for r in rows if key in r]
            vals = [r[key] for r in rows if key in r]
            (line,) = ax.plot(steps, vals, alpha=0.25)
            avg = [
                sum(vals[max(0, i - smooth + 1) : i + 1])
                / len(vals[max(0, i - smooth + 1) : i + 1])
                for i in range(len(vals))
            ]
            ax.plot(steps, avg, color=line.get_color(), label=div)
        ax.set_title(name)
        ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--epsilon", type=float, default=1e-3)
    parser.add_argument("--window", type=int, default=5, help="steps averaged in the table")
    parser.add_argument(
        "--prompt",
        default="I finally caught 'The Last Harbor' at the cinema, and",
        help="one prompt for every sample (one Z, as in the paper's unconditional setting); "
        "'' uses the 242 movie-review prompts (one Z each, estimated from few samples)",
    )
    parser.add_argument("--out", default="runs/fdpg_ablation")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.jsonl").write_text(json.dumps({"prompt": args.prompt}) + "\n")
    results = {div: run_one(div, args) for div in DIVERGENCES}
    md = table(results, args.window)
    settings = (
        f"{args.steps} steps × {args.prompts} prompts × {args.generations} samples × "
        f"{args.max_new_tokens} tokens, lr {args.lr}, ε = {args.epsilon}; first → last "
        f"{args.window}-step means; prompt: {args.prompt or 'builtin:movie_reviews'}\n\n"
    )
    (out / "table.md").write_text(settings + md)
    plot(results, out / "ablation.png", smooth=args.window)
    print(settings + md)
    print(f"wrote {out / 'table.md'} and {out / 'ablation.png'}")


if __name__ == "__main__":
    main()
