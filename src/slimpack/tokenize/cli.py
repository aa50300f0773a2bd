"""`slimpack tokenize INPUT... --out DIR`: the offline tokenization job (see job.py)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from slimpack import exitcodes
from slimpack.cli import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenize", help="tokenize input files into MDS shards with document boundaries",
                       description=__doc__)
    p.add_argument("inputs", nargs="+", help="files or directories (SlimPajama layout, *.jsonl[.gz|.zst], "
                   "*.parquet, Hugging Face save_to_disk directories)")
    p.add_argument("--out", required=True, help="output directory or s3://bucket/prefix")
    p.add_argument("--workers", type=positive_int, default=1, help="worker processes on this node")
    p.add_argument("--node-rank", type=int, default=None,
                   help="this node's rank (default: Slurm or RANK env, else 0)")
    p.add_argument("--num-nodes", type=int, default=None,
                   help="number of nodes (default: Slurm or WORLD_SIZE env, else 1)")
    p.add_argument("--config", help="TOML file with a [tokenize] table (configs/tokenize/slimpajama.toml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key, e.g. --set tokenize.block_tokens=32768 (repeatable)")
    p.add_argument("--block-tokens", type=int, help="target tokens per sample (default 65536)")
    p.add_argument("--on-bad-record", choices=["skip", "fail"], help="skip and count (default) or fail the part")
    p.add_argument("--no-compression", action="store_true", help="write uncompressed shards")
    p.add_argument("--staging-dir", help="local scratch for parts bound for remote storage")
    p.add_argument("--json", help="also write the report to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (there is none unless stderr is "
                   "a terminal: log files get the summary only)")
    p.set_defaults(func=run)


def load_tokenize_config(args: argparse.Namespace):
    """Defaults, then `--config`'s `[tokenize]` table, then `--set tokenize.KEY=VALUE`, then the flags."""
    from slimpack.config import load_config, parse_overrides
    from slimpack.tokenize.config import TokenizeSettings

    overrides = parse_overrides(args.set, TokenizeSettings)
    flags = overrides.setdefault("tokenize", {})
    if not isinstance(flags, dict):
        raise ValueError("--set tokenize=...: set its keys, for example --set tokenize.block_tokens=32768")
    if args.block_tokens is not None:
        flags["block_tokens"] = args.block_tokens
    if args.on_bad_record is not None:
        flags["on_bad_record"] = args.on_bad_record
    if args.no_compression:
        flags["compression"] = None
    return load_config(TokenizeSettings, args.config, overrides).tokenize


def run(args: argparse.Namespace) -> int:
    from slimpack.tokenize.job import run_tokenize

    cfg = load_tokenize_config(args)
    report = run_tokenize(args.inputs, args.out, cfg, workers=args.workers, node_rank=args.node_rank,
                          num_nodes=args.num_nodes, progress=not args.no_progress and sys.stderr.isatty(),
                          staging_dir=args.staging_dir)
    print(report.summary())
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(asdict(report), f, indent=1)
        except OSError as err:
            raise RuntimeError(f"could not write the report to {args.json} ({err.strerror or err})") from err
    return exitcodes.OK if report.ok else exitcodes.FINDINGS
