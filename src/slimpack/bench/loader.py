"""`slimpack bench loader [--data DIR]`: packed-loader throughput, scale, and a training-loop simulation.

1. Throughput: one process, ``num_workers=0``, full micro-batch assembly (window slicing, labels,
   position ids, cu_seqlens, torch tensors) from local zstd shards, seq_len 2048, micro-batch 8.
   Baseline in the same run: copying the same number of tokens out of the decoded shards into
   int64 with no packing at all (the floor any loader pays). Also the raw zstd decode rate, from
   which the worst case (every 65,536-token sample from a cold 64 MiB shard) follows.
2. Scale: a synthetic SlimPajama-size dataset (627B tokens in 65,536-token samples over ~60K
   parts, per-sample counts synthesised, no shard bytes) written to disk; a fresh process then
   loads the index and plans step 0 (timed, peak memory by tracemalloc and RSS), then resumes at
   step 200,000 (4M-token steps: epoch 1, so a new permutation) and plans that step (timed).
   Timed and memory-traced in two separate fresh processes (tracemalloc slows allocation).
3. Training loop: two rank processes, each a loader with 2 DataLoader workers feeding a consumer
   that "computes" at 80k tokens/s (sleep); data wait = time blocked in ``next()`` for a step.

Data: ``--data`` (a merged dataset), else the demo corpus (``slimpack demo``'s text in SlimPajama's
layout) tokenized with the default config into a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from slimpack.pipeline import LoaderConfig, PackedLoader
from slimpack.pipeline.index import load_index
from slimpack.shards import schema
from slimpack.shards.mds import decompress

SCALE_TOKENS = 627_000_000_000
SCALE_SAMPLE_TOKENS = 65_536


# ----------------------------------------------------------------------------- data


def _prepare_data(data: str | None, scratch: Path) -> tuple[str, str]:
    if data:
        return data, data
    # Local: the spawned scale children import this module, and their RSS after imports is a
    # reported baseline; the tokenizer stack stays out of it.
    from slimpack.demo.corpus import build_corpus
    from slimpack.tokenize.job import TokenizeConfig, run_tokenize

    source = scratch / "corpus"
    build_corpus(source)
    out = scratch / "shards"
    report = run_tokenize([str(source)], str(out), TokenizeConfig(), workers=2, progress=False)
    if not report.ok:
        raise RuntimeError(f"tokenizing {source} failed: {report.summary()}")
    return str(out), f"{source} (tokenized with the default config)"


# ----------------------------------------------------------------------------- 1. throughput


def bench_throughput(path: str, *, min_tokens: int = 200_000_000, seq_len: int = 2048,
                     micro_batch_size: int = 8) -> dict[str, Any]:
    index = load_index(path)
    gbt = seq_len * micro_batch_size * 4  # grad_accum 4
    probe = PackedLoader(LoaderConfig(path, seq_len=seq_len, global_batch_tokens=gbt,
                                      micro_batch_size=micro_batch_size), index=index)
    epochs = max(2, -(-min_tokens // (probe.steps_per_epoch * gbt)))
    cfg = LoaderConfig(path, seq_len=seq_len, global_batch_tokens=gbt, micro_batch_size=micro_batch_size,
                       epochs=epochs)
    loader = PackedLoader(cfg, index=index)
    tokens = 0
    t0 = time.perf_counter()
    for step in loader:
        for mb in step:
            tokens += mb["input_ids"].numel()
    packed_s = time.perf_counter() - t0
    store = loader.stream.store

    # Baseline: copy the same tokens out of the (already decoded) shards into int64, no packing.
    samples = [store.sample(int(i))[0] for i in loader.stream.samples]
    copied = 0
    t0 = time.perf_counter()
    while copied < tokens:
        for s in samples:
            out = np.empty(len(s), np.int64)
            out[:] = s
            copied += len(s)
    copy_s = time.perf_counter() - t0

    # Raw zstd decode rate of the stored shards.
    decoded = 0
    t0 = time.perf_counter()
    for i, name in enumerate(index.shard_names):
        decoded += len(decompress(index.shard_layouts[i].compression, (Path(path) / name).read_bytes()))
    decode_s = time.perf_counter() - t0
    decode_bytes_per_s = decoded / decode_s
    return {
        "seq_len": seq_len, "micro_batch_size": micro_batch_size, "epochs": epochs,
        "tokens": tokens, "seconds": packed_s, "packed_tokens_per_s": tokens / packed_s,
        "shard_decodes": store.decodes,
        "baseline_copy_tokens_per_s": copied / copy_s,
        "zstd_decode_bytes_per_s": decode_bytes_per_s,
        # Worst case: each 65,536-token sample needs a whole 64 MiB shard decoded.
        "cold_shard_per_sample_tokens_per_s": decode_bytes_per_s / (64 << 20) * SCALE_SAMPLE_TOKENS,
    }


# ----------------------------------------------------------------------------- 2. scale


def write_synthetic_dataset(root: Path, *, total_tokens: int = SCALE_TOKENS, train_parts: int = 59_166,
                            held_out_parts: int = 500, seed: int = 0) -> dict[str, Any]:
    """Index files of a SlimPajama-size dataset (no shard bytes): one shard per part, as tokenize writes
    for SlimPajama's ~10.6M-token files."""
    rng = np.random.default_rng(seed)
    num_samples = total_tokens // SCALE_SAMPLE_TOKENS
    # Samples are whole documents of at least 65,536 tokens: the target plus an overshoot.
    counts = SCALE_SAMPLE_TOKENS + rng.geometric(1 / 1500, num_samples).astype(np.int64)
    counts = (counts * (total_tokens / counts.sum())).astype(np.int64)
    names = ([f"train/chunk{1 + i % 10}/example_train_{i // 10}" for i in range(train_parts)]
             + [f"validation/chunk{1 + i % 5}/example_holdout_{i // 5}" for i in range(held_out_parts)]
             + [f"test/chunk{1 + i % 5}/example_holdout_{i // 5}" for i in range(held_out_parts)])
    names.sort()
    per_part = np.diff(np.linspace(0, num_samples, len(names) + 1).astype(np.int64))
    shards, parts = [], {}
    config = {"column_encodings": ["ndarray:int32", "ndarray:uint32", "ndarray:uint32"],
              "column_names": ["cu_seqlens", "doc_sources", "tokens"], "column_sizes": [None, None, None],
              "compression": "zstd:3", "format": "mds", "hashes": ["sha1", "xxh3_64"],
              "size_limit": 1 << 26, "version": 2}
    start = 0
    for name, n in zip(names, per_part.tolist(), strict=True):
        raw_bytes = int(counts[start:start + n].sum()) * 4 + 64 * n
        h = f"{start:016x}"
        shards.append({"raw_data": {"basename": f"parts/{name}/shard.00000.mds", "bytes": raw_bytes,
                                    "hashes": {"sha1": h * 2 + h[:8], "xxh3_64": h}},
                       "zip_data": {"basename": f"parts/{name}/shard.00000.mds.zstd", "bytes": raw_bytes // 3,
                                    "hashes": {"sha1": h * 2 + h[:8], "xxh3_64": h}},
                       "samples": n, **config})
        parts[name] = {"split": name.split("/")[0], "samples": n, "documents": n * 30, "shards": 1,
                       "tokens": int(counts[start:start + n].sum())}
        start += n
    manifest = {"schema_version": schema.SCHEMA_VERSION, "fingerprint": f"synthetic-{total_tokens}-{seed}",
                "bos_id": 128000, "eos_id": 128001, "vocab_size": 128256, "samples": int(num_samples),
                "tokens": int(counts.sum()), "shards": len(shards), "parts": parts}
    root.mkdir(parents=True, exist_ok=True)
    (root / schema.INDEX_FILENAME).write_text(json.dumps({"shards": shards, "version": 2}))
    (root / schema.MANIFEST_FILENAME).write_text(json.dumps(manifest))
    np.save(root / schema.SAMPLE_TOKENS_FILENAME, counts)
    return {"samples": int(num_samples), "tokens": int(counts.sum()), "shards": len(shards),
            "index_json_bytes": (root / schema.INDEX_FILENAME).stat().st_size}


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)


