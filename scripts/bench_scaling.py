"""Scaling of the loop over processes on one machine: step time, tokens/s, peak memory and the
share of time in blocking collectives, for 1 and 2 processes (torchrun; gloo on CPU, NCCL on
GPUs), on a random Llama-shaped model (no download).

    python scripts/bench_scaling.py --quick          # ~2-3 min on a 2-core CPU
    python scripts/bench_scaling.py --processes 1 2 4 --steps 8 --hidden 512 --layers 8
    python scripts/bench_scaling.py --quick --fsdp2  # also every N > 1 under FSDP2
    python scripts/bench_scaling.py --quick --zero3  # also every N > 1 under DeepSpeed ZeRO-3

Under FSDP2, "gather" is the wall time of the whole-model gathers kltrain makes around each
rollout (generation and the scoring passes run on full weights) and evaluation; the per-block
gathers inside the training forward and backward and the lm_head gather (once per micro-batch,
by the root unit's forward) are FSDP's own and show only through the step time. Under ZeRO-3
it is the wall time of entering and leaving kltrain's gathered phase (every parameter
all-gathered, DeepSpeed's hooks removed; hooks put back and parameters partitioned again); the
per-module gathers of the training forward and backward and the lm_head's show only through the
step time.

The same global batch runs at every world size (the runs are the same run, tests/
test_world_size.py), so the ratio of step times is the scaling. "comm" is the wall time spent in
blocking torch.distributed calls (metric reductions, gathers, the algorithm modules' gradient
all-reduce, broadcasts) divided by the step time; DDP's bucketed gradient all-reduce runs
asynchronously, overlapped with backward, and shows only through the step time. Step 1 (warm-up)
is left out of the means. Numbers on a shared machine are contaminated by other load: rerun on a
quiet one before quoting them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BLOCKING = (
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "broadcast",
    "broadcast_object_list",
    "barrier",
)


def _time_collectives(box: dict) -> None:
    """Wrap the blocking torch.distributed calls to add their wall time to box["comm"]."""
    import torch.distributed as dist

    for name in BLOCKING:
        original = getattr(dist, name)

        def timed(*args, _f=original, **kwargs):
            if kwargs.get("async_op"):
                return _f(*args, **kwargs)
            start = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                box["comm"] += time.perf_counter() - start

        setattr(dist, name, timed)


def _time_gathers(box: dict) -> None:
    """Add the wall time of FSDPModule.unshard (kltrain's explicit whole-model gathers) and of
    entering and leaving ZeroEngine.gathered (ZeRO-3's) to box["gather"]."""
    from contextlib import contextmanager

    from torch.distributed.fsdp import FSDPModule

    from kltrain.training.deepspeed_engine import ZeroEngine

    zero_gathered = ZeroEngine.gathered

    @contextmanager
    def timed_zero(self):
        start = time.perf_counter()
        with zero_gathered(self):
            box["gather"] += time.perf_counter() - start
            try:
                yield
            finally:
                start = time.perf_counter()
        box["gather"] += time.perf_counter() - start

    ZeroEngine.gathered = timed_zero

    original = FSDPModule.unshard

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            box["gather"] += time.perf_counter() - start

    FSDPModule.unshard = timed


def worker(config: str, result: str) -> None:
    """One process of a run: train, then write (rank 0) the measurements."""
    box = {"comm": 0.0, "gather": 0.0}
    _time_collectives(box)
    _time_gathers(box)
    import torch
    from accelerate.utils import gather_object

    from kltrain.config import load_config
    from kltrain.training.trainer import Trainer

    trainer = Trainer(load_config(config))
    steps: list[float] = []
    comm: list[float] = []
    gather: list[float] = []
    original = trainer.train_step

    def train_step():
        box["comm"] = box["gather"] = 0.0
        start = time.perf_counter()
        out = original()
        steps.append(time.perf_counter() - start)
        comm.append(box["comm"])
        gather.append(box["gather"])
        return out

    trainer.train_step = train_step
    trainer.fit()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
    cuda_peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    rows = [(peak_rss, cuda_peak, steps, comm, gather)]
    acc = trainer.accelerator
    if acc.num_processes > 1:
        rows = gather_object(rows)
    if acc.is_main_process:
        data = {"world_size": acc.num_processes, "engine": trainer.engine, "ranks": rows}
        Path(result).write_text(json.dumps(data))


def _config(args, root: Path, model: Path, tag: str) -> Path:
    import yaml

    from tests.helpers.tiny import loop_config_raw

    raw = loop_config_raw(str(model), root / f"run-{tag}")
    raw["seed"] = 3
    raw["generation"] = {"max_new_tokens": args.new_tokens}  # (min_new_tokens > 0 is refused)
    raw["trainer"].update(
        {
            "max_steps": args.steps,
            "prompts_per_step": args.prompts,
            "micro_batch_size": args.micro_batch,
            "log_samples_every": 0,
            "device": args.device,
        }
    )
    path = root / f"config-{tag}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(args, root: Path, model: Path, world: int, engine: str | None = None) -> dict:
    from tests.helpers.resume_runs import FSDP2_ENV, ZERO3_ENV

    tag = f"w{world}" + (f"-{engine}" if engine else "")
    config, result = _config(args, root, model, tag), root / f"result-{tag}.json"
    me = [str(Path(__file__).resolve()), "--worker", str(config), str(result)]
    if world == 1:
        command = [sys.executable, *me]
    else:
        from kltrain.training.distributed import free_port

        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world)]
        command += ["--master_port", str(free_port()), *me]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.update({"fsdp2": FSDP2_ENV, "zero3": ZERO3_ENV, None: {}}[engine])
    with open(root / f"log-{tag}.txt", "w") as log:
        subprocess.run(command, env=env, stdout=log, stderr=log, check=True, cwd=REPO)
    data = json.loads(result.read_text())
    metrics = [json.loads(x) for x in (root / f"run-{tag}" / "metrics.jsonl").open()]
    return _summary(args, data, metrics)


