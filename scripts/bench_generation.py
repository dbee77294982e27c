#!/usr/bin/env python
"""Does a static KV cache or a compiled decoding step pay for generation on this machine?

Times ``model.generate`` (greedy, a fixed number of new tokens so that every variant does the
same work) on the embedded smollm2-135m, 8 prompts, in three variants, each in a fresh process:

- ``dynamic``: transformers' default cache (what kltrain uses);
- ``static``: ``cache_implementation="static"``;
- ``compile``: the static cache with transformers' compiled decoding step (``torch.compile`` of
  the forward; transformers only compiles on accelerators unless told to compile on every
  device, which this variant does).

The first call of each variant is reported apart (it includes compilation); the others are the
steady state. The OpenMP wait is the one ``kltrain fit`` chooses (``kltrain/training/openmp.py``).

    python scripts/bench_generation.py                  # ~2 min on a 2-core CPU
    python scripts/bench_generation.py --new-tokens 64 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("dynamic", "static", "compile")
PROMPTS = [
    "Write a short review of a movie you liked and explain why.",
    "Tell me about the weather in a poetic way, please.",
] * 4


def worker(variant: str, new_tokens: int, repeats: int) -> None:
    import torch
    from transformers.generation import CompileConfig

    from kltrain.config import ModelConfig
    from kltrain.models.loading import load_models

    models = load_models(ModelConfig(policy="smollm2-135m"))
    model, tok = models.policy.eval(), models.tokenizer
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    kwargs = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": tok.pad_token_id,
    }
    if variant in ("static", "compile"):
        kwargs["cache_implementation"] = "static"
    if variant == "compile":
        config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
        config._compile_all_devices = True  # transformers' switch for compiling on the CPU
        kwargs["compile_config"] = config
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model.generate(**enc, **kwargs)
            times.append(time.perf_counter() - start)
    print(json.dumps({"variant": variant, "first_s": times[0], "steady_s": times[1:]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="steady-state calls after the first")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.new_tokens, args.repeats)
        return
    from kltrain.training.openmp import choose_wait

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    choose_wait(env)
    rows = []
    for variant in args.variants:
        command = [sys.executable, __file__, "--worker", variant]
        command += ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    tokens = len(PROMPTS) * args.new_tokens
    print(f"{len(PROMPTS)} prompts × {args.new_tokens} new tokens, greedy, fp32")
    print("| variant | first call s | steady median s | tokens/s |")
    print("|---|---|---|---|")
    for row in rows:
        median = statistics.median(row["steady_s"])
        print(f"| {row['variant']} | {row['first_s']:.2f} | {median:.2f} | {tokens / median:.0f} |")


if __name__ == "__main__":
    main()
