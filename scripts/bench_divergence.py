#!/usr/bin/env python
"""Benchmark the exact per-token divergence: plain path vs chunked lm_head path.

For each (tokens N, vocab V) with hidden H, times forward+backward of loss = Σ_t D(π‖π_ref)_t
(reverse KL by default) w.r.t. the policy's hidden states and lm_head weight, and reports peak
memory beyond the inputs, for

- plain:   fp32 logits [N, V] for both models, token_divergence, autograd;
- chunked: kltrain.divergence.lm_head.fused_token_loss (gradient formed inside the chunk loop);
- matmul limit: the four lm_head GEMMs the chunked path does (policy fwd, ref fwd, G @ W, Gᵀ h),
  timed alone on the same device/dtype/shapes in the same run; 4·2·N·H·V FLOPs.

One JSON object per (divergence, N, V) per line; ``--divergence all`` runs every built-in f
(``alpha`` at ``--alpha``), each timed next to its own matmul-limit measurement (on a shared
machine the GEMM rate drifts between minutes; measured: 145 vs 278 GFLOP/s), and flags each
chunked time above ``BAR`` × the limit (the target for every built-in f in fp32 on CPU).

Peak memory: on CUDA, torch.cuda.max_memory_allocated minus the allocation after the inputs
exist; on CPU each case runs in a fresh subprocess and reports
peak RSS (getrusage ru_maxrss) minus the RSS after the inputs exist and a small warm-up run (RSS
sees torch's CPU allocations, which tracemalloc does not). The plain path is skipped (with a
note) where its estimated [N, V] buffers would not fit.

    python scripts/bench_divergence.py --quick
    python scripts/bench_divergence.py --divergence all --no-plain --tokens 1024 --vocab 49152
    python scripts/bench_divergence.py --device cuda --dtype bfloat16
    python scripts/bench_divergence.py --device cuda --dtype bfloat16 --no-fused  # torch ops
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from kltrain.training.openmp import choose_wait

choose_wait()  # the OpenMP wait `kltrain fit` chooses, before torch loads its runtime

import torch  # noqa: E402

from kltrain.divergence.functions import DIVERGENCE_NAMES, get_divergence, token_divergence  # noqa: E402
from kltrain.divergence.lm_head import fused_token_loss  # noqa: E402

# fp32 [N, V] buffers the plain path keeps alive at its peak (both logits, both log-softmaxes,
# terms, and their gradients), measured on CPU at N=1024, V=49152; used to skip cases that
# would not fit.
PLAIN_BUFFERS = 10
#: The chunked path's target: at most this many times the time of its four lm_head GEMMs alone.
BAR = 1.25


def make_divergence(name, alpha):
    """A divergence by name; ``alpha`` needs its parameter."""
    return get_divergence(name, alpha=alpha) if name == "alpha" else get_divergence(name)


def make_inputs(n, v, h, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale):
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)

    return {
        "h": rnd(n, h, scale=1.0).requires_grad_(True),
        "w": rnd(v, h, scale=h**-0.5).requires_grad_(True),
        "rh": rnd(n, h, scale=1.0),
        "rw": rnd(v, h, scale=h**-0.5),
        "tok": torch.randint(0, v, (n,), generator=g).to(device),
    }


def run_plain(x, divergence, chunk_size):
    z = x["h"].float() @ x["w"].float().T
    zq = x["rh"].float() @ x["rw"].float().T
    token_divergence(z, zq, divergence).sum().backward()


def run_chunked(x, divergence, chunk_size):
    loss = fused_token_loss(
        x["h"], x["w"], x["tok"], lambda c: c.divergence.sum(),
        ref_hidden=x["rh"], ref_weight=x["rw"], divergence=divergence, chunk_size=chunk_size,
    )  # fmt: skip
    loss.backward()


def run_matmuls(x, divergence, chunk_size):
    """Exactly the chunked path's GEMM calls (the same ``_Head`` methods, shapes, dtypes, fp32
    outputs and buffers), nothing else."""
    from kltrain.divergence.lm_head import _Head

    head, ref = _Head(x["h"], x["w"], None), _Head(x["rh"], x["rw"], None)
    n = x["h"].shape[0]
    grad_w = torch.zeros(head.w.shape, dtype=torch.float32, device=head.w.device)
    grad_h = torch.empty(head.h.shape, dtype=torch.float32, device=head.h.device)
    # the [chunk, V] logits buffers the chunked path reuses (fresh ones on a native half head)
    v = head.w.shape[0]
    bufs = torch.empty((2, min(chunk_size, n), v), dtype=torch.float32, device=head.w.device)
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        c = rows.stop - rows.start
        g = head.logits(rows, None if head.native else bufs[0, :c])
        ref.logits(rows, None if ref.native else bufs[1, :c])
        grad_h[rows] = head.mm(g, head.w, out=grad_h[rows])
        head.add_weight_grad(grad_w, g, rows)


RUNNERS = {"plain": run_plain, "chunked": run_chunked, "matmuls": run_matmuls}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(path, n, v, args):
    """Time (best of repeats, after one untimed run) and peak memory of one path in this process."""
    dtype, device = getattr(torch, args.dtype), args.device
    x = make_inputs(n, v, args.hidden, dtype, device)
    fn = RUNNERS[path]
    divergence = make_divergence(args.divergence, args.alpha)
    # Warm torch first (thread pools, kernels; on the CPU, loading inductor and compiling the
    # fused ops, which needs ≥ 512 tokens a call): one-time costs, not the path's working memory
    small = make_inputs(512, 256, args.hidden, dtype, device, seed=1)
    fn(small, divergence, args.chunk_size)
    del small
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
    fn(x, divergence, args.chunk_size)  # first run: peak memory (and warm-up)
    sync(device)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(args.repeats):
        for t in ("h", "w"):
            x[t].grad = None
        sync(device)
        t0 = time.perf_counter()
        fn(x, divergence, args.chunk_size)
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"time_s": min(times), "peak_bytes": int(peak)}


def measure_isolated(path, n, v, args):
    """On CPU: a fresh interpreter per case, so one case's peak RSS cannot hide another's."""
    if args.device.startswith("cuda"):
        return measure(path, n, v, args)
    cmd = [sys.executable, __file__, "--_case", path, "--_n", str(n), "--_v", str(v)]
    cmd += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("device", "dtype", "hidden")]
    cmd += [f"--chunk-size={args.chunk_size}", f"--repeats={args.repeats}"]
    cmd += [f"--divergence={args.divergence}", f"--alpha={args.alpha}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def available_bytes(device):
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def bench_one(n, v, args, mm=None):
    """One (divergence, N, V) row; ``mm`` reuses a matmul-limit measurement for this (N, V)."""
    row = {
        "device": args.device_name, "dtype": args.dtype, "tokens": n, "vocab": v,
        "hidden": args.hidden, "chunk_size": args.chunk_size, "divergence": args.divergence,
        "mem_method": args.mem_method,
        "fused": not args.no_fused,  # Triton kernels on CUDA, compiled torch on the CPU (fp32)
    }  # fmt: skip
    if args.divergence == "alpha":
        row["alpha"] = args.alpha
    plain_need = PLAIN_BUFFERS * 4 * n * v
    if args.no_plain:
        row["plain"] = "skipped: --no-plain"
    elif plain_need > 0.6 * available_bytes(args.device):
        row["plain"] = f"skipped: needs ~{plain_need / 2**30:.1f} GiB of [N, V] buffers"
    else:
        row["plain"] = measure_isolated("plain", n, v, args)
    row["chunked"] = measure_isolated("chunked", n, v, args)
    mm = mm or measure_isolated("matmuls", n, v, args)
    flops = 4 * 2 * n * args.hidden * v
    row["matmul_limit_s"] = mm["time_s"]
    row["gemm_tflops"] = flops / mm["time_s"] / 1e12
    row["chunked_over_matmul_limit"] = row["chunked"]["time_s"] / mm["time_s"]
    row["within_bar"] = row["chunked_over_matmul_limit"] <= BAR
    if isinstance(row["plain"], dict):
        row["chunked_over_plain_time"] = row["chunked"]["time_s"] / row["plain"]["time_s"]
        row["chunked_over_plain_mem"] = row["chunked"]["peak_bytes"] / row["plain"]["peak_bytes"]
    return row, mm


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small subset, under a minute on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    p.add_argument(
        "--divergence",
        nargs="+",
        default=["reverse_kl"],
        help=f"one or more of {', '.join(DIVERGENCE_NAMES)}, or 'all'",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="α of the alpha divergence")
    p.add_argument("--no-plain", action="store_true", help="skip the plain (full-logits) path")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--no-fused",
        action="store_true",
        help="chunked path without the fused ops (kltrain.divergence.kernels: Triton on CUDA, "
        "compiled torch on the CPU), for comparison",
    )
    for hidden in ("--_case", "--_n", "--_v"):  # internal: one case in a fresh subprocess
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = list(DIVERGENCE_NAMES) if "all" in args.divergence else args.divergence
    for name in names:
        if name not in DIVERGENCE_NAMES:
            p.error(f"--divergence {name!r}: valid names are {', '.join(DIVERGENCE_NAMES)}, 'all'")
    args.divergence = names
    if args.quick:
        args.tokens, args.vocab, args.repeats = [1024], [49152], 1
    return args


def main(argv=None):
    args = parse(argv)
    if args.no_fused:
        os.environ["KLTRAIN_FUSED_CUDA"] = "0"  # inherited by the per-case subprocesses
        os.environ["KLTRAIN_FUSED_CPU"] = "0"
    if args._case:
        args.divergence = args.divergence[0]
        print(json.dumps(measure(args._case, int(args._n), int(args._v), args)))
        return
    cuda = args.device.startswith("cuda")
    args.device_name = torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()}"
    args.mem_method = (
        "cuda max_memory_allocated minus allocation after inputs"
        if cuda
        else "peak RSS (ru_maxrss) minus RSS after inputs, fresh subprocess per case"
    )
    names = args.divergence
    for v in args.vocab:
        for n in args.tokens:
            for name in names:
                args.divergence = name
                row, _ = bench_one(n, v, args)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
