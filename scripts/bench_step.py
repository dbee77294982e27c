#!/usr/bin/env python
"""One training step, kltrain against TRL 1.16's GRPOTrainer, at the same work.

Same model (the embedded smollm2-135m, fp32), prompts (the built-in movie-review prompts as
conversational ``[{"role": "user", ...}]`` messages through the chat template), batch (2 prompts ×
4 completions), 32 new tokens (no minimum, temperature 1, no top-k/top-p), β = 0.05, lr 1e-5,
seed 0, the lexicon reward (kltrain's ``sentiment``; TRL gets the same function) and the same
threads (``OMP_NUM_THREADS`` as given, and the OpenMP wait ``kltrain fit`` chooses,
``kltrain/training/openmp.py``, for both sides; ``--passive`` makes it ``OMP_WAIT_POLICY=PASSIVE``
for both). Each repeat runs kltrain then
TRL (A B A B ...) in fresh processes; each process runs ``--steps`` steps of which the first is a
warm-up and is not counted. A step's time runs from the start of one step to the start of the
next, so it includes logging on both sides.

Configurations (``--configs``):

- ``trl_equivalent``: kltrain ``grpo`` with k3 in the loss (``kl.accept_gradient: local
  forward_kl``) against TRL with ``use_bias_correction_kl=False``: ``β·k3`` in the loss with the
  gradient through log π only, which is what kltrain's k3/loss pair computes. TRL 1.16's *default*
  (``use_bias_correction_kl=True``) multiplies k3 by the differentiable ratio π/π_old, whose
  gradient is the local part of **reverse** KL (MATH.md, "Off-policy minibatches"), so the default
  is not the issue's "k3, local forward KL" setting; the two cost the same.
- ``exact_reverse_kl``, ``exact_js``: kltrain with the exact per-token divergence in the loss
  against TRL's default (k3·ratio: the sampled estimate of the same local reverse-KL gradient).
- ``ppo``: kltrain PPO at ``configs/ppo_reverse_kl.yaml``'s sizes (8 prompts × 2, 24 new tokens,
  one epoch of two minibatches), fp32. TRL 1.16 ships no PPO trainer (neither ``trl`` nor
  ``trl.experimental`` has one), so this row has no TRL column.

Reported per configuration (one JSON line each, then a markdown table): median, min and max of
the measured step times of each side, the ratio kltrain ÷ TRL of the medians and of each A B
pair's medians (the pair's two processes ran back to back, so the spread of these shows how the
machine's load moved the ratio), each side's peak RSS (``ru_maxrss`` of its process: models,
optimizer, activations), and kltrain's phases (generation, reference pass, policy pass, lm_head
statistics, rewards, update, logging; medians) each set against its limit, from rates measured
in this run before and after the processes:

- generation: reading the weights once per decoding step, ``T · weight_bytes / bandwidth`` with T
  the generated length and the bandwidth of a large fp32 reduction (a read stream);
- reference / policy pass: forward FLOPs ``2·P_body·(U·P + B·T) + 2·V·H·B·T + 4·L·H·(U·P² + B·T·S)``
  (U distinct prompts of P tokens, each run once for the B rows that share it as kltrain does;
  T completion tokens, S = P + T, P_body the parameters outside the embedding) at the measured
  fp32 GEMM rate;
- update: forward + backward, 3× the forward's FLOPs, at the GEMM rate.

    python scripts/bench_step.py --quick            # one configuration, 2 repeats (checks it runs)
    python scripts/bench_step.py                    # the full benchmark (see --help for sizes)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from kltrain.training.openmp import USER_SETTINGS, choose_wait

# Before torch is imported anywhere (this process or its children, which inherit it): the wait
# of idle OpenMP threads that `kltrain fit` chooses, for both sides (or PASSIVE with --passive).
if "--passive" in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
choose_wait()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
SEED = 0
BETA = 0.05
LR = 1e-5
GRPO = {"prompts": 2, "generations": 4, "new_tokens": 32}
CONFIGS = ("trl_equivalent", "exact_reverse_kl", "exact_js", "ppo")
KL = {
    "trl_equivalent": {"estimator": "k3", "divergence": "reverse_kl",
                       "accept_gradient": "local forward_kl"},
    "exact_reverse_kl": {"estimator": "exact", "divergence": "reverse_kl"},
    "exact_js": {"estimator": "exact", "divergence": "js"},
}  # fmt: skip
#: TRL's use_bias_correction_kl per configuration (None: no TRL counterpart).
TRL_BIAS_CORRECTION = {
    "trl_equivalent": False,
    "exact_reverse_kl": True,
    "exact_js": True,
    "ppo": None,
}


# ---------------------------------------------------------------------------------------------
# Shared inputs
def model_path() -> str:
    from kltrain.models.embedded import ensure_embedded

    return str(ensure_embedded(MODEL))


def write_prompts(path: Path) -> Path:
    """The built-in movie-review prompts as conversational rows (what both trainers read)."""
    from kltrain.config import DataConfig
    from kltrain.data import load_prompts

    rows = load_prompts(DataConfig(prompts="builtin:movie_reviews"))
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps({"prompt": [{"role": "user", "content": row["prompt"]}]}) + "\n")
    return path


def lexicon_reward(prompts, completions, **kwargs):
    """kltrain's ``sentiment`` lexicon scorer on TRL's conversational completions."""
    from kltrain.rewards.builtin import sentiment_reward

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return sentiment_reward(prompts, texts)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------
# kltrain side (a child process)
def kltrain_config(name: str, prompts: Path, out: Path, steps: int) -> list[str]:
    """Dotted overrides for the configuration ``name`` (GRPO sizes, or PPO's reference config)."""
    common = [
        f"seed={SEED}", f"model.policy={model_path()}", "model.dtype=fp32",
        f"trainer.max_steps={steps}", f"trainer.output_dir={out}", "trainer.device=cpu",
        "trainer.save_every=0", "tracking.wandb.mode=disabled",
    ]  # fmt: skip
    checkpointing = []
    if os.environ.get(KLTRAIN_CKPT_ENV) == "1":
        checkpointing = ["model.gradient_checkpointing=true"]
    if name == "ppo":
        return common + checkpointing  # configs/ppo_reverse_kl.yaml, but for these lines
    kl = KL[name]
    over = [
        *common,
        f"data.prompts={prompts}", "data.chat_template='on'", "data.max_prompt_tokens=128",
        f"generation.max_new_tokens={GRPO['new_tokens']}", "generation.min_new_tokens=0",
        "reward.terms=[{name: sentiment}]",
        f"kl.divergence={kl['divergence']}", f"kl.estimator={kl['estimator']}",
        "kl.placement=loss", f"kl.coef={BETA}",
        "algorithm.name=grpo", f"algorithm.num_generations={GRPO['generations']}",
        f"trainer.prompts_per_step={GRPO['prompts']}",
        f"trainer.micro_batch_size={GRPO['prompts'] * GRPO['generations']}",
        f"trainer.learning_rate={LR}", "trainer.log_samples_every=0",
    ]  # fmt: skip
    if "accept_gradient" in kl:
        over.append(f"kl.accept_gradient={kl['accept_gradient']}")
    return over + checkpointing


def _time_passes(phases: dict[str, float]):
    """Wrap ``kltrain.rollout.completion_hidden`` (what ``measure`` runs each model through) to
    add its time to ``phases["policy_pass"]`` or ``phases["reference_pass"]``."""
    import kltrain.rollout as rollout

    inner = rollout.completion_hidden
    state = {"policy": None}

    def timed(model, *args, **kwargs):
        t0 = time.perf_counter()
        out = inner(model, *args, **kwargs)
        key = "policy_pass" if model is state["policy"] else "reference_pass"
        phases[key] += time.perf_counter() - t0
        return out

    rollout.completion_hidden = timed  # measure() looks it up at call time
    return state


def run_kltrain(name: str, steps: int, workdir: Path) -> dict:
    from kltrain.training.host_memory import keep_freed_memory

    keep_freed_memory()  # as `kltrain fit` does at start-up (TRL's side keeps glibc's default)
    import torch

    from kltrain.config import load_config
    from kltrain.training.trainer import Trainer

    base = ROOT / "configs" / "ppo_reverse_kl.yaml" if name == "ppo" else None
    prompts = write_prompts(workdir / "prompts.jsonl")
    cfg = load_config(base, kltrain_config(name, prompts, workdir / "run", steps))
    phases: dict[str, float] = defaultdict(float)
    hook = _time_passes(phases)
    trainer = Trainer(cfg)
    hook["policy"] = trainer.models.policy
    trainer.logger.start(trainer.regulariser, first_step=0, run_id=trainer.state.wandb_run_id)
    records = []
    for _ in range(steps):
        phases.clear()
        t0 = time.perf_counter()
        result = trainer.train_step()
        t1 = time.perf_counter()
        trainer.logger.log_step(result)
        t2 = time.perf_counter()
        m, r = result.metrics, result.rollout
        measure_s = m["time/measure_seconds"]
        records.append({
            "step_s": t2 - t0,
            "generation": m["time/generate_seconds"],
            "reference_pass": phases["reference_pass"],
            "policy_pass": phases["policy_pass"],
            "lm_head_stats": measure_s - phases["reference_pass"] - phases["policy_pass"],
            "rewards": m["time/score_seconds"],
            "update": m["time/optimise_seconds"],
            "logging": t2 - t1,
            "sequences": r.num_sequences,
            "distinct_prompts": int(r.group_ids.unique().numel()),
            "prompt_length": r.prompt_length,
            "generated_length": r.input_ids.shape[1] - r.prompt_length,
            "completion_tokens": int(r.completion_mask.sum()),
            "minibatches": cfg.algorithm.epochs * cfg.algorithm.num_minibatches,
        })  # fmt: skip
    trainer.logger.finish()
    model = trainer.models.policy
    emb = model.get_input_embeddings().weight
    return {
        "records": records,
        "peak_rss_bytes": peak_rss_bytes(),
        "threads": torch.get_num_threads(),
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "params": sum(p.numel() for p in model.parameters()),
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "embedding_params": emb.numel(),
        "vocab": emb.shape[0],
        "hidden": emb.shape[1],
        "layers": model.config.num_hidden_layers,
    }


# ---------------------------------------------------------------------------------------------
# TRL side (a child process)
def run_trl(name: str, steps: int, workdir: Path) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    path = model_path()
    prompts = write_prompts(workdir / "prompts.jsonl")
    dataset = load_dataset("json", data_files=str(prompts), split="train")
    batch = GRPO["prompts"] * GRPO["generations"]
    args = GRPOConfig(
        output_dir=str(workdir / "trl"), max_steps=steps, seed=SEED, use_cpu=True,
        bf16=False, fp16=False, model_init_kwargs={"dtype": torch.float32},
        per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_generations=GRPO["generations"], max_completion_length=GRPO["new_tokens"],
        temperature=1.0, top_p=1.0, top_k=0, beta=BETA, learning_rate=LR,
        loss_type="dapo", scale_rewards="group", num_iterations=1,
        use_bias_correction_kl=TRL_BIAS_CORRECTION[name],
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, gradient_checkpointing=os.environ.get(TRL_CKPT_ENV, "1") == "1",
    )  # fmt: skip
    starts: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            starts.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            starts.append(time.perf_counter())

    trainer = GRPOTrainer(
        model=path,
        reward_funcs=lexicon_reward,
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(path),
        callbacks=[StepClock()],
    )
    trainer.train()
    times = [b - a for a, b in itertools.pairwise(starts)]
    return {
        "records": [{"step_s": t} for t in times],
        "peak_rss_bytes": peak_rss_bytes(),
        "threads": torch.get_num_threads(),
        "gradient_checkpointing": args.gradient_checkpointing,
    }


# ---------------------------------------------------------------------------------------------
# Machine limits (parent process)
def machine_rates(repeats: int = 5) -> dict:
    """Read bandwidth (a sum over a 512 MiB fp32 tensor), copy bandwidth (bytes read + written)
    and the fp32 GEMM rate at a transformer-MLP shape ([512, 576] @ [576, 1536]); best of
    ``repeats`` each, after a warm-up."""
    import torch

    src = torch.ones(128 * 2**20)  # 512 MiB
    dst = torch.empty_like(src)
    a, b = torch.randn(512, 576), torch.randn(576, 1536)

    def best(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    nbytes = src.numel() * src.element_size()
    gemm_s = best(lambda: [torch.mm(a, b) for _ in range(20)])
    return {
        "read_gb_s": nbytes / best(src.sum) / 1e9,
        "copy_gb_s": 2 * nbytes / best(lambda: dst.copy_(src)) / 1e9,
        "gemm_gflop_s": 20 * 2 * 512 * 576 * 1536 / gemm_s / 1e9,
    }


def phase_limits(r: dict, shape: dict, rates: dict) -> dict[str, float]:
    """Lower bounds (seconds) of one step's phases, from its shapes and the measured rates."""
    b, p, t = r["sequences"], r["prompt_length"], r["generated_length"]
    u = r.get("distinct_prompts", b)  # each distinct prompt's positions run once
    s = p + t
    body = shape["params"] - shape["embedding_params"]
    fwd = (
        2 * body * (u * p + b * t)
        + 2 * shape["vocab"] * shape["hidden"] * b * t
        + 4 * shape["layers"] * shape["hidden"] * (u * p * p + b * t * s)
    )
    gemm = rates["gemm_gflop_s"] * 1e9
    return {
        "generation": t * shape["weight_bytes"] / (rates["read_gb_s"] * 1e9),
        "reference_pass": fwd / gemm,
        "policy_pass": fwd / gemm,
        "update": 3 * fwd / gemm,
    }


# ---------------------------------------------------------------------------------------------
# Parent: alternate the two sides in fresh processes, summarise
#: Set by --trl-no-checkpointing for the TRL processes (TRL 1.16's GRPOConfig turns gradient
#: checkpointing on by default: less activation memory, one more forward in the backward).
TRL_CKPT_ENV = "BENCH_TRL_GRADIENT_CHECKPOINTING"
#: Set by --kltrain-checkpointing for the kltrain processes (model.gradient_checkpointing, off by
#: default in kltrain): then both sides recompute activations, as TRL does by default.
KLTRAIN_CKPT_ENV = "BENCH_KLTRAIN_GRADIENT_CHECKPOINTING"
PHASES = ("generation", "reference_pass", "policy_pass", "lm_head_stats", "rewards", "update",
          "logging")  # fmt: skip


def child(side: str, name: str, steps: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench_{side}_") as tmp:
        cmd = [sys.executable, __file__, "--_side", side, "--_config", name,
               "--_steps", str(steps), "--_workdir", tmp]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
               os.environ.get("PYTHONPATH")]))}  # fmt: skip
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp
        )
    if proc.returncode != 0:
        raise RuntimeError(f"{side} {name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarise(name: str, runs: dict[str, list[dict]], rates: dict) -> dict:
    row: dict = {"config": name}
    for side, results in runs.items():
        measured = [rec for res in results for rec in measured_steps(res)]
        row[side] = {
            "step_s": spread([rec["step_s"] for rec in measured]),
            "peak_rss_gb": max(res["peak_rss_bytes"] for res in results) / 1e9,
            "threads": results[0]["threads"],
            "gradient_checkpointing": results[0]["gradient_checkpointing"],
        }
        if side == "kltrain":
            phases = {k: statistics.median(rec[k] for rec in measured) for k in PHASES}
            limits = phase_limits(measured[-1], results[0], rates)
            last = measured[-1]
            row[side]["phases_s"] = phases
            row[side]["limits_s"] = limits
            row[side]["phase_over_limit"] = {k: phases[k] / limits[k] for k in limits}
            keys = (
                "sequences",
                "distinct_prompts",
                "prompt_length",
                "generated_length",
                "completion_tokens",
            )
            row[side]["shape"] = {k: last[k] for k in (*keys, "minibatches")}
    if "trl" in row:
        row["ratio_kltrain_over_trl"] = (
            row["kltrain"]["step_s"]["median"] / row["trl"]["step_s"]["median"]
        )
        row["pair_ratios"] = pair_ratios(runs["kltrain"], runs["trl"])
        row["rss_ratio_kltrain_over_trl"] = (
            row["kltrain"]["peak_rss_gb"] / row["trl"]["peak_rss_gb"]
        )
    row["machine"] = rates
    return row


def pair_ratios(kltrain: list[dict], trl: list[dict]) -> list[float]:
    """kltrain ÷ TRL of each A B pair's median step (the two processes ran back to back): how
    far the ratio moves with the machine's load during the run, which the medians over all
    pairs hide."""

    def median_step(result: dict) -> float:
        return statistics.median(rec["step_s"] for rec in measured_steps(result))

    return [median_step(a) / median_step(b) for a, b in zip(kltrain, trl, strict=True)]


def measured_steps(result: dict) -> list[dict]:
    """A child process's step records without its first, the warm-up."""
    return result["records"][1:]


def markdown(rows: list[dict]) -> str:
    def span(s):
        return f"{s['median']:.2f} ({s['min']:.2f}–{s['max']:.2f})"

    lines = [
        "| config | kltrain step s | TRL step s | ratio | ratio per A B pair | "
        "RSS GB kltrain / TRL | " + " | ".join(f"{p} s (÷ limit)" for p in PHASES) + " |",
        "|" + "---|" * (6 + len(PHASES)),
    ]
    for row in rows:
        k, trl = row["kltrain"], row.get("trl")
        cells = [row["config"], span(k["step_s"])]
        if trl:
            cells += [span(trl["step_s"]), f"{row['ratio_kltrain_over_trl']:.2f}"]
            cells.append(", ".join(f"{r:.2f}" for r in row["pair_ratios"]))
            cells.append(f"{k['peak_rss_gb']:.2f} / {trl['peak_rss_gb']:.2f}")
        else:
            cells += ["no TRL PPO trainer", "—", "—", f"{k['peak_rss_gb']:.2f} / —"]
        for p in PHASES:
            cell = f"{k['phases_s'][p]:.2f}"
            if p in k["phase_over_limit"]:
                cell += f" ({k['phase_over_limit'][p]:.1f}×)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    rates = rows[-1]["machine"]
    lines.append("")
    lines.append(
        f"Machine, measured in this run: read {rates['read_gb_s']:.1f} GB/s, copy "
        f"{rates['copy_gb_s']:.1f} GB/s, fp32 GEMM {rates['gemm_gflop_s']:.0f} GFLOP/s. "
        "Phases are kltrain's medians; (÷ limit) is the phase over its lower bound."
    )
    first = rows[0]
    on_off = {True: "on", False: "off"}
    setting = [f"{side} {on_off[bool(first[side]['gradient_checkpointing'])]}"
               for side in ("kltrain", "trl") if side in first]  # fmt: skip
    wait = ", ".join(f"{k}={v}" for k, v in first.get("openmp_wait", {}).items()) or "unset"
    lines.append(f"Gradient checkpointing: {', '.join(setting)}. OpenMP wait: {wait}.")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="trl_equivalent only, 2 repeats, 2 steps")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--repeats", type=int, default=3, help="A B pairs per configuration")
    p.add_argument("--steps", type=int, default=4, help="steps per process, the first a warm-up")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both sides")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    p.add_argument(
        "--passive",
        action="store_true",
        help="OMP_WAIT_POLICY=PASSIVE for both sides instead of the wait kltrain fit chooses",
    )
    p.add_argument(
        "--trl-no-checkpointing",
        action="store_true",
        help="TRL without gradient checkpointing (its GRPOConfig default is on)",
    )
    p.add_argument(
        "--kltrain-checkpointing",
        action="store_true",
        help="kltrain with model.gradient_checkpointing=true (as TRL's default; off in kltrain)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write JSON lines + table here")
    for hidden in ("--_side", "--_config", "--_steps", "--_workdir"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.configs, args.repeats, args.steps = ["trl_equivalent"], 2, 2
    if args.steps < 2:
        p.error("--steps must be ≥ 2 (the first step is a warm-up)")
    return args


def main(argv=None):
    args = parse(argv)
    if args._side:
        run = run_kltrain if args._side == "kltrain" else run_trl
        print(json.dumps(run(args._config, int(args._steps), Path(args._workdir))))
        return
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        choose_wait()  # again, for this thread count (both sides inherit it)
    os.environ[TRL_CKPT_ENV] = "0" if args.trl_no_checkpointing else "1"
    os.environ[KLTRAIN_CKPT_ENV] = "1" if args.kltrain_checkpointing else "0"
    rates_before = machine_rates()
    rows = []
    for name in args.configs:
        sides = ["kltrain"] + (["trl"] if TRL_BIAS_CORRECTION[name] is not None else [])
        runs: dict[str, list[dict]] = {s: [] for s in sides}
        for i in range(args.repeats):
            for side in sides:  # A B A B: each repeat runs kltrain then TRL
                print(f"# {name}: {side} {i + 1}/{args.repeats}", file=sys.stderr, flush=True)
                runs[side].append(child(side, name, args.steps, args.timeout))
        rows.append((name, runs))
    rates_after = machine_rates()
    rates = {k: max(rates_before[k], rates_after[k]) for k in rates_before}
    rates["before"], rates["after"] = rates_before, rates_after
    out_lines = []
    summaries = [summarise(name, runs, rates) for name, runs in rows]
    for row in summaries:
        row["openmp_wait"] = {k: os.environ[k] for k in USER_SETTINGS if k in os.environ}
        out_lines.append(json.dumps(row))
        print(out_lines[-1], flush=True)
    table = markdown(summaries)
    print("\n" + table)
    if args.out:
        args.out.write_text("\n".join(out_lines) + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