def _scale_child(path: str, resume_step: int, trace: bool, queue: Any) -> None:
    """Build the index, plan step 0, resume at ``resume_step`` and plan it: times, or (``trace``) memory.

    tracemalloc slows every Python allocation (JSON parsing makes millions), so the timed run and
    the traced run are separate processes.
    """
    base_rss = _rss_kib()
    peak_rss = [base_rss]
    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.is_set():
            peak_rss[0] = max(peak_rss[0], _rss_kib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    if trace:
        tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    index = load_index(path)
    cfg = LoaderConfig(path, seq_len=2048, global_batch_tokens=4_194_304, micro_batch_size=8,
                       rank=3, world_size=16)
    loader = PackedLoader(cfg, index=index)
    first = loader.stream.shards_for(0)
    build_s, build_cpu = time.perf_counter() - t0, time.process_time() - c0
    build_peak = tracemalloc.get_traced_memory()[1] if trace else 0
    if trace:
        tracemalloc.reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    loader.load_state_dict({**loader.state_dict(), "step": resume_step,
                            "epoch": loader.stream.epoch_of(resume_step)})
    shards = loader.stream.shards_for(loader.step)
    resume_s, resume_cpu = time.perf_counter() - t0, time.process_time() - c0
    resume_peak, held = tracemalloc.get_traced_memory()[::-1] if trace else (0, 0)
    stop.set()
    sampler.join()
    if trace:
        queue.put({"tracemalloc_peak_build_mb": build_peak / 2**20,
                   "tracemalloc_peak_resume_mb": resume_peak / 2**20, "tracemalloc_held_mb": held / 2**20})
        return
    queue.put({"build_seconds": build_s, "resume_seconds": resume_s, "build_cpu_seconds": build_cpu,
               "resume_cpu_seconds": resume_cpu, "resume_step": resume_step,
               "resume_epoch": loader.epoch, "steps_per_epoch": loader.steps_per_epoch,
               "grad_accum": loader.grad_accum, "shards_step0": len(first), "shards_resume_step": len(shards),
               "rss_base_mb": base_rss / 1024, "rss_peak_mb": peak_rss[0] / 1024,
               "rss_peak_minus_base_mb": (peak_rss[0] - base_rss) / 1024})


def _child(path: str, resume_step: int, trace: bool) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_scale_child, args=(path, resume_step, trace, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def bench_scale(scratch: Path, resume_step: int = 200_000, repeat: int = 3) -> dict[str, Any]:
    """``repeat`` timed runs (fresh processes; median and max reported) and one traced run."""
    root = scratch / "synthetic-627B"
    t0 = time.perf_counter()
    written = write_synthetic_dataset(root)
    written["write_seconds"] = time.perf_counter() - t0
    runs = [_child(str(root), resume_step, False) for _ in range(repeat)]
    out: dict[str, Any] = {"dataset": written, "runs": runs, **runs[0]}
    for key in ("build_seconds", "resume_seconds", "build_cpu_seconds", "resume_cpu_seconds",
                "rss_peak_minus_base_mb"):
        values = sorted(r[key] for r in runs)
        out[key] = values[len(values) // 2]
        out[key.replace("seconds", "max_seconds").replace("_mb", "_max_mb")] = values[-1]
    out.update(_child(str(root), resume_step, True))
    return out


# ----------------------------------------------------------------------------- 3. training loop


def _rank_loop(path: str, rank: int, world_size: int, num_workers: int, steps: int, tokens_per_s: float,
               queue: Any) -> None:
    """One simulated rank: a real PackedLoader, and a 'GPU' that sleeps n / tokens_per_s per micro-batch."""
    # A spawned child inherits "spawn" as its default start method; torchrun starts ranks as fresh
    # interpreters, whose default on Linux is fork. Match torchrun so DataLoader workers fork.
    mp.set_start_method("fork", force=True)
    cfg = LoaderConfig(path, seq_len=2048, global_batch_tokens=2048 * 4 * world_size * 2, micro_batch_size=4,
                       rank=rank, world_size=world_size, num_workers=num_workers,
                       max_tokens=2048 * 4 * world_size * 2 * steps)
    loader = PackedLoader(cfg)
    waits, step_tokens = [], []
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        if len(waits) == 1:
            t_steady = t0  # steady state: from the second request on
        try:
            step = next(it)
        except StopIteration:
            break
        waits.append(time.perf_counter() - t0)
        step_tokens.append(0)
        for mb in step:
            n = mb["input_ids"].numel()
            step_tokens[-1] += n
            time.sleep(n / tokens_per_s)  # the "GPU" computing on it
    steady_s = time.perf_counter() - t_steady
    steady, tokens = waits[1:], sum(step_tokens[1:])
    queue.put((rank, {"steps": len(waits), "tokens": sum(step_tokens), "first_batch_wait_s": waits[0],
                      "steady_seconds": steady_s, "steady_tokens_per_s": tokens / steady_s,
                      "steady_compute_fraction": tokens / tokens_per_s / steady_s,
                      "steady_wait_total_s": float(sum(steady)), "steady_wait_max_ms": 1000 * max(steady),
                      "steady_wait_median_ms": 1000 * float(np.median(steady))}))


def bench_training_loop(path: str, *, tokens_per_s: float = 80_000, steps: int = 24, world_size: int = 2,
                        num_workers: int = 2) -> dict[str, Any]:
    """``world_size`` rank processes (spawned, as torchrun would), each with ``num_workers`` workers."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_loop, args=(path, r, world_size, num_workers, steps, tokens_per_s,
                                                  queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    ranks = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
    return {"consumer_tokens_per_s_per_rank": tokens_per_s, "world_size": world_size,
            "num_workers_per_rank": num_workers, "seq_len": 2048, "micro_batch_size": 4,
            "global_batch_tokens": 2048 * 4 * world_size * 2, "ranks": dict(sorted(ranks.items()))}


# ----------------------------------------------------------------------------- cli


def main(args: argparse.Namespace) -> int:
    res: dict[str, Any] = {"load_average_at_start": os.getloadavg(), "cpus": os.cpu_count()}
    print(f"load average {res['load_average_at_start'][0]:.1f} on {res['cpus']} CPUs (other work slows "
          "every figure)")
    with tempfile.TemporaryDirectory(prefix="slimpack-bench-loader-") as tmp:
        scratch = Path(tmp)
        if "throughput" not in args.skip or "train" not in args.skip:
            path, label = _prepare_data(args.data, scratch)
            res["data"] = label
        if "throughput" not in args.skip:
            t = res["throughput"] = bench_throughput(path, min_tokens=args.min_tokens)
            print(f"throughput: {t['packed_tokens_per_s'] / 1e6:.1f}M packed tokens/s in one process "
                  f"({t['tokens']:,} tokens, seq_len {t['seq_len']}, micro-batch {t['micro_batch_size']}, "
                  f"{t['shard_decodes']} shard decodes); baseline copy-only "
                  f"{t['baseline_copy_tokens_per_s'] / 1e6:.1f}M tokens/s; zstd decode "
                  f"{t['zstd_decode_bytes_per_s'] / 2**20:.0f} MiB/s -> worst case (cold 64 MiB shard per "
                  f"sample) {t['cold_shard_per_sample_tokens_per_s'] / 1e6:.2f}M tokens/s")
        if "scale" not in args.skip:
            s = res["scale"] = bench_scale(scratch)
            d = s["dataset"]
            print(f"scale: {d['tokens'] / 1e9:.0f}B tokens, {d['samples']:,} samples, {d['shards']:,} "
                  f"shards, median of {len(s['runs'])} fresh processes: index + step-0 plan in "
                  f"{s['build_seconds']:.2f} s wall, {s['build_cpu_seconds']:.2f} s CPU (max wall "
                  f"{s['build_max_seconds']:.2f}; tracemalloc peak "
                  f"{s['tracemalloc_peak_build_mb']:.0f} MB, RSS peak {s['rss_peak_mb']:.0f} MB = "
                  f"{s['rss_base_mb']:.0f} MB after imports + {s['rss_peak_minus_base_mb']:.0f} MB); "
                  f"resume at step {s['resume_step']:,} (epoch {s['resume_epoch']}) in "
                  f"{s['resume_seconds']:.2f} s wall, {s['resume_cpu_seconds']:.2f} s CPU (max wall "
                  f"{s['resume_max_seconds']:.2f}; "
                  f"tracemalloc peak {s['tracemalloc_peak_resume_mb']:.0f} MB, "
                  f"{s['tracemalloc_held_mb']:.0f} MB held after)")
        if "train" not in args.skip:
            r = res["train"] = bench_training_loop(path, steps=args.sim_steps)
            for rank, v in r["ranks"].items():
                print(f"training loop rank {rank}: {v['steps']} steps at "
                      f"{v['steady_tokens_per_s'] / 1e3:.1f}k tokens/s after the first (consumer "
                      f"{r['consumer_tokens_per_s_per_rank'] / 1e3:.0f}k), first batch "
                      f"{v['first_batch_wait_s']:.2f} s, then data wait total "
                      f"{v['steady_wait_total_s'] * 1e3:.2f} ms, max {v['steady_wait_max_ms']:.2f} ms, "
                      f"median {v['steady_wait_median_ms']:.3f} ms")
    res["load_average_at_end"] = os.getloadavg()
    print(f"load average at the end {res['load_average_at_end'][0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0
