"""`slimpack demo`: registers the command; the stages are in steps.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slimpack import exitcodes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on a corpus built from Python's own text")
    p.add_argument("--out", default="slimpack-demo", help="output directory (default: ./slimpack-demo)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from slimpack.demo.steps import run_demo
    from slimpack.train.demo import DemoStopped

    try:
        run_demo(Path(args.out), progress=not args.no_progress and sys.stderr.isatty())
    except DemoStopped as stop:
        print(f"slimpack demo: stopped by {stop.signal_name} (a run of `slimpack demo` starts over)", file=sys.stderr)
        return exitcodes.INTERRUPTED if stop.signal_name == "SIGINT" else exitcodes.TERMINATED
    return exitcodes.OK
