"""`slimpack bench train`: training throughput and the GPU correctness checks, in one run.

    slimpack bench train --json OUT.json            # one GPU: ~6 minutes, compile included
    torchrun --nproc-per-node 4 -m slimpack bench train --no-checks --only ours-2k-compile --json OUT.json
    slimpack bench train --quick --json OUT.json    # CPU smoke run: tiny model, seconds

First the correctness checks (`bench.train_checks`), then the timings:
1. attention: the fused backends (varlen, PyTorch's FlashAttention-2, and cudnn where the cuDNN
   frontend is installed) vs the per-document SDPA reference on a packed bf16 batch, forward output
   and the q/k/v gradients, both against an fp32 reference; each fused backend's error must be
   within 2x the bf16 reference path's own error, or within 1% of the largest value.
2. logits: our Transformer vs a Hugging Face LlamaForCausalLM holding the same weights
   (`export.to_hf_state_dict`), two documents packed for us, run one by one for Hugging Face:
   fp32 reference attention (tight) and bf16 with our default fused backend vs bf16 SDPA (each
   against the fp32 logits).
3. throughput, FSDP2 (bf16 params, fp32 reduction, fp32 master weights, `--reshard` cadence, fused
   AdamW, clipping) on every rank of the launch: our `tinyllama-1.3b` with document masking
   (`--attention`, default auto: cudnn where installed, else varlen; the plan adds varlen rows) and
   per-block torch.compile at 2K and 4K, and a Hugging Face LlamaForCausalLM of the same shape (SDPA,
   plain causal over the whole window, no document masking: the usual HF set-up) wrapped by the same
   `parallelize` and optimiser, so only the model implementation differs (one more Hugging Face run
   uses FSDP2's default cadence, `--reshard forward`, for scale). An optimiser step holds
   `--tokens-per-gpu-step` tokens per GPU (default: the paper's 4M-token batch over 16 GPUs, 32
   micro-batches of 4 x 2048), so the optimiser and the once-per-step communication weigh what they
   weigh in the real run. Configurations run in order of importance and none starts after
   `--time-budget-s`; the JSON is rewritten after each. Each runs `--warmup-steps` (the first holds
   the compile: its time is reported apart) then `--timed-steps` steps; tokens/s per GPU is steady
   state over the timed steps, on the slowest rank's clock. Data wait is the time the step spends
   taking its micro-batches from the loader, as a fraction of step time; data stall is the part of
   that wait the GPU sat idle (CUDA events recorded around the take), what the loader really cost.
   A micro-batch that does not fit is halved and retried, and the retry is recorded. `--profile DIR`
   then runs one 2-micro-batch step under torch.profiler per configuration: a Chrome trace, the
   kernel table, and GPU time per kernel family in the JSON.

Data: whole optimiser steps from the real loader, set up as in training (its global batch is the
step, so its feeder keeps whole steps pinned ahead; `--num-workers` processes, 4 like the paper
configs) over the demo corpus (Python's docs and source, tokenized once by rank 0 into a temporary
directory that the host's ranks share, so no shards travel to the GPU machine); `--data synthetic`
packs documents with log-normal lengths (median ~600 tokens) instead.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import gzip
import itertools
import json
import math
import os
import platform
import shutil
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from slimpack import exitcodes
from slimpack.bench import titan
from slimpack.demo.corpus import build_corpus
from slimpack.model.attention import resolve_backend
from slimpack.model.transformer import Transformer, model_config
from slimpack.tokenize.job import TokenizeConfig, run_tokenize
from slimpack.train.config import OptimSection, ParallelSection
from slimpack.train.ledger import PositionLedger, step_segment_counts
from slimpack.train.loop import train_step
from slimpack.train.loss import CHUNK_TOKENS
from slimpack.train.metrics import model_flops_per_token, peak_flops_for
from slimpack.train.optim import build_optimizer
from slimpack.train.parallel import all_reduce_max, all_reduce_sum, begin_micro_batch, init_distributed, parallelize

LLAMA3_EOS = 128_001  # <|end_of_text|>: every tokenized document ends with it

# ----------------------------------------------------------------------------- data


def eos_id_for(vocab_size: int) -> int:
    """The id that ends a document: Llama 3's <|end_of_text|>, or the last id of a smaller vocabulary."""
    return LLAMA3_EOS if vocab_size > LLAMA3_EOS else vocab_size - 1


