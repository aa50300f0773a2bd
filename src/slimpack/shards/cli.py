"""`slimpack shards ...`: tools over a shard directory (merge; validate, stats, inspect)."""

from __future__ import annotations

import argparse

# Each entry: (name, help, function that adds arguments and sets `func`).
SUBCOMMANDS: list = []


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="merge, validate, inspect and describe shard directories")
    shards_sub = p.add_subparsers(dest="shards_command", required=True, metavar="SUBCOMMAND")
    m = shards_sub.add_parser("merge", help="merge complete parts into index.json + slimpack.json")
    m.add_argument("path", help="dataset directory or s3:// URL")
    m.set_defaults(func=_merge)


def _merge(args: argparse.Namespace) -> int:
    from slimpack.tokenize.merge import merge_dataset

    manifest = merge_dataset(args.path)
    print(f"merged {len(manifest['parts'])} parts: {manifest['documents']:,} documents, "
          f"{manifest['tokens']:,} tokens in {manifest['samples']:,} samples; "
          f"fingerprint {manifest['fingerprint'][:16]}")
    return 0
