"""``kltrain fit|validate|sweep|eval|compare|divergences``: parse, validate, launch. No training
logic here.

Exit codes of ``fit``: 0 done; 2 bad input — config, data, model, reward, run folder or
checkpoint (the message names it; nothing the user had was changed), or a failed checkpoint save
(the previous checkpoint is kept); 3 a guard stopped the run (non-finite updates or weights,
``kl.max``); 75 stopped on SIGTERM/SIGUSR1 after writing a complete checkpoint (rerun with
``--resume``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kltrain.training.openmp import choose_wait

# OpenMP reads how long idle threads wait once, when torch loads it, so this comes before any
# import of torch (kltrain.config imports it): a short spin when this machine's cores hold every
# process's threads, sleep at once (PASSIVE) when they do not; what the user set is kept.
choose_wait()

from kltrain import __version__  # noqa: E402  (after choose_wait, above)
from kltrain.config import ConfigError, load_config, to_yaml  # noqa: E402
from kltrain.training.host_memory import keep_freed_memory  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kltrain",
        description="Fine-tune a causal LM to maximise reward − β·D(policy‖reference).",
    )
    parser.add_argument("--version", action="version", version=f"kltrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="train from a config (YAML plus key=value overrides)")
    fit.add_argument("config", help="path to a YAML config, e.g. configs/quickstart.yaml")
    fit.add_argument("overrides", nargs="*", help="dotted overrides, e.g. kl.coef=0.05")
    fit.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="PATH",
        help="continue from the newest complete checkpoint in trainer.output_dir, or from PATH "
        "(a checkpoint or run folder); starts fresh when the run folder has none yet",
    )
    fit.add_argument(
        "--overwrite",
        action="store_true",
        help="start fresh even though trainer.output_dir holds an earlier run's metrics.jsonl, "
        "samples.jsonl, config.yaml or final/ (they are replaced)",
    )
    fit.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though run-changing config fields differ from the checkpoint's",
    )
    fit.add_argument(
        "--num-processes",
        type=int,
        default=None,
        metavar="N",
        help="start N processes on this machine with Accelerate's launcher (one process group: "
        "gloo on CPU, NCCL on GPUs) instead of running in this one",
    )
    fit.add_argument(
        "--accelerate-config",
        default=None,
        metavar="FILE",
        help="with --num-processes: the Accelerate config that picks the engine, e.g. "
        "configs/accelerate/fsdp.yaml (FSDP2); default data parallel (DDP)",
    )
    val = sub.add_parser("validate", help="load, resolve and check a config; print it")
    val.add_argument("config")
    val.add_argument("overrides", nargs="*")
    div = sub.add_parser(
        "divergences", help="list the divergences, estimators and the gradient each pair follows"
    )
    div.add_argument(
        "--divergence",
        default="reverse_kl",
        help="the kl.divergence the gradient table is for (default reverse_kl)",
    )
    _add_experiment_parsers(sub)
    return parser


def _add_experiment_parsers(sub) -> None:
    """``sweep``, ``eval`` and ``compare`` (kltrain/experiments/)."""
    sweep = sub.add_parser("sweep", help="run every member of a sweep file (resumable)")
    sweep.add_argument("sweep_file", help="a sweep YAML, e.g. configs/sweep_divergence.yaml")
    sweep.add_argument("--parallel", type=int, default=1, metavar="N", help="members at once")
    sweep.add_argument("--dry-run", action="store_true", help="list the members; run nothing")
    sweep.add_argument("--output-dir", help="the sweep folder (default: the file's output_dir)")
    ev = sub.add_parser("eval", help="evaluate a run or checkpoint on held-out prompts")
    ev.add_argument("run", help="a run folder (its newest checkpoint) or a checkpoint folder")
    ev.add_argument(
        "--prompts", help="a prompt file or builtin:<name> (default: the held-out split)"
    )
    ev.add_argument("--samples-per-prompt", type=int, help="default: algorithm.num_generations")
    ev.add_argument("--num-prompts", type=int, help="evaluate at most this many prompts")
    ev.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    cmp = sub.add_parser("compare", help="table, plots and report.html over runs or a sweep")
    cmp.add_argument("runs", nargs="+", help="run folders, or one sweep folder")
    cmp.add_argument("--out", help="report folder (default: <sweep folder>/report)")


#: Exit codes (see the module docstring; 75, after a preemption, comes from ``Preempted``).
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3


def main(argv: list[str] | None = None) -> int:
    _cwd_importable()
    keep_freed_memory()  # before the models load: large blocks are then reused, not re-faulted
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides after an option (`fit cfg --resume PATH k=v`) land here
        if args.command != "fit" or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return COMMANDS[args.command](args)
    except _user_errors() as err:
        print(f"kltrain: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _cwd_importable() -> None:
    """``python -m kltrain`` puts the current folder first on ``sys.path``, the ``kltrain``
    console script does not: do it here too, so ``module:function`` in a config (a reward, a
    user f) imports from the current folder the same way under both."""
    cwd = os.getcwd()
    if not any(os.path.abspath(p or ".") == cwd for p in sys.path):
        sys.path.insert(0, cwd)


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors about the user's input: one clear message, no traceback."""
    from kltrain.data import DataError
    from kltrain.models.errors import ModelError
    from kltrain.rewards import RewardError

    return (ConfigError, DataError, ModelError, RewardError)


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from kltrain.algorithms import describe_objective
    from kltrain.objective import build_regulariser, optimizer_steps_per_batch
    from kltrain.preflight import check_can_start

    regulariser = build_regulariser(cfg.kl, optimizer_steps_per_batch(cfg))
    followed, line = describe_objective(cfg, regulariser)
    checked = check_can_start(cfg)  # models, data, rewards, run folder: would fit start?
    print(to_yaml(cfg, {"gradient_followed": followed}), end="")
    for item in checked:
        print(f"# checked {item}")
    print(f"# ok: {cfg.algorithm.name}, {line}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    resume, overrides = _split_resume(args.resume, args.overrides)
    cfg = load_config(args.config, overrides)
    if args.accelerate_config and args.num_processes is None:
        raise ConfigError(
            "--accelerate-config is read by the launcher: give --num-processes N with it, or "
            f"run `accelerate launch --config_file {args.accelerate_config} -m kltrain fit ...`"
        )
    if args.num_processes is not None and args.num_processes != 1:
        return _launch(args, cfg)
    from kltrain.training.distributed import exit_launched_process, leave_process_group
    from kltrain.training.preemption import Preempted
    from kltrain.training.trainer import Trainer, TrainingStopped

    try:
        Trainer(
            cfg,
            resume=resume,
            allow_config_change=args.allow_config_change,
            overwrite=args.overwrite,
            config_path=args.config,
        ).fit()
        # a finished run only: after an error a peer may never arrive
        if leave_process_group():
            exit_launched_process(0)
    except TrainingStopped as err:
        print(f"kltrain: stopped: {err}", file=sys.stderr)
        return EXIT_STOPPED
    except Preempted as err:
        print(f"kltrain: preempted: {err}; rerun with --resume to continue", file=sys.stderr)
        return err.exit_code
    return 0


def _launch(args: argparse.Namespace, cfg) -> int:
    """Re-run this ``fit`` under Accelerate's multi-process launcher; its exit code is ours."""
    import subprocess

    from kltrain.config import prompts_per_process
    from kltrain.training.distributed import launch_command

    n = args.num_processes
    if n < 1:
        raise ConfigError(f"--num-processes must be ≥ 1; got {n}")
    prompts_per_process(cfg, n)  # refuse an uneven split here, not once per process
    argv = ["fit", args.config, *args.overrides]
    if args.resume:
        argv += ["--resume", args.resume]
    if args.allow_config_change:
        argv.append("--allow-config-change")
    if args.overwrite:
        argv.append("--overwrite")
    if args.accelerate_config and not Path(args.accelerate_config).is_file():
        raise ConfigError(f"--accelerate-config {args.accelerate_config}: no such file")
    command = launch_command(n, argv, accelerate_config=args.accelerate_config)
    print(f"kltrain: launching {n} processes: {' '.join(command)}", flush=True)
    return subprocess.run(command, check=False).returncode


def _split_resume(resume: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """``fit cfg --resume kl.coef=0.1``: argparse hands the override to --resume as its PATH;
    a value with ``=`` that is not an existing path is an override, and --resume means auto."""
    if resume and "=" in resume and not Path(resume).exists():
        return "auto", [resume, *overrides]
    return resume, overrides


def cmd_divergences(args: argparse.Namespace) -> int:
    from kltrain.divergence.estimators import describe_estimators
    from kltrain.divergence.functions import describe_divergences

    print("Divergences D(policy‖reference) (kl.divergence):")
    for name, line in describe_divergences():
        print(f"  {name:<12} {line}")
    print("\nEstimators (kl.estimator):")
    for name, line in describe_estimators():
        print(f"  {name:<12} {line}")
    _print_gradient_table(args.divergence)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Exit 0 all finished, 1 a member failed, 75 stopped by a signal (rerun to continue)."""
    from kltrain.experiments import sweep as sw

    if args.parallel < 1:
        raise ConfigError(f"--parallel must be ≥ 1; got {args.parallel}")
    spec = sw.load_sweep(args.sweep_file, args.output_dir)  # every member validated here
    print(sw.describe(spec), flush=True)
    if args.dry_run:
        return 0
    stop = sw.threading.Event()
    sw.install_stop_handlers(stop)
    return sw.run_sweep(spec, parallel=args.parallel, stop=stop)


def cmd_eval(args: argparse.Namespace) -> int:
    from kltrain.experiments.evaluate import evaluate_run

    if args.samples_per_prompt is not None and args.samples_per_prompt < 1:
        raise ConfigError(f"--samples-per-prompt must be ≥ 1; got {args.samples_per_prompt}")
    path, report = evaluate_run(
        args.run,
        samples_per_prompt=args.samples_per_prompt,
        seed=args.seed,
        num_prompts=args.num_prompts,
        prompts=args.prompts,
    )
    for key, value in report["metrics"].items():
        print(f"  {key:<40} {value:.6g}")
    print(f"kltrain: wrote {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from kltrain.experiments.report import compare

    out = compare(args.runs, args.out)
    print(f"kltrain: wrote {out / 'report.md'}, {out / 'report.html'} and the plots in {out}")
    return 0


COMMANDS = {
    "fit": cmd_fit,
    "validate": cmd_validate,
    "divergences": cmd_divergences,
    "sweep": cmd_sweep,
    "eval": cmd_eval,
    "compare": cmd_compare,
}


def _print_gradient_table(name: str) -> None:
    """Which gradient each (estimator, placement) follows under ``name``, for every
    kl.importance_ratio form, on-policy (one optimizer step per rollout batch) and off-policy
    (epochs × num_minibatches > 1); ``*`` marks what ``auto`` picks."""
    from kltrain.divergence.estimators import (
        ESTIMATOR_NAMES,
        PLACEMENTS,
        RATIO_MODES,
        gradient_followed,
    )
    from kltrain.divergence.functions import get_divergence
    from kltrain.divergence.importance import resolve_importance_ratio

    try:
        divergence = get_divergence(name)
    except (ValueError, ImportError, AttributeError) as err:
        raise ConfigError(f"--divergence: {err}") from err
    print(
        f"\nGradient followed under kl.divergence={name} (MATH.md; kl.importance_ratio forms "
        "off | on | detached, * = what auto picks; pairs that are not a gradient of it are "
        "refused unless kl.accept_gradient names them):"
    )
    for est in ESTIMATOR_NAMES:
        for placement in PLACEMENTS:
            cells = []
            for off_policy in (False, True):
                auto, _ = resolve_importance_ratio("auto", est, placement, divergence, off_policy)
                forms = ("off",) if est == "exact" or placement == "reward" else RATIO_MODES
                shown = ", ".join(
                    f"{m}{'*' if m == auto else ''}: "
                    f"{gradient_followed(est, placement, divergence, m, off_policy).key}"
                    for m in forms
                )
                cells.append(f"{'off' if off_policy else 'on'}-policy {shown}")
            print(f"  {est:<8} {placement:<7} {' | '.join(cells)}")