def synthetic_micro_batches(*, seq_len: int, micro_batch_size: int, vocab_size: int,
                            seed: int = 0) -> Iterator[dict[str, Any]]:
    """Endless packed micro-batches with log-normal document lengths (median 600, sigma 1.2),
    documents cut at window edges the way the loader cuts them, each ending in `eos_id_for`'s id
    (as tokenized documents do: torchtitan's mask finds documents by it)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        T = micro_batch_size * seq_len
        bounds = [0]
        for w in range(micro_batch_size):
            pos, end = w * seq_len, (w + 1) * seq_len
            while pos < end:
                n = int(math.exp(math.log(600) + 1.2 * torch.randn((), generator=g).item()))
                pos = min(end, pos + max(2, n))
                bounds.append(pos)
        cu = torch.tensor(bounds, dtype=torch.int32)
        lengths = cu[1:] - cu[:-1]
        position_ids = torch.arange(T) - torch.repeat_interleave(cu[:-1].long(), lengths.long())
        input_ids = torch.randint(0, vocab_size, (T,), generator=g)
        input_ids[(cu[1:] - 1).long()] = eos_id_for(vocab_size)
        labels = torch.roll(input_ids, -1).clone()
        labels[(cu[1:] - 1).long()] = -100  # no label across a document end
        yield {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "cu_seqlens": cu,
               "max_seqlen": int(lengths.max())}


class _DemoData:
    """The real loader over the demo corpus, tokenized into a temporary directory."""

    def __init__(self, scratch: Path) -> None:
        t0 = time.perf_counter()
        build_corpus(scratch / "corpus")
        # One node of one: under torchrun, RANK/WORLD_SIZE would otherwise split the job over ranks.
        report = run_tokenize([str(scratch / "corpus")], str(scratch / "shards"), TokenizeConfig(),
                              workers=4, node_rank=0, num_nodes=1, progress=False)
        if not report.ok:
            raise RuntimeError(f"tokenizing the demo corpus failed: {report.summary()}")
        self.path = str(scratch / "shards")
        self.tokens = report.tokens
        self.seconds = time.perf_counter() - t0

    def steps(self, *, seq_len: int, micro_batch_size: int, grad_accum: int, rank: int = 0,
              world_size: int = 1, num_workers: int = 0) -> Iterator[list[dict[str, Any]]]:
        """This rank's optimiser steps, configured as in a training run: the loader's global batch
        is the whole step, so its feeder keeps whole steps built and pinned ahead."""
        from slimpack.pipeline import LoaderConfig, PackedLoader

        global_tokens = world_size * grad_accum * micro_batch_size * seq_len
        yield from PackedLoader(LoaderConfig(self.path, seq_len, global_tokens, micro_batch_size, rank=rank,
                                             world_size=world_size, num_workers=num_workers))


def _loader_available() -> bool:
    try:
        from slimpack.pipeline import LoaderConfig, PackedLoader  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- throughput


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


def _build(kind: str, cfg: Any, device: torch.device, mesh: Any, parallel: Any, attention: str,
           compile_mode: str | None) -> Any:
    """Our Transformer or a Hugging Face LlamaForCausalLM of the same shape, both wrapped by
    `parallelize` (compile, FSDP2 units, mixed precision, reshard mode), so only the model differs."""
    torch.manual_seed(0)
    if kind == "ours":
        with torch.device(device):
            model = Transformer(cfg, attention_backend=attention)
        return parallelize(model, mesh, parallel, device, compile_mode=compile_mode)
    from slimpack.bench.train_checks import hf_model  # needs transformers: see run_bench

    model = hf_model(cfg, device, torch.float32)
    model.config.use_cache = False
    return parallelize(model, mesh, parallel, device, blocks=model.model.layers, compile_mode=compile_mode)


def _attention_label(kind: str, attention: str, titan_attention: str, device: torch.device,
                     dtype: torch.dtype) -> str:
    if kind == "ours":
        return resolve_backend(attention, torch.empty(0, device=device, dtype=dtype))
    if kind == "titan":
        return (f"torchtitan {titan.version()}: " + ("flex, block_causal (documents end at EOS)"
                                                      if titan_attention == "flex" else "sdpa, causal over the window"))
    return "sdpa (HF, causal over the window)"


def _hf_step(model: Any, optimizer: torch.optim.Optimizer, micro_batches: list[dict[str, Any]], *,
             device: torch.device, seq_len: int, reshard: str) -> torch.Tensor:
    """The usual Hugging Face step: unpacked causal windows, its own mean loss per micro-batch."""
    total = torch.zeros((), device=device)
    for i, mb in enumerate(micro_batches):
        begin_micro_batch(model, last=i == len(micro_batches) - 1, reshard=reshard)
        ids = mb["input_ids"].to(device, non_blocking=True).view(-1, seq_len)
        loss = model(input_ids=ids, labels=ids).loss / len(micro_batches)
        loss.backward()
        total += loss.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _recorded_event(device: torch.device) -> torch.cuda.Event | None:
    """A timing event recorded on the current stream (None off CUDA). Between one recorded before a
    host-side wait and one after, the GPU's clock runs only for the part of the wait it had nothing
    queued: a busy GPU reaches the first event late and passes straight on to the second."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _max_over_ranks(value: float, device: torch.device) -> float:
    return all_reduce_max(torch.tensor(value, dtype=torch.float64, device=device)).item()


