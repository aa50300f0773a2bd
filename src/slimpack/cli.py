"""The `slimpack` command: one subcommand per stage, each registered by its own module.

Registering imports nothing heavy; a subcommand's handler imports what it needs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from slimpack import __version__, exitcodes

# (module with a `register(subparsers)` function) in the order `--help` lists them.
COMMAND_MODULES = (
    "slimpack.demo",
    "slimpack.tokenize.cli",
    "slimpack.shards.cli",
    "slimpack.pipeline.cli",
    "slimpack.train.cli",
    "slimpack.eval.cli",
    "slimpack.plot",
    "slimpack.bench.cli",
)


def positive_int(text: str) -> int:
    """argparse type for counts such as `--workers`: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimpack", description="SlimPajama -> Llama 3 MDS shards -> packed batches -> training")
    parser.add_argument("--version", action="version", version=f"slimpack {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"slimpack {args.command}: error: {err}", file=sys.stderr)
        return exitcodes.USAGE
    except KeyboardInterrupt:  # Ctrl-C where nothing catches it (train saves first: see train/loop.py)
        print(f"slimpack {args.command}: interrupted", file=sys.stderr)
        return exitcodes.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
