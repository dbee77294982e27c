"""Kill-and-resume chaos test on the embedded model: evidence that resuming is bit-exact.

One uninterrupted run, then N trials. Each trial starts ``python -m kltrain fit CONFIG --resume``
in a fresh run folder and SIGKILLs it at a random moment (uniform over the expected remaining
training time, once the run has started), ``--kills`` times, then lets the last attempt finish.
A trial matches when its final weights, last checkpoint (optimizer, scheduler, β, sampler,
whitening statistics, RNG states) and every step's metrics and samples equal the uninterrupted
run's exactly (wall-clock ``time/*`` metrics and the W&B run id excepted).

    python scripts/chaos_resume.py --trials 5 --kills 2 --out runs/chaos
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's kltrain, in this process and (cwd) the runs

from kltrain.training import checkpoint  # noqa: E402

CONFIG = {
    "name": "chaos",
    "seed": 3,
    "model": {"policy": "smollm2-135m"},
    "data": {"prompts": "builtin:movie_reviews", "chat_template": "off", "max_prompt_tokens": 32},
    "generation": {"max_new_tokens": 8},
    "reward": {"terms": [{"name": "sentiment", "transforms": ["whiten"]}]},
    "kl": {"coef": 0.05, "adaptive": {"target": 2.0, "horizon": 100}},
    "algorithm": {"name": "rloo", "num_generations": 2},
    "trainer": {
        "prompts_per_step": 2,
        "micro_batch_size": 2,
        "learning_rate": 1e-5,
        "save_every": 2,
        "keep_last": 1,
        "log_samples_every": 1,
    },
    "tracking": {"wandb": {"mode": "disabled"}, "progress": False},
}


def write_config(path: Path, out: Path, steps: int) -> Path:
    raw = json.loads(json.dumps(CONFIG))
    raw["trainer"].update(max_steps=steps, output_dir=str(out))
    path.write_text(yaml.safe_dump(raw))
    return path


def attempt(config: Path, log: Path, kill_after: float | None) -> int | None:
    """One ``kltrain fit --resume``; SIGKILL ``kill_after`` s after training starts (None: never).
    Returns the exit code, or None when it was killed."""
    with open(log, "a") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kltrain", "fit", str(config), "--resume"],
            stdout=subprocess.PIPE,
            stderr=fh,
            text=True,
            cwd=REPO,
        )
        for line in proc.stdout:  # "run folder" is printed once the model is built
            fh.write(line)
            if "run folder" in line:
                break
        if kill_after is None:
            fh.write(proc.stdout.read())
            return proc.wait()
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return None
        return proc.returncode


def differences(ref: Path, run: Path, steps: int) -> list[str]:
    out = []
    if metrics(ref) != metrics(run):
        out.append("metrics.jsonl")
    if (ref / "samples.jsonl").read_text() != (run / "samples.jsonl").read_text():
        out.append("samples.jsonl")
    a = ref / "checkpoints" / f"step-{steps:08d}"
    b = run / "checkpoints" / f"step-{steps:08d}"
    for folder in ("model",):
        for file in (a / folder).glob("*.safetensors"):
            ta, tb = load_file(str(file)), load_file(str(b / folder / file.name))
            if ta.keys() != tb.keys() or not all(torch.equal(ta[k], tb[k]) for k in ta):
                out.append(f"{folder}/{file.name}")
    for name in ("optimizer.pt", "scheduler.pt"):
        if not equal(checkpoint.load_tensors(a / name), checkpoint.load_tensors(b / name)):
            out.append(name)
    sa, sb = checkpoint.load_state(a), checkpoint.load_state(b)
    sa["trainer"].pop("wandb_run_id")
    sb["trainer"].pop("wandb_run_id")
    if not equal(sa, sb):
        out.append("state.json")
    if checkpoint.load_rng(a) != checkpoint.load_rng(b):
        out.append("rng.json")
    return out


def equal(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(equal(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(equal(i, j) for i, j in zip(x, y))
    return x == y


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--kills", type=int, default=2, help="SIGKILLs per trial")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill times")
    parser.add_argument("--out", default="runs/chaos")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(args.out).resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    ref = root / "reference"
    start = time.time()
    rc = attempt(write_config(root / "reference.yaml", ref, args.steps), root / "ref.log", None)
    if rc != 0:
        print(f"reference run failed ({rc}); see {root / 'ref.log'}")
        return 1
    rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    train_seconds = sum(r["time/step_seconds"] for r in rows)
    print(f"reference: {args.steps} steps, {train_seconds:.0f} s of training, "
          f"{time.time() - start:.0f} s in all", flush=True)  # fmt: skip
    matched = 0
    for trial in range(args.trials):
        run = root / f"trial{trial}"
        config = write_config(root / f"trial{trial}.yaml", run, args.steps)
        log, kills = root / f"trial{trial}.log", []
        for _ in range(args.kills):
            done = checkpoint.latest(run / "checkpoints")
            step = checkpoint.load_state(done)["step"] if done else 0
            remaining = train_seconds * (args.steps - step) / args.steps
            delay = rng.uniform(0.0, remaining + 2.0)
            if attempt(config, log, delay) is None:
                kills.append(f"{delay:.1f}s into an attempt starting at step {step}")
        rc = attempt(config, log, None)
        diff = differences(ref, run, args.steps) if rc == 0 else [f"exit code {rc}"]
        matched += not diff
        print(f"trial {trial}: killed {kills or 'never (finished first)'}; "
              f"{'MATCH' if not diff else 'DIFFER: ' + ', '.join(diff)}", flush=True)  # fmt: skip
    print(f"{matched}/{args.trials} resumed runs matched the uninterrupted run exactly")
    return 0 if matched == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
