"""``fp8train train`` and ``fp8train compare``: argument parsing and exit codes (0 ok, 1 error, 130 interrupted)."""

from __future__ import annotations

import argparse
import sys
import warnings


def _plain_warnings() -> None:
    """Warnings as one ``warning: ...`` line on stderr instead of file:line noise."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr if file is None else file)

    warnings.showwarning = show


def run_train(config) -> int:
    from .config import TrainError
    from .loop import Interrupted, train

    _plain_warnings()
    try:
        train(config)
    except Interrupted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 130
    except TrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _train_command(args: argparse.Namespace) -> int:
    from .config import TrainError, config_from_args

    try:
        config = config_from_args(args)
    except TrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return run_train(config)


def _compare_command(args: argparse.Namespace) -> int:
    from .compare import compare, parse_recipes
    from .config import TrainError, config_from_args

    _plain_warnings()
    out, overwrite = getattr(args, "out", None), bool(getattr(args, "overwrite", False))
    try:
        recipes = parse_recipes(args.recipes)
        base = config_from_args(argparse.Namespace(**{k: v for k, v in vars(args).items()
                                                      if k not in ("out", "overwrite", "recipes")}))
        result = compare(recipes, base, out=out, overwrite=overwrite)
    except TrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 1 if result["failures"] else 0


def register(subparsers) -> None:
    """Add the ``train`` and ``compare`` sub-commands to the fp8train parser."""
    from .config import add_train_arguments

    train = subparsers.add_parser(
        "train", help="train a Llama-style model (default: a tiny one on the Python stdlib, a few minutes on CPU)",
        description="Train a Llama-style model from scratch. With no arguments: the 'tiny' preset on this "
                    "Python's standard-library sources, bf16 recipe (fp32 on CPU), ~2-3 minutes on 2 CPU cores.")
    add_train_arguments(train, single_run=True)
    train.set_defaults(func=_train_command)

    compare = subparsers.add_parser(
        "compare", help="train once per recipe with identical settings and write report.md with plots",
        description="Run the same training once per recipe (same seed, data and steps) and compare eval "
                    "loss, tokens/s and memory in <out>/report.md.")
    compare.add_argument("--recipes", default="bf16,fp8,coat", help="comma-separated (default bf16,fp8,coat)")
    add_train_arguments(compare, single_run=False)
    compare.set_defaults(func=_compare_command)
