"""`slimpack plot RUN_DIR`: the command (the figures: `slimpack/plot.py`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="effective length, position frequency, loss by position and goodput of a run")
    p.add_argument("run_dir", help="a training run directory")
    p.add_argument("--out", help="output directory (default RUN_DIR/plots)")
    p.add_argument("--distances", type=int, nargs="+", metavar="I",
                   help="distances i for f(i) (default L/4, L/2, 3L/4, L-1; the paper's 1280, say)")
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from slimpack.plot import plot_run  # matplotlib: the plots extra, named if missing

    report = plot_run(args.run_dir, out_dir=args.out, distances=args.distances)
    print(report.summary())
    print(f"  summary: {Path(report.out_dir) / 'summary.json'}")
    return 0
