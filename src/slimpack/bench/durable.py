"""`slimpack bench durable`: what durable writes cost tokenize, merge and a checkpoint save.

    slimpack bench durable [--input DIR] [--dir DIR] [--repeats 3] [--json OUT.json]

Durable writes fsync each file before its rename and the directory after (`storage.write_atomic`;
a checkpoint: DCP's files, the ledger, meta.json and the directories). Each phase runs the real
code under both settings in the same run, alternating: the baseline with ``os.fsync`` a no-op
(the same writes and renames, nothing forced to disk), then as shipped. Medians of ``--repeats``.

- tokenize: every part the way a tokenize worker makes it (`job._run_part`: shards, the part's
  index.json, stats.json), in this process so the baseline can switch fsync off; the demo corpus
  unless ``--input``.
- merge: `merge_dataset` over those parts (index.json, sample_tokens.npy, slimpack.json).
- checkpoint: `save_checkpoint` of the ``tiny`` model and its AdamW state (one gloo process).

Writes under ``--dir`` (default: a temporary directory in the current one): the disk measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from slimpack.demo.corpus import build_corpus
from slimpack.model.transformer import Transformer, model_config
from slimpack.tokenize import job
from slimpack.tokenize.job import TokenizeConfig, discover
from slimpack.tokenize.merge import merge_dataset
from slimpack.train.checkpoint import save_checkpoint
from slimpack.train.config import OptimSection, ParallelSection
from slimpack.train.loop import train_step
from slimpack.train.optim import build_optimizer
from slimpack.train.parallel import init_distributed, parallelize

MODES = ("baseline (no fsync)", "durable (fsync)")


@contextlib.contextmanager
def _fsync(enabled: bool) -> Iterator[None]:
    if enabled:
        yield
        return
    real = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = real


def _timed(fn: Callable[[], Any], durable: bool) -> float:
    with _fsync(durable):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def _filesystem(path: Path) -> str:
    """The mount's type and device (/proc/mounts), e.g. 'ext4 on /dev/vda'."""
    best = ("", "?", "?")
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            device, mount, kind = line.split()[:3]
            if str(path.resolve()).startswith(mount) and len(mount) >= len(best[0]):
                best = (mount, kind, device)
    return f"{best[1]} on {best[2]}"


def _tiny_model() -> tuple[Any, Any]:
    d = init_distributed("cpu")
    torch.manual_seed(0)
    model = Transformer(model_config("tiny"))
    parallelize(model, d.mesh, ParallelSection(mixed_precision=False), d.device)
    opt = build_optimizer(model, OptimSection(lr=1e-3), d.device)
    T = 64
    ids = torch.randint(0, 1000, (T,))
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1), "position_ids": torch.arange(T),
             "cu_seqlens": torch.tensor([0, T], dtype=torch.int32), "max_seqlen": T}
    train_step(model, opt, [batch], device=d.device, world_size=1, grad_clip_norm=1.0)  # AdamW state
    return model, opt


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="bench-durable-", dir=args.dir))
    try:
        corpus = Path(args.input) if args.input else base / "corpus"
        if not args.input:
            build_corpus(corpus)
        items, _ = discover([str(corpus)])
        cfg = TokenizeConfig()
        job._init_worker(None)  # the worker's tokenizer, in this process
        model, opt = _tiny_model()
        times: dict[str, dict[str, list[float]]] = {p: {m: [] for m in MODES}
                                                    for p in ("tokenize", "merge", "checkpoint")}
        out = {}
        for r in range(args.repeats):
            order = MODES if r % 2 == 0 else MODES[::-1]  # alternate: drift hits both alike
            for mode in order:
                durable = mode == MODES[1]
                out = base / f"out-{r}-{int(durable)}"
                results: list[dict[str, Any]] = []
                times["tokenize"][mode].append(_timed(
                    lambda: results.extend(job._run_part(i, cfg, str(out), None) for i in items), durable))  # noqa: B023
                failed = [r["error"] for r in results if "error" in r]
                if failed:
                    raise RuntimeError(f"bench durable: a part failed: {failed[0]}")
                times["merge"][mode].append(_timed(lambda: merge_dataset(str(out)), durable))  # noqa: B023
                ckpt = base / f"ckpt-{r}-{int(durable)}"
                times["checkpoint"][mode].append(_timed(
                    lambda: save_checkpoint(ckpt, 1, model, opt, {}, keep_last=1), durable))  # noqa: B023
        files = sum(1 for p in out.rglob("*") if p.is_file())
        shards = sum(1 for p in out.rglob("shard.*"))
        ckpt_bytes = sum(p.stat().st_size for p in (base / "ckpt-0-1").rglob("*") if p.is_file())
        rows = []
        for phase, by_mode in times.items():
            baseline, durable = (statistics.median(by_mode[m]) for m in MODES)
            rows.append({"phase": phase, "baseline_s": baseline, "durable_s": durable,
                         "overhead": durable / baseline - 1, "runs": by_mode})
        return {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                           f"Python {platform.python_version()}",
                "filesystem": _filesystem(base), "input": str(corpus), "parts": len(items),
                "dataset_files": files, "shards": shards, "checkpoint_bytes": ckpt_bytes,
                "repeats": args.repeats, "rows": rows}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(base, ignore_errors=True)


def main(args: argparse.Namespace) -> int:
    result = run_bench(args)
    print(f"{result['machine']}; {result['filesystem']}; {result['parts']} parts, {result['shards']} "
          f"shards, {result['dataset_files']} dataset files; checkpoint {result['checkpoint_bytes']:,} "
          f"bytes; medians of {result['repeats']}")
    for r in result["rows"]:
        print(f"  {r['phase']:<10} baseline {r['baseline_s']:.3f} s, durable {r['durable_s']:.3f} s "
              f"({100 * r['overhead']:+.1f}%)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0
