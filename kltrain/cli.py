"""``kltrain fit|validate|divergences``: parse, validate, launch. No training logic here.

Exit codes of ``fit``: 0 done; 2 bad input — config, data, model, reward or checkpoint (the
message names it); 3 a guard stopped the run (non-finite updates, ``kl.max``); 75 stopped on
SIGTERM/SIGUSR1 after writing a complete checkpoint (rerun with ``--resume``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# OpenMP reads its wait policy once, when torch loads it, so this must come before any import of
# torch (kltrain.config imports it). PASSIVE: idle threads sleep instead of spinning, which suits
# a step that alternates generation (small GEMMs, one token at a time) with training, and leaves
# the cores to tokenisation and rewards in between. A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from kltrain import __version__
from kltrain.config import ConfigError, load_config, to_yaml


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
        "--allow-config-change",
        action="store_true",
        help="resume even though run-changing config fields differ from the checkpoint's",
    )
    val = sub.add_parser("validate", help="load, resolve and check a config; print it")
    val.add_argument("config")
    val.add_argument("overrides", nargs="*")
    sub.add_parser("divergences", help="list the divergences and estimators")
    return parser


#: Exit codes (see the module docstring; 75, after a preemption, comes from ``Preempted``).
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3


def main(argv: list[str] | None = None) -> int:
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


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors about the user's input: one clear message, no traceback."""
    from kltrain.data import DataError
    from kltrain.models.errors import ModelError
    from kltrain.rewards import RewardError

    return (ConfigError, DataError, ModelError, RewardError)


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from kltrain.algorithms import describe_objective
    from kltrain.objective import build_regulariser

    followed, line = describe_objective(cfg, build_regulariser(cfg.kl))
    print(to_yaml(cfg, {"gradient_followed": followed}), end="")
    print(f"# ok: {cfg.algorithm.name}, {line}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    resume, overrides = _split_resume(args.resume, args.overrides)
    cfg = load_config(args.config, overrides)
    from kltrain.training.preemption import Preempted
    from kltrain.training.trainer import Trainer, TrainingStopped

    try:
        Trainer(cfg, resume=resume, allow_config_change=args.allow_config_change).fit()
    except TrainingStopped as err:
        print(f"kltrain: stopped: {err}", file=sys.stderr)
        return EXIT_STOPPED
    except Preempted as err:
        print(f"kltrain: preempted: {err}; rerun with --resume to continue", file=sys.stderr)
        return err.exit_code
    return 0


def _split_resume(resume: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """``fit cfg --resume kl.coef=0.1``: argparse hands the override to --resume as its PATH;
    a value with ``=`` that is not an existing path is an override, and --resume means auto."""
    if resume and "=" in resume and not Path(resume).exists():
        return "auto", [resume, *overrides]
    return resume, overrides


def cmd_divergences(args: argparse.Namespace) -> int:
    del args
    from kltrain.divergence.estimators import describe_estimators
    from kltrain.divergence.functions import describe_divergences

    print("Divergences D(policy‖reference) (kl.divergence):")
    for name, line in describe_divergences():
        print(f"  {name:<12} {line}")
    print("\nEstimators (kl.estimator):")
    for name, line in describe_estimators():
        print(f"  {name:<12} {line}")
    return 0


COMMANDS = {"fit": cmd_fit, "validate": cmd_validate, "divergences": cmd_divergences}
