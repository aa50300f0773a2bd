"""`slimpack pipeline digest|inspect PATH`: prove what data each step sees, and look at it.

    slimpack pipeline digest PATH --seq-len 2048 --global-batch-tokens 4194304 --steps 5 [--world-size 8]
    slimpack pipeline inspect PATH --seq-len 512 --global-batch-tokens 8192 --step 3
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict


def _loader_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="dataset directory or s3://bucket/prefix (merged by slimpack tokenize)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--global-batch-tokens", type=int, default=4_194_304,
                   help="tokens per optimiser step over all ranks (default 4194304)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="sequences per rank per micro-step (default: the whole step in one micro-step)")
    p.add_argument("--world-size", type=int, default=1, help="simulated ranks (default 1)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train")
    p.add_argument("--locality-shards", type=int, default=None)
    p.add_argument("--cache-dir", default=None, help="local shard cache for remote datasets")
    p.add_argument("--fetch-attempts", type=int, default=10,
                   help="remote datasets: tries per read before failing (default 10)")
    p.add_argument("--fetch-backoff-max", type=float, default=30.0, metavar="SECONDS",
                   help="remote datasets: longest wait between tries (default 30; waits double from 0.5)")
    p.add_argument("--fetch-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="remote datasets: a try gives up on a silent server after this (default 30)")


def _config(args: argparse.Namespace, rank: int = 0):
    from slimpack.pipeline.loader import LoaderConfig

    mbs = args.micro_batch_size
    if mbs is None:
        mbs = max(1, args.global_batch_tokens // args.seq_len // args.world_size)
    return LoaderConfig(args.path, seq_len=args.seq_len, global_batch_tokens=args.global_batch_tokens,
                        micro_batch_size=mbs, rank=rank, world_size=args.world_size, seed=args.seed,
                        num_workers=args.num_workers, split=args.split,
                        locality_shards=args.locality_shards, cache_dir=args.cache_dir,
                        fetch_attempts=args.fetch_attempts, fetch_backoff_max_s=args.fetch_backoff_max,
                        fetch_timeout_s=args.fetch_timeout)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="packed streaming loader: per-step digests, inspect a micro-batch",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    psub = p.add_subparsers(dest="pipeline_command", required=True, metavar="COMMAND")

    d = psub.add_parser("digest", help="one hash per step over the step's global tokens")
    _loader_args(d)
    d.add_argument("--steps", type=int, required=True, help="number of steps to hash")
    d.add_argument("--start-step", type=int, default=0, help="first step (resumed by arithmetic)")
    d.add_argument("--json", help="also write the report here")
    d.set_defaults(func=run_digest)

    i = psub.add_parser("inspect", help="decode one micro-batch with document and window boundaries")
    _loader_args(i)
    i.add_argument("--step", type=int, required=True)
    i.add_argument("--micro", type=int, default=0, help="micro-step within the step")
    i.add_argument("--rank", type=int, default=0)
    i.add_argument("--max-chars", type=int, default=160, help="characters shown per segment")
    i.add_argument("--no-decode", action="store_true", help="print token ids instead of text")
    i.set_defaults(func=run_inspect)


def run_digest(args: argparse.Namespace) -> int:
    from slimpack.pipeline.tools import digest_steps

    report = digest_steps(_config(args), start_step=args.start_step, steps=args.steps)
    e = report.epoch
    print(f"loader fingerprint {report.fingerprint[:16]}: {e['steps_per_epoch']:,} steps per epoch, "
          f"{e['dropped_tokens_per_epoch']:,} tail tokens dropped per epoch; world_size "
          f"{report.world_size} x micro_batch_size {report.micro_batch_size} "
          f"x grad_accum {report.grad_accum}")
    print("\n".join(report.lines()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(report), f, indent=1)
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from slimpack.pipeline.loader import PackedLoader
    from slimpack.pipeline.tools import inspect_micro_batch

    loader = PackedLoader(_config(args, rank=args.rank))
    decode = None
    if not args.no_decode:
        from slimpack.tokenize.tokenizer import Llama3Tokenizer

        decode = Llama3Tokenizer().decode
    report = inspect_micro_batch(loader, args.step, args.micro, decode=decode)
    print("\n".join(report.lines(args.max_chars)))
    return 0
