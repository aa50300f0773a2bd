"""`slimpack eval ...`: evaluations of a checkpoint, each registered by its module."""

from __future__ import annotations

import argparse
import importlib

# Modules with a `register(subparsers)` function, in the order `--help` lists them.
EVAL_MODULES: tuple[str, ...] = ("slimpack.eval.positions_cli", "slimpack.eval.niah_cli")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (loss by position, needle in a haystack)")
    eval_sub = p.add_subparsers(dest="eval_command", required=True, metavar="EVALUATION")
    for name in EVAL_MODULES:
        importlib.import_module(name).register(eval_sub)