# Kernel families for the profile's breakdown, first match wins (names from cuBLAS/CUTLASS, PyTorch's
# FlashAttention, Inductor's Triton kernels, NCCL and the fused optimiser).
_KERNEL_FAMILIES = (
    ("attention", ("flash", "fmha", "attention")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_")),
    ("nccl", ("nccl",)),
    ("optimizer", ("adam", "multi_tensor", "foreach", "norm_kernel", "lpnorm")),
    ("triton (fused elementwise)", ("triton",)),
    ("copy/cast", ("memcpy", "memset", "copy", "cast", "fill")),
)


def profile_step(step: Any, device: torch.device, out_dir: Path, name: str) -> dict[str, Any]:
    """One step under torch.profiler: a Chrome trace (gzip) and the GPU time per kernel family."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    wall = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"{name}.trace.json"
    prof.export_chrome_trace(str(raw))
    with raw.open("rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    families: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for evt in prof.key_averages():
        us = evt.self_device_time_total
        if us <= 0 or evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        low = evt.key.lower()
        family = next((f for f, keys in _KERNEL_FAMILIES if any(k in low for k in keys)), "other")
        families[family] = families.get(family, 0.0) + us / 1e3
        kernels[evt.key[:120]] = kernels.get(evt.key[:120], 0.0) + us / 1e3
    busy = sum(families.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    (out_dir / f"{name}.kernels.txt").write_text(
        prof.key_averages().table(sort_by="self_device_time_total" if device.type == "cuda"
                                  else "self_cpu_time_total", row_limit=60))
    return {"wall_ms": wall * 1e3, "gpu_busy_ms": busy, "gpu_idle_fraction": 1 - busy / (wall * 1e3),
            "family_ms": dict(sorted(families.items(), key=lambda kv: -kv[1])),
            "top_kernels_ms": dict(top), "trace": f"{raw.name}.gz"}


def run_config(name: str, *, kind: str, cfg: Any, seq_len: int, micro_batch_size: int, compile_blocks: bool,
               data: Any, d: Any, grad_accum: int | None, tokens_per_gpu_step: int, warmup_steps: int,
               timed_steps: int, peak_flops: float | None, reshard: str, attention: str = "auto",
               profile_dir: Path | None = None, compile_mode: str | None = None,
               loss_chunk_tokens: int = CHUNK_TOKENS) -> dict[str, Any]:
    """Build, warm up (compile), time `timed_steps` optimiser steps; per GPU and for the world.
    `compile_mode` (torch.compile's) and `loss_chunk_tokens` (our loss kernel's) are candidates
    measured against their defaults."""
    device = d.device
    parallel = ParallelSection(mixed_precision=device.type == "cuda", compile=compile_blocks, reshard=reshard)
    compute_dtype = torch.bfloat16 if parallel.mixed_precision else torch.float32
    # torchtitan's document masking is flex attention, whose backward has no CPU kernel: causal SDPA there.
    titan_attention = "flex" if device.type == "cuda" else "sdpa"
    attempts: list[dict[str, Any]] = []
    mbs = micro_batch_size
    while mbs >= 1:
        _cleanup(device)
        model = optimizer = batches = step = loss_fn = None
        accum = grad_accum or max(1, tokens_per_gpu_step // (mbs * seq_len))
        data_wait = [0.0]
        ledger, ledger_host = PositionLedger(seq_len), [0.0]  # host time of train/ledger.py's work
        stalls: list[tuple[Any, Any]] = []  # CUDA events recorded just before and after each take
        try:
            if kind == "titan":
                model, loss_fn = titan.build(cfg, device, d.mesh, seq_len=seq_len, compile_blocks=compile_blocks,
                                             mixed_precision=parallel.mixed_precision, attention=titan_attention)
                optimizer = titan.optimizer(model)
            else:
                model, loss_fn = _build(kind, cfg, device, d.mesh, parallel, attention, compile_mode), None
                optimizer = build_optimizer(model, OptimSection(), device)
            n_params = sum(p.numel() for p in model.parameters())
            batches = data(seq_len=seq_len, micro_batch_size=mbs, grad_accum=accum, rank=d.rank,
                           world_size=d.world_size)

            def step(model: Any = model, optimizer: Any = optimizer, batches: Any = batches, loss_fn: Any = loss_fn,
                     accum: int = accum, data_wait: list[float] = data_wait,
                     stalls: list[tuple[Any, Any]] = stalls, ledger: Any = ledger,
                     ledger_host: list[float] = ledger_host) -> torch.Tensor:
                before = _recorded_event(device)
                t = time.perf_counter()
                micro = next(batches)[:accum]
                data_wait[0] += time.perf_counter() - t
                if before is not None:
                    stalls.append((before, _recorded_event(device)))
                if kind == "ours":
                    loss_sum, n_valid, _ = train_step(model, optimizer, micro, device=device,
                                                      world_size=d.world_size, grad_clip_norm=1.0,
                                                      max_seqlen=seq_len if compile_blocks else None,
                                                      reshard=reshard, loss_chunk_tokens=loss_chunk_tokens)
                    # The ledger's work as the loop does it, after the step is queued: count on the
                    # host, then fold a step's (here this rank's) counts into f.
                    t = time.perf_counter()
                    ledger.add_segments(step_segment_counts(micro, seq_len))
                    ledger_host[0] += time.perf_counter() - t
                    return all_reduce_sum(loss_sum) / n_valid  # the global mean token loss
                if kind == "titan":
                    return all_reduce_sum(titan.step(model, optimizer, loss_fn, micro, device=device,
                                                     seq_len=seq_len, eos_id=eos_id_for(cfg.vocab_size),
                                                     attention=titan_attention))
                mean = _hf_step(model, optimizer, micro, device=device, seq_len=seq_len, reshard=reshard)
                return all_reduce_sum(mean) / d.world_size

            _sync(device)
            t0 = time.perf_counter()
            step()  # compile happens here
            _sync(device)
            first = time.perf_counter() - t0
            for _ in range(warmup_steps - 1):
                step()
            _sync(device)
            warm = time.perf_counter() - t0
            data_wait[0] = ledger_host[0] = 0.0
            stalls.clear()
            t0 = time.perf_counter()
            last = None
            for _ in range(timed_steps):
                last = step()
            _sync(device)
            elapsed = _max_over_ranks(time.perf_counter() - t0, device)  # the slowest rank sets the pace
            wait = _max_over_ranks(data_wait[0], device)
            stall = _max_over_ranks(sum(a.elapsed_time(b) for a, b in stalls) / 1e3, device)
            tokens_per_gpu = timed_steps * accum * mbs * seq_len
            tps = tokens_per_gpu / elapsed
            flops_tok = model_flops_per_token(cfg, n_params, seq_len)
            result = {
                "name": name, "kind": kind, "seq_len": seq_len, "micro_batch_size": mbs, "grad_accum": accum,
                "world_size": d.world_size,
                "reshard": reshard if kind != "titan" else "torchtitan's (forward; reduce every micro-batch)",
                "attention": _attention_label(kind, attention, titan_attention, device, compute_dtype),
                "compile": compile_blocks, "compile_mode": compile_mode or "default",
                "loss_chunk_tokens": loss_chunk_tokens if kind == "ours" else None, "params": n_params,
                "warmup_steps": warmup_steps,
                "warmup_seconds": warm, "first_step_seconds": first, "timed_steps": timed_steps,
                "timed_seconds": elapsed, "step_seconds": elapsed / timed_steps,
                # Compile and autotuning: the first step's time beyond a steady step's.
                "compile_seconds_est": max(0.0, first - elapsed / timed_steps),
                "tokens_per_s": tps, "tokens_per_s_all_gpus": tps * d.world_size,
                # MFU is a GPU's figure (its bf16 peak); on a CPU it would be a meaningless fraction.
                # None too on a GPU whose peak is unknown (result["mfu_note"]): never a wrong number.
                "mfu": tps * flops_tok / peak_flops if device.type == "cuda" and peak_flops else None,
                "flops_per_token": flops_tok,
                "data_wait_seconds": wait, "data_wait_fraction": wait / elapsed,
                # Position-frequency ledger: host seconds per step and as a share of step time.
                "ledger_host_seconds_per_step": (_max_over_ranks(ledger_host[0], device) / timed_steps
                                                 if kind == "ours" else None),
                "ledger_fraction": (_max_over_ranks(ledger_host[0], device) / elapsed if kind == "ours"
                                    else None),
                "data_stall_seconds": stall if device.type == "cuda" else None,
                "data_stall_fraction": stall / elapsed if device.type == "cuda" else None,
                "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                                    else None),
                "peak_reserved_gib": (torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda"
                                      else None),
                "last_loss": float(last.item()) if last is not None else None, "oom_retries": attempts,
                "document_masking": kind == "ours" or (kind == "titan" and titan_attention == "flex")}
            if profile_dir is not None:
                # Two micro-batches (one accumulating, one reducing) show both kinds of backward.
                def short_step(step: Any = step) -> torch.Tensor:
                    return step(accum=2)

                if d.rank == 0:
                    result["profile"] = profile_step(short_step, device, profile_dir, f"{name}-w{d.world_size}")
                else:  # the other ranks join its collectives
                    short_step()
            return result
        except torch.OutOfMemoryError as err:
            attempts.append({"micro_batch_size": mbs, "error": str(err).splitlines()[0]})
            print(f"  {name}: micro_batch_size {mbs} ran out of memory; retrying with {mbs // 2}", flush=True)
            mbs //= 2
        finally:
            # Drop every reference (the step closure holds the model too) before freeing memory, so
            # an out-of-memory retry starts from an empty card.
            model = optimizer = batches = step = loss_fn = None
            _cleanup(device)
    return {"name": name, "kind": kind, "seq_len": seq_len, "error": "out of memory at micro_batch_size 1",
            "oom_retries": attempts}


# ----------------------------------------------------------------------------- driver


_QUICK_PLAN = (  # name, kind, seq_len, micro_batch_size, compile, options over the command line's
    ("ours-128", "ours", 128, 2, False, {}),
    ("ours-256", "ours", 256, 1, False, {}),
    ("hf-128-eager", "hf", 128, 2, False, {}),
    ("titan-128-eager", "titan", 128, 2, False, {}),
    ("ours-128-chunk64", "ours", 128, 2, False, {"loss_chunk_tokens": 64}),
)
# In order of importance: when the time budget runs out the rest is skipped (and recorded so).
# torchtitan (the peer: its model, compile, FSDP2 cadence and flex document masking) beside each of ours.
_GPU_PLAN = (
    ("ours-2k-compile", "ours", 2048, 4, True, {}),
    ("titan-2k-compile", "titan", 2048, 4, True, {}),
    ("hf-2k-compile", "hf", 2048, 4, True, {}),
    ("ours-4k-compile", "ours", 4096, 4, True, {}),
    ("titan-4k-compile", "titan", 4096, 4, True, {}),
    ("hf-4k-compile", "hf", 4096, 4, True, {}),
    ("ours-2k-compile-mb8", "ours", 2048, 8, True, {}),
    ("titan-2k-compile-mb8", "titan", 2048, 8, True, {}),
    ("hf-2k-compile-mb8", "hf", 2048, 8, True, {}),
    ("titan-4k-compile-mb8", "titan", 4096, 8, True, {}),
    ("ours-4k-compile-mb8", "ours", 4096, 8, True, {}),
    # Candidates for the last 10% (issue 17), each against ours-2k-compile-mb8 of the same run.
    ("ours-2k-compile-mb8-chunk8k", "ours", 2048, 8, True, {"loss_chunk_tokens": 8192}),
    ("ours-2k-compile-mb8-chunk1k", "ours", 2048, 8, True, {"loss_chunk_tokens": 1024}),
    ("ours-2k-compile-mb8-autotune", "ours", 2048, 8, True, {"compile_mode": "max-autotune-no-cudagraphs"}),
    # Our model on PyTorch's FlashAttention-2, for the attention kernel's share.
    ("ours-2k-compile-mb8-varlen", "ours", 2048, 8, True, {"attention": "varlen"}),
    ("ours-4k-compile-varlen", "ours", 4096, 4, True, {"attention": "varlen"}),
    # Hugging Face under FSDP2's default cadence (reshard after forward, reduce every micro-batch).
    ("hf-2k-compile-fsdp-default", "hf", 2048, 4, True, {"reshard": "forward"}),
    ("hf-2k-eager", "hf", 2048, 4, False, {}),
    ("ours-2k-eager", "ours", 2048, 4, False, {}),
)


def _plan(quick: bool) -> list[dict[str, Any]]:
    return [{"name": n, "kind": k, "seq_len": s, "micro_batch_size": m, "compile_blocks": c, "options": o}
            for n, k, s, m, c, o in (_QUICK_PLAN if quick else _GPU_PLAN)]


def _prepare_data(args: argparse.Namespace, d: Any, scratch: Path, vocab_size: int,
                  result: dict[str, Any]) -> Any:
    """The micro-batch source: the demo corpus through the real loader (tokenized once, by rank 0,
    into `scratch`, which every rank of this host reads), else synthetic documents."""
    source = args.data
    if source == "demo" and not _loader_available():
        print("slimpack.pipeline.PackedLoader is not available; using synthetic documents", flush=True)
        source = "synthetic"
    if source == "demo" and int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size)) != d.world_size:
        raise RuntimeError("bench train --data demo shares rank 0's shards through its local disk, so it "
                           "runs on one host; across nodes use --data synthetic")
    if source == "demo":
        shared: list[Any] = [None]
        if d.rank == 0:
            try:
                shared[0] = _DemoData(scratch)
            except Exception as err:  # e.g. no llama-models tokenizer on the GPU machine
                shared[0] = f"{type(err).__name__}: {err}"
        if d.world_size > 1:
            dist.broadcast_object_list(shared, src=0)
        demo = shared[0]
        if isinstance(demo, _DemoData):
            result["data"] = {"source": f"demo corpus via PackedLoader ({args.num_workers} workers)",
                              "tokens": demo.tokens, "prepare_seconds": demo.seconds}
            return functools.partial(demo.steps, num_workers=args.num_workers)
        print(f"demo data unavailable ({demo}); using synthetic documents", flush=True)
        result["data_error"] = demo
    result["data"] = {"source": "synthetic: log-normal document lengths (median 600, sigma 1.2)"}

    def synthetic(*, seq_len: int, micro_batch_size: int, grad_accum: int, rank: int = 0,
                  world_size: int = 1) -> Iterator[list[dict[str, Any]]]:
        """Built on the training thread, unlike the loader's steps: its data wait is not the loader's."""
        batches = synthetic_micro_batches(seq_len=seq_len, micro_batch_size=micro_batch_size,
                                          vocab_size=vocab_size, seed=rank)
        while True:
            yield list(itertools.islice(batches, grad_accum))
    return synthetic


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    quick = args.quick
    d = init_distributed("cpu" if quick else "auto")
    device = d.device
    if not quick and device.type != "cuda":
        raise RuntimeError("bench train needs a CUDA GPU; use --quick for the CPU smoke run")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 logits check compares true fp32
    cfg = model_config("tiny" if quick else "tinyllama-1.3b")
    # transformers, and the checks that need it, load here rather than with this module: `bench
    # checkpoint` imports this module's harness and runs without the hf extra.
    import transformers

    from slimpack.bench.train_checks import check_attention, check_logits

    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({platform.machine()}, {os.cpu_count()} cores)")
    peak_flops = (args.peak_tflops * 1e12 if args.peak_tflops is not None
                  else peak_flops_for(device_name) if device.type == "cuda" else None)

    result: dict[str, Any] = {
        "command": "slimpack bench train" + (" --quick" if quick else ""),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "device": device_name,
        "world_size": d.world_size, "torch": torch.__version__, "transformers": transformers.__version__,
        "model_preset": "tiny" if quick else "tinyllama-1.3b", "model_params": cfg.num_params(),
        "peak_flops": peak_flops,
        "mfu_note": (None if peak_flops or device.type != "cuda" else
                     f"no bf16 peak known for {device_name!r}: MFU is null; pass --peak-tflops"),
        "reshard": args.reshard, "attention": args.attention,
        "checks": {}, "runs": []}

    # 1-2. correctness first: a fast wrong kernel is not a result.
    # The logits check uses 4 of the 22 layers on GPU: same shapes and code, a few seconds.
    logits_cfg = cfg if quick else replace(cfg, num_layers=4)
    checks = (("attention", lambda: check_attention(device)),
              ("logits_vs_hf", lambda: check_logits(logits_cfg, device)))
    for name, fn in checks if not args.no_checks else ():
        t0 = time.perf_counter()
        try:
            result["checks"][name] = fn()
        except Exception as err:
            result["checks"][name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                                      "traceback": traceback.format_exc()}
        result["checks"][name]["seconds"] = time.perf_counter() - t0
        shown = {k: v for k, v in result["checks"][name].items() if k != "traceback"}
        if d.rank == 0:
            print(f"check {name}: {'ok' if shown['ok'] else 'FAILED'} {json.dumps(shown)}", flush=True)
        _cleanup(device)

    # 3. throughput
    with tempfile.TemporaryDirectory(prefix="slimpack-bench-train-") as tmp:
        data = _prepare_data(args, d, Path(tmp), cfg.vocab_size, result)
        plan = _plan(quick)
        if args.only:
            plan = [p for p in plan if p["name"] in args.only.split(",")]
        titan_missing = titan.unavailable() if any(p["kind"] == "titan" for p in plan) else None
        for item in plan:
            if item["kind"] == "titan" and titan_missing:
                if d.rank == 0:
                    print(f"skip {item['name']}: {titan_missing}", flush=True)
                result["runs"].append({"name": item["name"], "skipped": titan_missing})
                continue
            # Rank 0's clock decides for everyone, so all ranks run the same configurations.
            spent = _max_over_ranks(time.perf_counter() - started, device)
            if spent > args.time_budget_s:
                if d.rank == 0:
                    print(f"skip {item['name']}: {spent:.0f} s spent of the {args.time_budget_s:.0f} s "
                          f"budget", flush=True)
                result["runs"].append({"name": item["name"], "skipped": "time budget"})
                continue
            if d.rank == 0:
                print(f"run {item['name']} ...", flush=True)
            try:
                options = {"reshard": args.reshard, "attention": args.attention, **item["options"]}
                r = run_config(**{k: v for k, v in item.items() if k != "options"}, **options, cfg=cfg,
                               data=data, d=d, grad_accum=args.grad_accum,
                               tokens_per_gpu_step=args.tokens_per_gpu_step, warmup_steps=args.warmup_steps,
                               timed_steps=args.timed_steps, peak_flops=peak_flops,
                               profile_dir=Path(args.profile) if args.profile else None)
            except Exception as err:
                r = {"name": item["name"], "error": f"{type(err).__name__}: {err}",
                     "traceback": traceback.format_exc()}
                print(r["traceback"], flush=True)
            result["runs"].append(r)
            if args.json and d.rank == 0:  # after every configuration: a run killed later leaves its figures
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(result, indent=1))
            if "tokens_per_s" in r and d.rank == 0:
                print(f"  {r['tokens_per_s']:,.0f} tok/s per GPU, MFU {_percent(r['mfu'], 1)}, "
                      f"{r['step_seconds']:.2f} s/step, data wait {100 * r['data_wait_fraction']:.2f}%"
                      f"{_stall_text(r)}, {_ledger_text(r)}"
                      f"first step {r['first_step_seconds']:.1f} s", flush=True)
        if d.world_size > 1:
            dist.barrier()  # rank 0's scratch directory (the demo shards) outlives every reader
    by_name = {r["name"]: r for r in result["runs"] if "tokens_per_s" in r}
    for ours, peer in (("ours-2k-compile", "titan-2k-compile"), ("ours-4k-compile", "titan-4k-compile"),
                       ("ours-2k-compile-mb8", "titan-2k-compile-mb8"),
                       ("ours-4k-compile-mb8", "titan-4k-compile-mb8"), ("ours-128", "titan-128-eager")):
        if ours in by_name and peer in by_name:
            result.setdefault("speedup_vs_titan", {})[f"{ours}/{peer}"] = (
                by_name[ours]["tokens_per_s"] / by_name[peer]["tokens_per_s"])
    for base in ("ours-2k-compile-mb8", "ours-128"):  # each candidate against our default of the same run
        for name in by_name:
            if name.startswith(f"{base}-") and base in by_name:
                result.setdefault("speedup_vs_default", {})[f"{name}/{base}"] = (
                    by_name[name]["tokens_per_s"] / by_name[base]["tokens_per_s"])
    for ours, hf in (("ours-2k-compile", "hf-2k-compile"), ("ours-4k-compile", "hf-4k-compile"),
                     ("ours-2k-compile", "hf-2k-compile-fsdp-default"),
                     ("ours-2k-compile-mb8-varlen", "hf-2k-compile-mb8"), ("ours-4k-compile-varlen", "hf-4k-compile"),
                     ("ours-2k-compile-mb8", "hf-2k-compile-mb8"), ("ours-2k-eager", "hf-2k-eager"),
                     ("ours-128", "hf-128-eager")):
        if ours in by_name and hf in by_name:
            result.setdefault("speedup_vs_hf", {})[f"{ours}/{hf}"] = (
                by_name[ours]["tokens_per_s"] / by_name[hf]["tokens_per_s"])
    result["seconds"] = time.perf_counter() - started
    result["ok"] = all(c.get("ok") for c in result["checks"].values()) and all(
        "error" not in r for r in result["runs"])
    return result


def _percent(fraction: float | None, digits: int = 2) -> str:
    return "-" if fraction is None else f"{100 * fraction:.{digits}f}%"


def _ledger_text(r: dict[str, Any]) -> str:
    if r.get("ledger_host_seconds_per_step") is None:
        return ""
    return (f"ledger {1e3 * r['ledger_host_seconds_per_step']:.2f} ms/step "
            f"({_percent(r['ledger_fraction'])} of step time), ")


def _stall_text(r: dict[str, Any]) -> str:
    return "" if r["data_stall_fraction"] is None else f" (GPU idle {_percent(r['data_stall_fraction'])})"


def table(result: dict[str, Any]) -> str:
    lines = [f"bench train on {result['world_size']} x {result['device']} (torch {result['torch']}, "
             f"transformers {result['transformers']}), {result['model_preset']} ({result['model_params']:,} "
             f"params), reshard={result['reshard']}, data: {result['data']['source']}",
             f"{'config':20s} {'seq':>5s} {'mbs':>3s} {'accum':>5s} {'tok/s/GPU':>10s} {'MFU':>6s} "
             f"{'peak GiB':>8s} {'wait':>6s} {'stall':>6s} {'ledger':>6s} {'1st step s':>10s}"]
    for r in result["runs"]:
        if "skipped" in r:
            lines.append(f"{r['name']:20s} skipped ({r['skipped']})")
            continue
        if "tokens_per_s" not in r:
            lines.append(f"{r['name']:20s} ERROR {r.get('error', '')[:80]}")
            continue
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        lines.append(f"{r['name']:20s} {r['seq_len']:5d} {r['micro_batch_size']:3d} {r['grad_accum']:5d} "
                     f"{r['tokens_per_s']:10,.0f} {_percent(r['mfu'], 1):>6s} {mem:>8s} "
                     f"{100 * r['data_wait_fraction']:5.2f}% {_percent(r['data_stall_fraction']):>6s} "
                     f"{_percent(r.get('ledger_fraction')):>6s} {r['first_step_seconds']:10.1f}")
    for k, v in {**result.get("speedup_vs_titan", {}), **result.get("speedup_vs_hf", {}),
                 **result.get("speedup_vs_default", {})}.items():
        lines.append(f"speed-up {k}: {v:.2f}x")
    checks = ", ".join(f"{k} {'ok' if v.get('ok') else 'FAILED'}" for k, v in result["checks"].items())
    lines.append(f"checks: {checks or 'not run'}; total {result['seconds']:.0f} s")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    defaults = {"data": ("synthetic", "demo"), "warmup_steps": (1, 2), "timed_steps": (2, 3),
                "grad_accum": (2, None)}
    for key, (quick, gpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else gpu)
    result = run_bench(args)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank == 0:  # under torchrun every rank measured; rank 0 reports (times are the slowest rank's)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1))
        print(table(result), flush=True)
    return exitcodes.OK if result["ok"] else exitcodes.FINDINGS  # a failed check or configuration
