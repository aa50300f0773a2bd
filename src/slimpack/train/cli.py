"""`slimpack train` and `slimpack export-hf`.

    slimpack train --config configs/train/debug-cpu.toml --set data.path=DIR [--resume auto]
    torchrun --nproc-per-node 8 -m slimpack.train --config configs/train/paper-2k.toml
    slimpack export-hf RUN_DIR/checkpoints/step_00001000 OUT_DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slimpack import exitcodes


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file (configs/train/*.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--resume", help="auto (newest checkpoint, default), none, or a checkpoint directory")


def run_train(args: argparse.Namespace) -> int:
    from slimpack.train.config import load_train_config
    from slimpack.train.loop import train

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    report = train(load_train_config(args.config, overrides))
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(report.summary(), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    if not report.stopped_by_signal:
        return exitcodes.OK
    # SIGTERM is a scheduler's pre-emption: "saved, run me again". Ctrl-C is a person stopping the run.
    return exitcodes.INTERRUPTED if report.stop_signal == "SIGINT" else exitcodes.RESUMABLE


def run_export(args: argparse.Namespace) -> int:
    from slimpack.model.checkpoint_files import load_model_state_dict, resolve_checkpoint
    from slimpack.model.transformer import ModelConfig
    from slimpack.train.export import export_hf

    path = Path(args.checkpoint)
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # checked first: loading a 1.3B checkpoint takes a while
        raise ValueError(f"export-hf: {out} is an existing file; pass a directory (it is created if absent)")
    path = resolve_checkpoint(path)  # a run directory: its newest checkpoint
    state_dict, meta = load_model_state_dict(path)
    cfg = ModelConfig(**meta["model_config"])
    export_hf(state_dict, cfg, args.out)
    n_params = sum(t.numel() for t in state_dict.values())
    print(f"exported {path} (step {meta['step']}, {n_params:,} parameters) "
          f"to {args.out} as LlamaForCausalLM with the Llama 3 tokenizer", file=sys.stdout)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the model (one process; torchrun -m slimpack.train for many)")
    add_train_arguments(p)
    p.set_defaults(func=run_train)
    e = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face LlamaForCausalLM directory",
                       description="Checks the checkpoint's recorded checksums first. Checkpoints are code: "
                       "torch.distributed.checkpoint unpickles them, so export only checkpoints you trust.")
    e.add_argument("checkpoint", help="a step_NNNNNNNN checkpoint directory, or a run directory (newest)")
    e.add_argument("out", help="output directory (weights, config, tokenizer, generation config)")
    e.set_defaults(func=run_export)
