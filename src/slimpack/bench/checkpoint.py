"""`slimpack bench checkpoint`: what a checkpoint and Python's GC cost the training loop.

    torchrun --nproc-per-node 8 -m slimpack bench checkpoint --dir /ckpt-fs/bench --json OUT.json
    slimpack bench checkpoint --quick --json OUT.json       # CPU smoke run: tiny model, seconds

Builds the model with FSDP2 and AdamW as training does (`tinyllama-1.3b`; `tiny` with --quick) and
takes one optimiser step, so AdamW's state exists (fp32 weights and two moments: about 18 GB for the
1.3B model, over all ranks). Then, `--repeats` times each, on the slowest rank's clock:

- sync: `save_checkpoint`, the whole save on the critical path (the stall before async saves);
- async: `AsyncCheckpointer.save` until it returns (the stall training sees now: the host copy) and
  until `wait()` returns (the write, checksums, rename and pruning, off the critical path). One
  more save comes first and is reported apart: it allocates the pinned host buffers that the
  later saves reuse, so its stall is a run's first checkpoint's, not every checkpoint's;
- checksums: xxh3_128 over every file of the checkpoint as resume computes it (`verify_checkpoint`,
  each rank a share; the files were just written, so mostly from the page cache), and its bytes;
- gc: a full `gc.collect()` with the trainer's objects alive, before and after `gc.freeze()` (the
  pause a collection puts into one rank's step while the others wait at the next collective).

Checkpoints go to `--dir` (default: a temporary directory; on a cluster, point it at the file
system real checkpoints go to) and are deleted at the end.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from slimpack import exitcodes
from slimpack.bench.train import _max_over_ranks, _sync, synthetic_micro_batches
from slimpack.model.transformer import Transformer, model_config
from slimpack.train import checkpoint as ckpt
from slimpack.train.config import OptimSection, ParallelSection
from slimpack.train.loop import train_step
from slimpack.train.optim import build_optimizer
from slimpack.train.parallel import init_distributed, parallelize


def _slowest(seconds: float, device: Any) -> float:
    return _max_over_ranks(seconds, device)


def _timed(fn: Any, device: Any) -> float:
    _sync(device)
    dist.barrier()
    t = time.perf_counter()
    fn()
    _sync(device)
    return _slowest(time.perf_counter() - t, device)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    d = init_distributed("cpu" if args.quick else "auto")
    if not args.quick and d.device.type != "cuda":
        raise RuntimeError("bench checkpoint needs a CUDA GPU; use --quick for the CPU smoke run")
    preset = "tiny" if args.quick else "tinyllama-1.3b"
    cfg = model_config(preset)
    torch.manual_seed(0)
    with torch.device(d.device):
        model = Transformer(cfg)
    model.init_weights()
    parallelize(model, d.mesh, ParallelSection(mixed_precision=d.device.type == "cuda"), d.device)
    optimizer = build_optimizer(model, OptimSection(), d.device)
    seq_len = 128 if args.quick else 2048
    batch = next(synthetic_micro_batches(seq_len=seq_len, micro_batch_size=1, vocab_size=cfg.vocab_size, seed=d.rank))
    train_step(model, optimizer, [batch], device=d.device, world_size=d.world_size, grad_clip_norm=1.0)

    result: dict[str, Any] = {
        "command": "slimpack bench checkpoint" + (" --quick" if args.quick else ""),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "device": (torch.cuda.get_device_name(d.device) if d.device.type == "cuda"
                   else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"),
        "world_size": d.world_size, "torch": torch.__version__, "model_preset": preset,
        "model_params": cfg.num_params(), "repeats": args.repeats}
    scratch = None
    if args.dir is None:
        shared = [tempfile.mkdtemp(prefix="slimpack-bench-ckpt-") if d.rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)  # one host: the ranks share rank 0's directory
        scratch = root = Path(shared[0])
    else:
        root = Path(args.dir)
    result["dir"] = str(root)
    try:
        sync, stall, total, verify = [], [], [], []
        saver = ckpt.AsyncCheckpointer()
        step = itertools.count(1)
        for _ in range(args.repeats):
            sync.append(_timed(lambda: ckpt.save_checkpoint(root / "sync", next(step), model, optimizer, {},
                                                            keep_last=1), d.device))
        for _ in range(args.repeats + 1):  # the first allocates the (pinned) host buffers: apart
            t0 = time.perf_counter()
            stall.append(_timed(lambda: saver.save(root / "async", next(step), model, optimizer, {}, keep_last=1),
                                d.device))
            saver.wait()
            _sync_all(d.device)
            total.append(_slowest(time.perf_counter() - t0, d.device))
        first_stall, first_total = stall.pop(0), total.pop(0)
        newest = ckpt.latest_checkpoint(root / "async")
        files = ckpt.read_meta(newest)["files"]
        for _ in range(args.repeats):
            verify.append(_timed(lambda: ckpt.verify_checkpoint(newest), d.device))
        nbytes = sum(rec["bytes"] for rec in files.values())
        result["checkpoint"] = {
            "bytes": nbytes, "files": len(files),
            "sync_save_s": sync, "async_first_stall_s": first_stall, "async_first_total_s": first_total,
            "async_stall_s": stall, "async_total_s": total, "verify_s": verify,
            "sync_save_median_s": statistics.median(sync), "async_stall_median_s": statistics.median(stall),
            "async_total_median_s": statistics.median(total), "verify_median_s": statistics.median(verify),
            "verify_gb_per_s": nbytes / statistics.median(verify) / 1e9}
    finally:
        dist.barrier()
        if d.rank == 0:
            for sub in ("sync", "async"):
                shutil.rmtree(root / sub, ignore_errors=True)
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
    result["gc"] = _gc_pauses(args.repeats, d.device)
    result["ok"] = True
    return result


def _sync_all(device: Any) -> None:
    _sync(device)
    dist.barrier()


def _gc_pauses(repeats: int, device: Any) -> dict[str, Any]:
    """A full collection's pause with the set-up trainer's objects alive, before and after freezing
    them out of the collector's scans (train.gc_every_steps does the latter)."""
    def pause() -> float:
        t = time.perf_counter()
        gc.collect()
        return time.perf_counter() - t

    tracked = len(gc.get_objects())
    before = [_slowest(pause(), device) for _ in range(repeats)]
    gc.freeze()
    try:
        after = [_slowest(pause(), device) for _ in range(repeats)]
    finally:
        gc.unfreeze()
    return {"tracked_objects": tracked, "collect_s": before, "collect_frozen_s": after,
            "collect_median_s": statistics.median(before), "collect_frozen_median_s": statistics.median(after)}


