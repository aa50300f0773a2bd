"""`slimpack shards ...`: tools over a shard directory (merge, validate, stats, inspect)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from slimpack import exitcodes
from slimpack.cli import positive_int


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="merge, validate, inspect and describe shard directories")
    shards_sub = p.add_subparsers(dest="shards_command", required=True, metavar="SUBCOMMAND")
    m = shards_sub.add_parser("merge", help="merge complete parts into index.json + slimpack.json")
    m.add_argument("path", help="dataset directory or s3:// URL")
    m.set_defaults(func=_merge)

    v = shards_sub.add_parser(
        "validate", help="check every shard, sample and count (exit 0 clean, 1 findings, 3 unusable)")
    v.add_argument("path", help="local dataset directory (with index.json and slimpack.json)")
    v.add_argument("--workers", type=positive_int, default=_default_workers(),
                   help="processes over shards (default: CPU count, at most 8)")
    v.add_argument("--all-hashes", action="store_true",
                   help="check every recorded hash (default: the fastest recorded, xxh3_64)")
    v.add_argument("--retokenize", type=int, default=0, metavar="N",
                   help="re-tokenize N random source documents and compare (sources must be reachable)")
    v.add_argument("--seed", type=int, default=0, help="seed choosing the --retokenize documents")
    v.add_argument("--json", metavar="FILE", help="write the full report here")
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(func=_validate)

    s = shards_sub.add_parser("stats", help="tokens, documents, lengths and attention-distance "
                                            "frequencies per context length")
    s.add_argument("path", help="local dataset directory")
    s.add_argument("--seq-len", type=int, nargs="+", default=[2048, 4096], metavar="L",
                   help="context lengths for the relative-position frequency (default 2048 4096)")
    s.add_argument("--split", default="train",
                   help="split whose epoch the position frequency counts, as the loader feeds it (default train)")
    s.add_argument("--seed", type=int, default=0, help="the loader's seed (data.seed) fixing the epoch order")
    s.add_argument("--workers", type=positive_int, default=_default_workers())
    s.add_argument("--plots", metavar="DIR", help="write PNG plots here")
    s.add_argument("--json", metavar="FILE", help="write every figure here")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_stats)

    i = shards_sub.add_parser("inspect", help="print a sample as text with document boundaries and sources")
    i.add_argument("path", help="local dataset directory")
    i.add_argument("--sample", type=int, required=True, metavar="K", help="global sample index")
    i.add_argument("--max-chars", type=int, default=2000,
                   help="characters shown per document, 0 for all (default 2000)")
    i.set_defaults(func=_inspect)


def _merge(args: argparse.Namespace) -> int:
    from slimpack.tokenize.merge import MergeWriteError, merge_dataset, missing_inputs

    try:
        manifest = merge_dataset(args.path)
    except MergeWriteError as err:  # the parts are fine; the merge failed, as a failed part does
        print(f"slimpack shards merge: error: {err}", file=sys.stderr)
        return exitcodes.FINDINGS
    print(f"merged {len(manifest['parts'])} parts: {manifest['documents']:,} documents, "
          f"{manifest['tokens']:,} tokens in {manifest['samples']:,} samples; "
          f"fingerprint {manifest['fingerprint'][:16]}")
    missing = missing_inputs(manifest)
    for line in missing:
        print(f"  MISSING {line}")
    return exitcodes.FINDINGS if missing else exitcodes.OK


def _validate(args: argparse.Namespace) -> int:
    from slimpack.shards.validate import validate_dataset

    report = validate_dataset(args.path, workers=args.workers, all_hashes=args.all_hashes,
                              retokenize=args.retokenize, seed=args.seed,
                              progress=not args.no_progress and sys.stderr.isatty())
    print(report.summary())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        print(f"  report: {args.json}")
    if report.unusable:  # the report is written; the error line and status are every command's
        raise exitcodes.UnusableDatasetError(report.unusable)
    return report.exit_status


def _stats(args: argparse.Namespace) -> int:
    from slimpack.extras import require
    from slimpack.shards.stats import compute_stats, write_plots

    if args.plots:
        require("matplotlib")  # before the pass over every shard, not after it
    report = compute_stats(args.path, seq_lens=args.seq_len, workers=args.workers, split=args.split,
                           seed=args.seed, progress=not args.no_progress and sys.stderr.isatty())
    print(report.summary())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        print(f"  figures: {args.json}")
    if args.plots:
        for path in write_plots(report, args.plots):
            print(f"  plot: {path}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from slimpack.shards.inspection import render_sample

    print(render_sample(args.path, args.sample, max_chars=args.max_chars))
    return 0
