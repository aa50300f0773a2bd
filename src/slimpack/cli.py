"""The `slimpack` command: one subcommand per stage, each registered by its own module.

Registering imports nothing heavy; a subcommand's handler imports what it needs. Errors a user can
fix end in one line prefixed with the full command, `slimpack shards inspect: error: ...`, with a
status from `exitcodes`: a bad flag, value, path or a missing extra (`extras`) is a usage error, a
dataset that cannot be used is UNUSABLE.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from slimpack import __version__, exitcodes
from slimpack.extras import missing_extra
from slimpack.log import configure_logging

# (module with a `register(subparsers)` function) in the order `--help` lists them.
COMMAND_MODULES = (
    "slimpack.demo.cli",
    "slimpack.tokenize.cli",
    "slimpack.shards.cli",
    "slimpack.pipeline.cli",
    "slimpack.train.cli",
    "slimpack.eval.cli",
    "slimpack.plot_cli",
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
    _record_command_names(parser)
    return parser


def _record_command_names(parser: argparse.ArgumentParser) -> None:
    """Give every command's parser its full name (`slimpack shards inspect`) as the default of
    `command_prog`, the prefix of its error lines."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subcommands:
        parser.set_defaults(command_prog=parser.prog)
    for action in subcommands:
        for subparser in action.choices.values():
            _record_command_names(subparser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_handler(args.command_prog, args.func, args)


def run_handler(prog: str, func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command's handler with logging configured; an error the user can fix becomes one line,
    ``PROG: error: ...``, and its exit status (`exitcodes`)."""
    configure_logging()
    try:
        return int(func(args) or 0)
    except exitcodes.UnusableDatasetError as err:
        return _fail(prog, err, exitcodes.UNUSABLE)
    except exitcodes.NonFiniteStepsError as err:
        return _fail(prog, err, exitcodes.DIVERGED)
    except exitcodes.TemporaryError as err:  # a store that stayed away, a hung rank: resume; Slurm requeues
        return _fail(prog, err, exitcodes.RESUMABLE)
    except ModuleNotFoundError as err:
        missing = missing_extra(err)
        if missing is None:
            raise  # not an optional dependency: a broken install, with its traceback
        return _fail(prog, missing, exitcodes.USAGE)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        return _fail(prog, err, exitcodes.USAGE)
    except KeyboardInterrupt:  # Ctrl-C where nothing catches it (train saves first: see train/loop.py)
        print(f"{prog}: interrupted", file=sys.stderr)
        # CPython flags a KeyboardInterrupt that left an exec() of a string as unhandled even once it
        # is caught, and `python -m` then ends by SIGINT, not with this status. Each exec() of a
        # string clears that flag first: this one leaves it clear.
        exec("None")
        return exitcodes.INTERRUPTED


def _fail(prog: str, err: Exception, status: int) -> int:
    print(f"{prog}: error: {err}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
