"""`slimpack bench train`: one-GPU training throughput and the GPU correctness checks, in one run.

    slimpack bench train --json OUT.json            # GPU: ~6 minutes on one H100, compile included
    slimpack bench train --quick --json OUT.json    # CPU smoke run: tiny model, seconds

First the correctness checks, then the timings:
1. attention: varlen (FlashAttention-2 through PyTorch) vs the per-document SDPA reference on a packed
   bf16 batch, forward output and the q/k/v gradients, both against an fp32 reference; varlen's error
   must be within 2x the bf16 reference path's own error, or within 1% of the largest value.
2. logits: our Transformer vs a Hugging Face LlamaForCausalLM holding the same weights
   (`export.to_hf_state_dict`), two documents packed for us, run one by one for Hugging Face:
   fp32 reference attention (tight) and bf16 varlen vs bf16 SDPA (each against the fp32 logits).
3. throughput, one process, FSDP2 (bf16 params, fp32 reduction, fp32 master weights, fused AdamW):
   our `tinyllama-1.3b` with varlen document masking and per-block torch.compile at 2K and 4K (and
   eager at 2K), and a
   Hugging Face LlamaForCausalLM of the same shape (SDPA, plain causal over the whole window, no
   document masking: the usual HF set-up) eager and compiled, wrapped by the same FSDP2 policy and
   optimiser, so only the model implementation differs. Configurations run in order of importance
   (ours and HF compiled at 2K, then 4K, then the eager ones) and none starts after
   `--time-budget-s`; the JSON is rewritten after each. Each configuration runs `--warmup-steps`
   (compile happens here; reported separately) then `--timed-steps` optimiser steps of
   `--grad-accum` micro-batches; tokens/s is steady-state over the timed steps only. A micro-batch
   that does not fit is halved and retried, and the retry is recorded.

Data: packed micro-batches from the real loader over the demo corpus (Python's docs and source,
tokenized here into a temporary directory, so no shards travel to the GPU machine); `--data
synthetic` packs documents with log-normal lengths (median ~600 tokens) instead.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from slimpack.train.metrics import H100_BF16_PEAK_FLOPS, model_flops_per_token

# ----------------------------------------------------------------------------- data


def synthetic_micro_batches(*, seq_len: int, micro_batch_size: int, vocab_size: int,
                            seed: int = 0) -> Iterator[dict[str, Any]]:
    """Endless packed micro-batches with log-normal document lengths (median 600, sigma 1.2),
    documents cut at window edges the way the loader cuts them."""
    import torch

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
        labels = torch.roll(input_ids, -1).clone()
        labels[(cu[1:] - 1).long()] = -100  # no label across a document end
        yield {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "cu_seqlens": cu,
               "max_seqlen": int(lengths.max())}


class _DemoData:
    """The real loader over the demo corpus, tokenized into a temporary directory."""

    def __init__(self, scratch: Path) -> None:
        from slimpack.demo import build_corpus
        from slimpack.tokenize.job import TokenizeConfig, run_tokenize

        t0 = time.perf_counter()
        build_corpus(scratch / "corpus")
        report = run_tokenize([str(scratch / "corpus")], str(scratch / "shards"), TokenizeConfig(),
                              workers=4, progress=False)
        if not report.ok:
            raise RuntimeError(f"tokenizing the demo corpus failed: {report.summary()}")
        self.path = str(scratch / "shards")
        self.tokens = report.tokens
        self.seconds = time.perf_counter() - t0

    def micro_batches(self, *, seq_len: int, micro_batch_size: int) -> Iterator[dict[str, Any]]:
        from slimpack.pipeline import LoaderConfig, PackedLoader

        loader = PackedLoader(LoaderConfig(self.path, seq_len, micro_batch_size * seq_len, micro_batch_size))
        for step in loader:
            yield from step


def _loader_available() -> bool:
    try:
        from slimpack.pipeline import LoaderConfig, PackedLoader  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- correctness


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.float() - ref.float()).abs().max().item()


def _dense_causal_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cu_seqlens: torch.Tensor) -> torch.Tensor:
    """fp32 attention with an explicit block-diagonal causal mask over the whole packed batch."""
    import torch

    T, H, D = q.shape
    doc = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=q.device),
                                  (cu_seqlens[1:] - cu_seqlens[:-1]).long())
    pos = torch.arange(T, device=q.device)
    mask = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])  # (T, T) allowed
    groups = H // k.shape[1]
    qf, kf, vf = q.float(), k.float().repeat_interleave(groups, 1), v.float().repeat_interleave(groups, 1)
    scores = torch.einsum("thd,shd->hts", qf, kf) / math.sqrt(D)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), vf)


def check_attention(device: torch.device) -> dict[str, Any]:
    """Fast path vs reference on a packed batch, forward and backward."""
    import torch

    from slimpack.train.attention import attention

    g = torch.Generator().manual_seed(0)
    lengths = [1, 7, 300, 1024, 513, 2] if device.type == "cuda" else [1, 7, 60, 33, 2]
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    T, H, Hkv, D = sum(lengths), 32, 4, 64
    # CPU (--quick) walks the same path in bf16 with the reference as its "fast" backend.
    fast = "varlen" if device.type == "cuda" else "sdpa_ref"
    dtype = torch.bfloat16
    base = [torch.randn(T, h, D, generator=g).to(device) for h in (H, Hkv, Hkv)]
    grad_out = torch.randn(T, H, D, generator=g).to(device)

    def run(backend: str | None, dt: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
        q, k, v = (x.detach().to(dt).clone().requires_grad_() for x in base)  # fresh leaves every run
        if backend is None:
            out = _dense_causal_reference(q, k, v, cu)
        else:
            out = attention(q, k, v, cu, max(lengths), backend=backend)
        out.backward(grad_out.to(out.dtype))
        return out.detach(), [x.grad for x in (q, k, v)]

    ref_out, ref_grads = run(None, torch.float64 if device.type == "cpu" else torch.float32)
    refs = {"out": ref_out, "dq": ref_grads[0], "dk": ref_grads[1], "dv": ref_grads[2]}
    result: dict[str, Any] = {"lengths": lengths, "heads": H, "kv_heads": Hkv, "head_dim": D,
                              "dtype": str(dtype), "backends": {},
                              "ref_abs_max": {k: v.abs().max().item() for k, v in refs.items()}}
    for backend in dict.fromkeys([fast, "sdpa_ref"]):
        out, grads = run(backend, dtype)
        got = {"out": out, "dq": grads[0], "dk": grads[1], "dv": grads[2]}
        result["backends"][backend] = {f"{k}_max_err": _err(got[k], refs[k]) for k in refs}
    ours, ref = result["backends"][fast], result["backends"]["sdpa_ref"]
    # Pass: within 2x the reference path's own error in the same dtype, or within the dtype's
    # resolution of the largest value (bf16 keeps ~3 significant digits: 1% of the max).
    rel = 1e-2 if dtype == torch.bfloat16 else 1e-5
    result["fast_backend"] = fast
    result["ok"] = all(ours[f"{k}_max_err"] <= max(2 * ref[f"{k}_max_err"], rel * result["ref_abs_max"][k])
                       for k in refs)
    return result


def _hf_model(cfg: Any, device: torch.device, dtype: torch.dtype, attn: str = "sdpa") -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slimpack.train.export import hf_config

    config = LlamaConfig.from_dict(hf_config(cfg, dtype=dtype))
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)


def check_logits(cfg: Any, device: torch.device) -> dict[str, Any]:
    """Our logits on two packed documents vs HF LlamaForCausalLM on each document alone."""
    import torch

    from slimpack.train.export import to_hf_state_dict
    from slimpack.train.model import Transformer

    torch.manual_seed(0)
    with torch.device(device):
        ours = Transformer(cfg, attention_backend="sdpa_ref").float()
    hf = _hf_model(cfg, device, torch.float32)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=False)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"HF state dict mismatch: missing {missing}, unexpected {unexpected}")
    ours.eval()
    hf.eval()
    lengths = [300, 212] if device.type == "cuda" else [40, 24]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (sum(lengths),), generator=g).to(device)
    cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32, device=device)
    pos = torch.cat([torch.arange(n) for n in lengths]).to(device)

    def hf_logits(model: Any) -> torch.Tensor:
        docs = ((0, lengths[0]), (lengths[0], sum(lengths)))
        return torch.cat([model(input_ids=ids[a:b][None]).logits[0] for a, b in docs])

    result: dict[str, Any] = {"lengths": lengths}
    with torch.no_grad():
        ref_ours = ours.logits(ids, pos, cu, max(lengths))
        ref_hf = hf_logits(hf)
        fp32_err = _err(ref_ours, ref_hf)
        scale = ref_hf.abs().max().item()
        result["fp32"] = {"max_abs_err": fp32_err, "logit_abs_max": scale}
        ok = fp32_err <= 1e-3 * max(1.0, scale)
        # bf16 with the fast backend (varlen on CUDA; on CPU the same path with the reference).
        fast = "varlen" if device.type == "cuda" else "sdpa_ref"
        ours_bf = ours.to(torch.bfloat16)
        for layer in ours_bf.layers:
            layer.attention.backend = fast
        hf_bf = hf.to(torch.bfloat16)
        bf_ours = _err(ours_bf.logits(ids, pos, cu, max(lengths)), ref_hf)
        bf_hf = _err(hf_logits(hf_bf), ref_hf)
        result["bf16"] = {f"ours_{fast}_vs_fp32": bf_ours, "hf_sdpa_vs_fp32": bf_hf}
        ok = ok and bf_ours <= max(2 * bf_hf, 1e-2 * scale)
    result["ok"] = ok
    del ours, hf
    return result


# ----------------------------------------------------------------------------- throughput


def _cleanup(device: torch.device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


def _build(kind: str, cfg: Any, device: torch.device, mesh: Any, *, compile_blocks: bool,
           mixed_precision: bool) -> Any:
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from slimpack.train.config import ParallelSection
    from slimpack.train.model import Transformer
    from slimpack.train.parallel import parallelize

    torch.manual_seed(0)
    if kind == "ours":
        with torch.device(device):
            model = Transformer(cfg)
        parallel = ParallelSection(mixed_precision=mixed_precision, compile=compile_blocks)
        return parallelize(model, mesh, parallel, device)
    # The same FSDP2 policy around HF's decoder layers, so only the model implementation differs.
    model = _hf_model(cfg, device, torch.float32)
    model.config.use_cache = False
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if mixed_precision and device.type == "cuda" else MixedPrecisionPolicy())
    layers = model.model.layers
    for i, layer in enumerate(layers):
        if compile_blocks:
            layer.compile()
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def _hf_step(model: Any, optimizer: torch.optim.Optimizer, micro_batches: list[dict[str, Any]], *,
             device: torch.device, seq_len: int) -> torch.Tensor:
    import torch

    total = torch.zeros((), device=device)
    for mb in micro_batches:
        ids = mb["input_ids"].to(device, non_blocking=True).view(-1, seq_len)
        loss = model(input_ids=ids, labels=ids).loss / len(micro_batches)
        loss.backward()
        total += loss.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(name: str, *, kind: str, cfg: Any, seq_len: int, micro_batch_size: int, compile_blocks: bool,
               data: Any, device: torch.device, mesh: Any, grad_accum: int, warmup_steps: int,
               timed_steps: int, peak_flops: float) -> dict[str, Any]:
    import torch

    from slimpack.train.config import OptimSection
    from slimpack.train.loop import train_step
    from slimpack.train.optim import build_optimizer

    mixed = device.type == "cuda"
    attempts: list[dict[str, Any]] = []
    mbs = micro_batch_size
    while mbs >= 1:
        _cleanup(device)
        model = optimizer = batches = step = None
        try:
            model = _build(kind, cfg, device, mesh, compile_blocks=compile_blocks, mixed_precision=mixed)
            n_params = sum(p.numel() for p in model.parameters())
            optimizer = build_optimizer(model, OptimSection(), device)
            batches = data(seq_len=seq_len, micro_batch_size=mbs)

            def step(model: Any = model, optimizer: Any = optimizer, batches: Any = batches) -> torch.Tensor:
                micro = [next(batches) for _ in range(grad_accum)]
                if kind == "ours":
                    loss_sum, n_valid, _ = train_step(model, optimizer, micro, device=device, world_size=1,
                                                      grad_clip_norm=1.0,
                                                      max_seqlen=seq_len if compile_blocks else None)
                    return loss_sum / n_valid
                return _hf_step(model, optimizer, micro, device=device, seq_len=seq_len)

            _sync(device)
            t0 = time.perf_counter()
            for _ in range(warmup_steps):
                step()
            _sync(device)
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            last = None
            for _ in range(timed_steps):
                last = step()
            _sync(device)
            elapsed = time.perf_counter() - t0
            tokens = timed_steps * grad_accum * mbs * seq_len
            tps = tokens / elapsed
            flops_tok = model_flops_per_token(cfg, n_params, seq_len)
            result = {
                "name": name, "kind": kind, "seq_len": seq_len, "micro_batch_size": mbs,
                "grad_accum": grad_accum,
                "compile": compile_blocks, "params": n_params, "warmup_steps": warmup_steps,
                "warmup_seconds": warm, "timed_steps": timed_steps, "timed_seconds": elapsed,
                "tokens_per_s": tps, "mfu": tps * flops_tok / peak_flops, "flops_per_token": flops_tok,
                "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                                    else None),
                "peak_reserved_gib": (torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda"
                                      else None),
                "last_loss": float(last.item()) if last is not None else None, "oom_retries": attempts,
                "document_masking": kind == "ours"}
            return result
        except torch.OutOfMemoryError as err:
            attempts.append({"micro_batch_size": mbs, "error": str(err).splitlines()[0]})
            print(f"  {name}: micro_batch_size {mbs} ran out of memory; retrying with {mbs // 2}", flush=True)
            mbs //= 2
        finally:
            # Drop every reference (the step closure holds the model too) before freeing memory, so
            # an out-of-memory retry starts from an empty card.
            model = optimizer = batches = step = None
            _cleanup(device)
    return {"name": name, "kind": kind, "seq_len": seq_len, "error": "out of memory at micro_batch_size 1",
            "oom_retries": attempts}


# ----------------------------------------------------------------------------- driver


_QUICK_PLAN = (  # name, kind, seq_len, micro_batch_size, compile
    ("ours-128", "ours", 128, 2, False),
    ("ours-256", "ours", 256, 1, False),
    ("hf-128-eager", "hf", 128, 2, False),
)
# In order of importance: when the time budget runs out the rest is skipped (and recorded so).
_GPU_PLAN = (
    ("ours-2k-compile", "ours", 2048, 4, True),
    ("hf-2k-compile", "hf", 2048, 4, True),
    ("ours-4k-compile", "ours", 4096, 2, True),
    ("hf-4k-compile", "hf", 4096, 2, True),
    ("hf-2k-eager", "hf", 2048, 4, False),
    ("ours-2k-eager", "ours", 2048, 4, False),
)


def _plan(quick: bool) -> list[dict[str, Any]]:
    return [{"name": n, "kind": k, "seq_len": s, "micro_batch_size": m, "compile_blocks": c}
            for n, k, s, m, c in (_QUICK_PLAN if quick else _GPU_PLAN)]


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from slimpack.train.model import model_config
    from slimpack.train.parallel import init_distributed

    started = time.perf_counter()
    quick = args.quick
    d = init_distributed("cpu" if quick else "auto")
    device = d.device
    if not quick and device.type != "cuda":
        raise RuntimeError("bench train needs a CUDA GPU; use --quick for the CPU smoke run")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 logits check compares true fp32
    cfg = model_config("tiny" if quick else "tinyllama-1.3b")
    import transformers

    result: dict[str, Any] = {
        "command": "slimpack bench train" + (" --quick" if quick else ""),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"),
        "torch": torch.__version__, "transformers": transformers.__version__, "model_preset":
        "tiny" if quick else "tinyllama-1.3b", "model_params": cfg.num_params(),
        "peak_flops": args.peak_tflops * 1e12, "checks": {}, "runs": []}

    # 1-2. correctness first: a fast wrong kernel is not a result.
    # The logits check uses 4 of the 22 layers on GPU: same shapes and code, a few seconds.
    logits_cfg = cfg if quick else replace(cfg, num_layers=4)
    for name, fn in (("attention", lambda: check_attention(device)),
                     ("logits_vs_hf", lambda: check_logits(logits_cfg, device))):
        t0 = time.perf_counter()
        try:
            result["checks"][name] = fn()
        except Exception as err:
            result["checks"][name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                                      "traceback": traceback.format_exc()}
        result["checks"][name]["seconds"] = time.perf_counter() - t0
        shown = {k: v for k, v in result["checks"][name].items() if k != "traceback"}
        print(f"check {name}: {'ok' if shown['ok'] else 'FAILED'} {json.dumps(shown)}", flush=True)
        _cleanup(device)

    # 3. throughput
    with tempfile.TemporaryDirectory(prefix="slimpack-bench-train-") as tmp:
        source = args.data
        if source == "demo" and not _loader_available():
            print("slimpack.pipeline.PackedLoader is not available; using synthetic documents", flush=True)
            source = "synthetic"
        data = None
        if source == "demo":
            try:
                demo = _DemoData(Path(tmp))
                result["data"] = {"source": "demo corpus via PackedLoader", "tokens": demo.tokens,
                                  "prepare_seconds": demo.seconds}
                data = demo.micro_batches
            except Exception as err:  # e.g. no llama-models tokenizer on the GPU machine
                print(f"demo data unavailable ({type(err).__name__}: {err}); using synthetic documents",
                      flush=True)
                result["data_error"] = f"{type(err).__name__}: {err}"
        if data is None:
            result["data"] = {"source": "synthetic: log-normal document lengths (median 600, sigma 1.2)"}

            def data(*, seq_len: int, micro_batch_size: int) -> Iterator[dict[str, Any]]:
                return synthetic_micro_batches(seq_len=seq_len, micro_batch_size=micro_batch_size,
                                               vocab_size=cfg.vocab_size)
        plan = _plan(quick)
        if args.only:
            plan = [p for p in plan if p["name"] in args.only.split(",")]
        for item in plan:
            spent = time.perf_counter() - started
            if spent > args.time_budget_s:
                print(f"skip {item['name']}: {spent:.0f} s spent of the {args.time_budget_s:.0f} s budget",
                      flush=True)
                result["runs"].append({"name": item["name"], "skipped": "time budget"})
                continue
            print(f"run {item['name']} ...", flush=True)
            try:
                r = run_config(**item, cfg=cfg, data=data, device=device, mesh=d.mesh,
                               grad_accum=args.grad_accum, warmup_steps=args.warmup_steps,
                               timed_steps=args.timed_steps, peak_flops=args.peak_tflops * 1e12)
            except Exception as err:
                r = {"name": item["name"], "error": f"{type(err).__name__}: {err}",
                     "traceback": traceback.format_exc()}
                print(r["traceback"], flush=True)
            result["runs"].append(r)
            if args.json:  # after every configuration: a run killed later still leaves its figures
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(result, indent=1))
            if "tokens_per_s" in r:
                print(f"  {r['tokens_per_s']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%, "
                      f"warm-up {r['warmup_seconds']:.1f} s", flush=True)
    by_name = {r["name"]: r for r in result["runs"] if "tokens_per_s" in r}
    for ours, hf in (("ours-2k-compile", "hf-2k-compile"), ("ours-4k-compile", "hf-4k-compile"),
                     ("ours-128", "hf-128-eager")):
        if ours in by_name and hf in by_name:
            result.setdefault("speedup_vs_hf", {})[f"{ours}/{hf}"] = (
                by_name[ours]["tokens_per_s"] / by_name[hf]["tokens_per_s"])
    result["seconds"] = time.perf_counter() - started
    result["ok"] = all(c.get("ok") for c in result["checks"].values()) and all(
        "error" not in r for r in result["runs"])
    return result


def table(result: dict[str, Any]) -> str:
    lines = [f"bench train on {result['device']} (torch {result['torch']}, transformers "
             f"{result['transformers']}), {result['model_preset']} ({result['model_params']:,} params), "
             f"data: {result['data']['source']}",
             f"{'config':18s} {'seq':>5s} {'mbs':>3s} {'tok/s':>10s} {'MFU':>6s} {'peak GiB':>8s} "
             f"{'warm-up s':>9s}"]
    for r in result["runs"]:
        if "skipped" in r:
            lines.append(f"{r['name']:18s} skipped ({r['skipped']})")
            continue
        if "tokens_per_s" not in r:
            lines.append(f"{r['name']:18s} ERROR {r.get('error', '')[:80]}")
            continue
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        lines.append(f"{r['name']:18s} {r['seq_len']:5d} {r['micro_batch_size']:3d} "
                     f"{r['tokens_per_s']:10,.0f} "
                     f"{100 * r['mfu']:5.1f}% {mem:>8s} {r['warmup_seconds']:9.1f}")
    for k, v in result.get("speedup_vs_hf", {}).items():
        lines.append(f"speed-up {k}: {v:.2f}x")
    checks = ", ".join(f"{k} {'ok' if v.get('ok') else 'FAILED'}" for k, v in result["checks"].items())
    lines.append(f"checks: {checks}; total {result['seconds']:.0f} s")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="one-GPU training throughput (ours vs Hugging Face) and "
                                     "GPU correctness checks")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, a few steps")
    p.add_argument("--data", choices=("demo", "synthetic"), default=None,
                   help="packed batches from the demo corpus through the real loader (GPU default) or "
                        "synthetic documents (--quick default)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps (compile happens here)")
    p.add_argument("--timed-steps", type=int, default=None, help="timed optimiser steps per configuration")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimiser step")
    p.add_argument("--only", help="comma-separated configuration names to run")
    p.add_argument("--time-budget-s", type=float, default=330,
                   help="start no configuration after this many seconds (default 330: the whole run then "
                        "ends within ~6 minutes on an H100)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK_FLOPS / 1e12,
                   help="dense bf16 peak for MFU (989 for H100/H200 SXM)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    defaults = {"data": ("synthetic", "demo"), "warmup_steps": (1, 3), "timed_steps": (2, 10),
                "grad_accum": (1, 2)}
    for key, (quick, gpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else gpu)
    result = run_bench(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    print(table(result), flush=True)
    return 0 if result["ok"] else 1