def _summary(args, data: dict, metrics: list[dict]) -> dict:
    ranks = data["ranks"]
    steps = [max(r[2][i] for r in ranks) for i in range(len(ranks[0][2]))][1:]  # slowest rank
    comm = [max(r[3][i] for r in ranks) for i in range(len(ranks[0][3]))][1:]
    gather = [max(r[4][i] for r in ranks) for i in range(len(ranks[0][4]))][1:]
    sequences = args.prompts * 2  # num_generations 2
    tokens = [m["completion/length"] * sequences for m in metrics][1:]
    step = sum(steps) / len(steps)
    return {
        "world_size": data["world_size"],
        "engine": data["engine"],
        "step_seconds": step,
        "tokens_per_second": sum(tokens) / sum(steps),
        "peak_rss_gib_per_process": max(r[0] for r in ranks),
        "peak_cuda_gib_per_process": max(r[1] for r in ranks),
        "comm_share": sum(comm) / sum(steps),
        "gather_share": sum(gather) / sum(steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model, 3 steps (~2-3 min)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (global)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--fsdp2", action="store_true", help="also run every N > 1 under FSDP2")
    parser.add_argument("--zero3", action="store_true", help="also every N > 1 under ZeRO-3")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    if args.quick:
        args.steps, args.hidden, args.layers, args.new_tokens = 3, 128, 2, 16
    from tests.helpers.tiny import make_tiny_model_dir

    with tempfile.TemporaryDirectory(prefix="kltrain-bench-") as tmp:
        root = Path(tmp)
        model = make_tiny_model_dir(root / "model", hidden=args.hidden, layers=args.layers)
        results = [_run(args, root, model, world) for world in args.processes]
        for engine in [e for e in ("fsdp2", "zero3") if getattr(args, e)]:
            results += [_run(args, root, model, w, engine) for w in args.processes if w > 1]
    base = results[0]["step_seconds"]
    print(
        f"model: random Llama hidden {args.hidden} × {args.layers} layers; {args.prompts} prompts "
        f"× 2 samples × {args.new_tokens} tokens per step; {args.steps} steps (first left out); "
        f"{args.threads} thread(s) per process"
    )
    print(
        "| processes | engine | step s | tokens/s | peak RSS GiB/proc | peak CUDA GiB | comm "
        "| gather | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['world_size']} | {r['engine']} | {r['step_seconds']:.3f} | "
            f"{r['tokens_per_second']:.1f} | {r['peak_rss_gib_per_process']:.2f} | "
            f"{r['peak_cuda_gib_per_process']:.2f} | {100 * r['comm_share']:.1f}% | "
            f"{100 * r['gather_share']:.1f}% | {base / r['step_seconds']:.2f}× |"
        )
        print(json.dumps(r))


if __name__ == "__main__":
    main()