def table(result: dict[str, Any]) -> str:
    c, g = result["checkpoint"], result["gc"]
    return "\n".join([
        f"bench checkpoint on {result['world_size']} x {result['device']} (torch {result['torch']}), "
        f"{result['model_preset']}: {c['bytes'] / 1e9:.2f} GB in {c['files']} files under {result['dir']}",
        f"sync save (stall)      {c['sync_save_median_s']:8.3f} s",
        f"async save: stall      {c['async_stall_median_s']:8.3f} s   total {c['async_total_median_s']:.3f} s",
        f"  first async save     {c['async_first_stall_s']:8.3f} s   total {c['async_first_total_s']:.3f} s "
        f"(allocates the host buffers)",
        f"verify (xxh3_128)      {c['verify_median_s']:8.3f} s   {c['verify_gb_per_s']:.2f} GB/s",
        f"gc.collect()           {1e3 * g['collect_median_s']:8.1f} ms  "
        f"frozen {1e3 * g['collect_frozen_median_s']:.1f} ms ({g['tracked_objects']:,} objects)",
        f"medians of {result['repeats']} repeats, slowest rank"])


def main(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats}: must be at least 1")
    result = run_bench(args)
    rank = dist.get_rank()
    dist.destroy_process_group()
    if rank == 0:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1))
        print(table(result), flush=True)
    return exitcodes.OK
