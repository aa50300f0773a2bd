"""`slimpack eval positions CHECKPOINT --data DIR`: the command (the measurement: `eval/positions.py`)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from slimpack.eval.options import add_string_arguments, string_choice


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("positions", help="mean token loss at each position 0..L-1 of held-out documents")
    p.add_argument("checkpoint", help="a checkpoint directory (step_NNNNNNNN) or a run directory (its newest)")
    p.add_argument("--data", required=True, help="shard dataset with a held-out split")
    p.add_argument("--split", default="validation", help="held-out split (default validation)")
    p.add_argument("--seq-len", type=int, help="positions to evaluate (default: the run's data.seq_len)")
    p.add_argument("--max-documents", type=int, default=64, help="documents averaged (default 64)")
    p.add_argument("--per-batch", type=int, default=4, help="documents per forward pass (default 4)")
    p.add_argument("--buckets", type=int, default=16, help="equal position ranges summarised (default 16)")
    p.add_argument("--device", default="auto", help="auto (a GPU if present), cuda or cpu")
    p.add_argument("--run-dir", help="write into RUN_DIR/eval/positions (default: the checkpoint's run)")
    p.add_argument("--out", help="write into this directory instead")
    add_string_arguments(p)
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from slimpack.eval.positions import evaluate_positions, write_curve

    record = evaluate_positions(args.checkpoint, args.data, split=args.split, seq_len=args.seq_len,
                                max_documents=args.max_documents, per_batch=args.per_batch,
                                device=args.device, buckets=args.buckets, string=string_choice(args))
    ckpt = Path(record["checkpoint"])
    out = Path(args.out) if args.out else Path(args.run_dir or ckpt.parent.parent) / "eval" / "positions"
    replaced = (out / f"step_{record['step']:08d}.json").is_file()
    path, png = write_curve(record, out)
    b = [x for x in record["buckets"] if x["loss"] is not None]
    print(f"eval positions {ckpt} (step {record['step']:,}): {record['documents']} {record['split']} documents "
          f"of >= {record['seq_len'] + 1} tokens ({record['documents_long_enough']} in the split); mean loss "
          f"{b[0]['loss']:.4f} at positions {b[0]['start']}-{b[0]['end'] - 1} -> {b[-1]['loss']:.4f} at "
          f"{b[-1]['start']}-{b[-1]['end'] - 1}")
    print(f"  {path}{' (replaced the record that was there)' if replaced else ''}\n  {png}")
    return 0 if all(math.isfinite(x["loss"]) for x in b) else 1
