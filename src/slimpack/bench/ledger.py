"""`slimpack bench ledger`: host time of the position-frequency ledger per optimiser step, on CPU.

    slimpack bench ledger [--seq-len 2048 4096] [--global-batch-tokens 4194304] [--json OUT.json]

The paper's step is 4,194,304 tokens (2,048 sequences of 2K, or 1,024 of 4K). This packs a whole
step with the loader's own packing (`packing.pack_slice`, micro-batches of `--micro-batch-size`
windows, as CPU tensors like the loader's) from documents of log-normal length (median 600 tokens,
sigma 1.2, the `bench train` synthetic data), then times what the training loop adds per step
(`step_segment_counts` over the micro-batches, then `add_segments`). That is the whole step on one
host: each of W ranks counts only its 1/W of it. Baseline, same run: the valid-label count the loop
already makes over the same micro-batches (`loss.count_valid`). The GPU-side share of step time
comes from `slimpack bench train` (its `ledger_fraction`).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimpack.pipeline import packing
from slimpack.train.ledger import PositionLedger, step_segment_counts
from slimpack.train.loss import count_valid


def packed_step(*, seq_len: int, global_batch_tokens: int, micro_batch_size: int, seed: int = 0) -> list[dict]:
    """One step's micro-batches (CPU tensors) packed from log-normal documents."""
    rng = np.random.default_rng(seed)
    tokens = global_batch_tokens + 1
    lengths = np.maximum(2, np.exp(np.log(600) + 1.2 * rng.standard_normal(tokens // 100 + 10)).astype(np.int64))
    starts = np.cumsum(lengths) - lengths
    starts = starts[starts < tokens]
    flat = rng.integers(0, 128_000, tokens, dtype=np.int64)
    per_micro = micro_batch_size * seq_len
    out = []
    for begin in range(0, global_batch_tokens, per_micro):
        inside = starts[(starts >= begin) & (starts <= begin + per_micro)] - begin
        mb = packing.pack_slice(flat[begin:begin + per_micro + 1], inside, seq_len)
        out.append({k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                    for k, v in mb.items()})
    return out


def _best_of(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for L in args.seq_len:
        step = packed_step(seq_len=L, global_batch_tokens=args.global_batch_tokens,
                           micro_batch_size=args.micro_batch_size)
        ledger = PositionLedger(L)
        ledger_s = _best_of(lambda: ledger.add_segments(step_segment_counts(step, L)), args.repeats)  # noqa: B023
        count_s = _best_of(lambda: sum(count_valid(mb["labels"]) for mb in step), args.repeats)  # noqa: B023
        segments = sum(len(mb["cu_seqlens"]) - 1 for mb in step)
        rows.append({"seq_len": L, "micro_batches": len(step), "segments": segments,
                     "ledger_seconds_per_step": ledger_s, "count_valid_seconds_per_step": count_s})
    return {"machine": f"{platform.processor() or platform.machine()}, {platform.python_version()}",
            "global_batch_tokens": args.global_batch_tokens, "micro_batch_size": args.micro_batch_size,
            "repeats": args.repeats, "rows": rows}


def main(args: argparse.Namespace) -> int:
    result = run_bench(args)
    for r in result["rows"]:
        print(f"L={r['seq_len']}: {r['micro_batches']} micro-batches, {r['segments']:,} segments per "
              f"{result['global_batch_tokens']:,}-token step: ledger {1e3 * r['ledger_seconds_per_step']:.2f} ms; "
              f"baseline count_valid {1e3 * r['count_valid_seconds_per_step']:.2f} ms (best of {result['repeats']})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0
