"""`slimpack bench ...`: benchmarks, each registered by its module."""

from __future__ import annotations

import argparse
import importlib

BENCH_MODULES = (
    "slimpack.bench.tokenize", "slimpack.bench.validate", "slimpack.bench.loader", "slimpack.bench.model",
    "slimpack.bench.train", "slimpack.bench.ledger", "slimpack.bench.niah", "slimpack.bench.checkpoint",
    "slimpack.bench.durable",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (figures for BENCHMARKS.md)")
    bench_sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    for name in BENCH_MODULES:
        importlib.import_module(name).register(bench_sub)
