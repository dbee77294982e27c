"""``kltrain fit|validate|divergences``: parse, validate, launch. No training logic here."""

from __future__ import annotations

import argparse
import sys

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
    val = sub.add_parser("validate", help="load, resolve and check a config; print it")
    val.add_argument("config")
    val.add_argument("overrides", nargs="*")
    sub.add_parser("divergences", help="list the divergences and estimators")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"kltrain: {err}", file=sys.stderr)
        return 2


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from kltrain.objective import build_regulariser

    reg = build_regulariser(cfg.kl)
    if cfg.algorithm.name == "fdpg":  # the divergence is the objective, not a regulariser
        from kltrain.algorithms.fdpg import gradient_description

        followed, line = gradient_description(cfg)
        print(to_yaml(cfg, {"gradient_followed": followed}), end="")
        print(f"# ok: fdpg {line}")
        return 0
    print(to_yaml(cfg, {"gradient_followed": reg.gradient.key}), end="")
    print(f"# ok: {reg.metric_name} in the {reg.placement} follows the {reg.gradient.key} gradient")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from kltrain.trainer import Trainer, TrainingStopped

    try:
        Trainer(cfg).fit()
    except TrainingStopped as err:
        print(f"kltrain: stopped: {err}", file=sys.stderr)
        return 3
    return 0


def cmd_divergences(args: argparse.Namespace) -> int:
    del args
    from kltrain.divergences import describe_divergences
    from kltrain.estimators import describe_estimators

    print("Divergences D(policy‖reference) (kl.divergence):")
    for name, line in describe_divergences():
        print(f"  {name:<12} {line}")
    print("\nEstimators (kl.estimator):")
    for name, line in describe_estimators():
        print(f"  {name:<12} {line}")
    return 0


COMMANDS = {"fit": cmd_fit, "validate": cmd_validate, "divergences": cmd_divergences}
