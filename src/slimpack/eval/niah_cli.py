"""`slimpack eval niah MODEL...`: needle in a haystack on checkpoints, a run's checkpoints or a Hugging
Face directory (the protocols: `eval/niah.py`; docs/effective-context.md).

    slimpack eval niah RUN_DIR --data SHARDS                      # newest checkpoint, paper protocol
    slimpack eval niah RUN_DIR --data SHARDS --every 1            # every checkpoint: the run's curve
    slimpack eval niah RUN_DIR --data SHARDS --every 1 --string-shift auto --string-ratio 0.33
    slimpack eval niah HF_DIR --haystack PaulGrahamEssays.json --lengths 1024,2048

Each slimpack checkpoint's report goes to RUN_DIR/eval/niah/step_NNNNNNNN.json (+ .png heatmap;
`niah-string/` with STRING, `niah-keyed*/` for the keyed protocol), where `slimpack plot` reads it;
`--out DIR` writes there instead. A Hugging Face directory's goes to `--out` (default `niah/`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from slimpack.eval.niah import (
    PROTOCOLS,
    NiahConfig,
    dataset_haystack,
    default_lengths,
    haystack_tokens,
    results_dir,
    run_niah,
    text_haystack,
    write_heatmap,
)
from slimpack.eval.options import add_device_arguments, add_string_arguments, string_choice
from slimpack.storage import write_atomic


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("niah", help="needle in a haystack: accuracy by length and depth, effective length")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="slimpack checkpoints (step_NNNNNNNN), run directories (their newest, or see --every) "
                        "or Hugging Face Llama directories")
    p.add_argument("--every", type=int, default=0, metavar="K",
                   help="for a run directory: every K-th of its checkpoints, oldest first, and the newest "
                        "(1: all; default 0: the newest only)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="paper",
                   help="paper: the paper code's 4-needle test (default); keyed: slimpack's own variant")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="shard dataset whose --split (validation) is the haystack, in index order")
    src.add_argument("--haystack", help="a UTF-8 text file, or a JSON file with a \"text\" field, as the haystack")
    p.add_argument("--split", default="validation")
    p.add_argument("--lengths", help="comma-separated test lengths (default: --length-step steps up to the "
                                     "training length, else the model's maximum)")
    p.add_argument("--length-step", type=int, default=128)
    p.add_argument("--max-length", type=int, default=0)
    p.add_argument("--samples", type=int, default=500, help="prompts per length (500)")
    p.add_argument("--needles", type=int, default=4)
    p.add_argument("--min-retrieved", type=int, default=2, help="numbers a sample must retrieve (2)")
    p.add_argument("--digits", type=int, default=6, help="keyed protocol: digits per number (6)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="accuracy that makes a length effective (0.5; the paper does not state one)")
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help="greedy steps at most (0: 128 for paper, which also reserves them from the prompt; "
                        "enough for the answer for keyed)")
    p.add_argument("--seed", type=int, default=None, help="default: 42 for paper (the script's), 0 for keyed")
    add_string_arguments(p)
    p.add_argument("--batch-samples", type=int, default=0, help="samples decoded together (0: all of a length)")
    add_device_arguments(p)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--out", help="directory for the reports (default: each checkpoint's RUN_DIR/eval/niah...)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_command)


def _models(paths: list[str], every: int) -> list[Path]:
    """The checkpoints (and HF directories) to evaluate, in order."""
    from slimpack.eval.engines import is_slimpack_path
    from slimpack.model.checkpoint_files import list_checkpoints

    if every < 0:
        raise ValueError(f"--every {every}: give K >= 1, or 0 for each run's newest checkpoint")
    out = []
    for raw in paths:
        path = Path(raw)
        if every and is_slimpack_path(path) and (path / "checkpoints").is_dir():
            found = list_checkpoints(path / "checkpoints")
            if not found:
                raise FileNotFoundError(f"{path}/checkpoints holds no checkpoint")
            chosen = found[::every]
            out += chosen + ([found[-1]] if found[-1] not in chosen else [])
        else:
            out.append(path)
    return out


def run_command(args: argparse.Namespace) -> int:
    import torch

    from slimpack.eval.engines import is_slimpack_path, open_engine, resolve_device, resolve_dtype
    from slimpack.tokenize.tokenizer import Llama3Tokenizer

    if (args.data is None) == (args.haystack is None):
        raise ValueError("give exactly one of --data DIR (its validation split) or --haystack FILE")
    string = string_choice(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    tok = Llama3Tokenizer()
    encode = tok.encoding.encode_ordinary
    haystacks: dict[int, Any] = {}
    for path in _models(args.models, args.every):
        if string is not None and not is_slimpack_path(path):
            raise ValueError(f"{path} is not a slimpack checkpoint: STRING runs on slimpack checkpoints only "
                             f"(drop --string-shift, or evaluate the slimpack checkpoint it was exported from)")
        engine = open_engine(path, device=device, dtype=dtype, eos_ids=(tok.eos_id,), backend=args.attention_backend,
                             batch_samples=args.batch_samples)
        if args.lengths:
            lengths = tuple(int(x) for x in args.lengths.split(","))
        else:
            lengths = default_lengths(args.max_length or engine.train_length or engine.max_length, args.length_step,
                                      protocol=args.protocol, max_new_tokens=args.max_new_tokens or 0)
        too_long = [n for n in lengths if n > engine.max_length]
        if too_long:
            raise ValueError(f"length {max(too_long)} exceeds {path}'s maximum of {engine.max_length} tokens "
                             f"(max_seq_len); pass --lengths up to {engine.max_length}")
        cfg = NiahConfig(lengths=lengths, protocol=args.protocol, samples=args.samples, needles=args.needles,
                         min_retrieved=args.min_retrieved, digits=args.digits, threshold=args.threshold,
                         seed=args.seed, max_new_tokens=args.max_new_tokens)
        need = haystack_tokens(lengths)
        if need not in haystacks:  # one per distinct need: a run's checkpoints share it
            haystacks[need] = _haystack(args, tok, cfg.protocol, need)
        report = run_niah(engine.generate, tok.decode, encode, haystacks[need], cfg, bos_id=tok.bos_id,
                          eos_ids=(tok.eos_id,), model=engine.name, string=string, progress=not args.no_progress)
        record = report.to_dict()
        if engine.meta is not None:
            ckpt = Path(engine.meta["path"])
            record |= {"step": int(engine.meta["step"]), "tokens": int(engine.meta.get("tokens", 0)),
                       "checkpoint": str(ckpt)}
            out = Path(args.out) if args.out else ckpt.parent.parent / "eval" / results_dir(cfg.protocol, string)
            name = f"step_{record['step']:08d}.json"
        else:
            out, name = Path(args.out or "niah"), "niah.json"
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / name, (json.dumps(record, indent=1) + "\n").encode())
        png = write_heatmap(report, (out / name).with_suffix(".png"))
        print(report.summary())
        print(f"report {out / name}; heatmap {png}")
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


def _haystack(args: argparse.Namespace, tok: Any, protocol: str, tokens: int) -> Any:
    """--haystack's text (tokens for keyed), or about `tokens` of --data's --split."""
    if args.haystack:
        text = text_haystack(args.haystack)
        return text if protocol == "paper" else np.asarray(tok.encoding.encode_ordinary(text), dtype=np.int64)
    return dataset_haystack(args.data, tok.encoding.encode_ordinary, tok.decode, protocol=protocol,
                            split=args.split, tokens=tokens)
