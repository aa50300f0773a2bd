"""`slimpack bench model`: GPU figures for the model side, each with its baseline in the same run.

- loss:      chunked `cross_entropy_sum` (chunks of 1024, --chunk-tokens, 4096 tokens) vs plain
             `F.cross_entropy((h @ W.T).float())`, forward + backward, time and peak memory above
             the inputs (T tokens, the 128K vocabulary).
- attention: the seam's fused backends ("varlen", FlashAttention-2; "cudnn" where the cuDNN
             frontend is installed) vs "sdpa_ref" (per-document SDPA loop) on a packed batch with
             realistic document lengths, forward + backward, achieved TFLOP/s counting only the
             causal in-document work; timed over calls queued back to back as in training (also
             reported: one call from an idle GPU, which counts the host's launch overhead).
- step:      one forward + chunked loss + backward of a bf16 model (default tinyllama-1.3b,
             one GPU, no FSDP, no optimiser) on packed micro-batches, tokens/s and MFU by DESIGN.md's
             `6 (N - N_embedding) + 12 layers heads head_dim seq_len` FLOPs per token over 989 TFLOP/s;
             baseline: Hugging Face LlamaForCausalLM (SDPA, eager, same weights, same token count,
             unpacked causal sequences with its own loss). Eager, or with `--compile` each decoder
             layer of both models under torch.compile (compile time excluded: warm-up steps).
Writes a JSON report with `--json`. Needs CUDA.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import random
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from slimpack.model.attention import CUDNN_INSTALLED, attention
from slimpack.model.transformer import Transformer, model_config
from slimpack.train.export import export_hf
from slimpack.train.loss import cross_entropy_sum

H100_BF16_FLOPS = 989e12


def _timed_ms(fn: Callable[[], object], *, warmup: int = 3, iters: int = 10, queued: bool = False) -> float:
    """Median wall time of fn in ms, measured with CUDA events around each call from an idle GPU;
    `queued`: the mean over `iters` calls queued back to back, so the host's launch overhead hides
    behind GPU work as it does in training (small kernels with Python around them)."""
    for _ in range(warmup):
        fn()
    if queued:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak_gb(fn: Callable[[], object]) -> float:
    """Peak CUDA memory fn allocates above what was allocated before it, in GB."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def synthetic_cu_seqlens(micro_batch_size: int, seq_len: int, *, mean_doc_tokens: int,
                         seed: int) -> list[int]:
    """Document boundaries of `micro_batch_size` windows of `seq_len` tokens, documents of geometric
    length (mean `mean_doc_tokens`) cut at window edges, as the packed loader produces them."""
    rng = random.Random(seed)
    bounds = [0]
    for w in range(micro_batch_size):
        end = (w + 1) * seq_len
        while bounds[-1] < end:
            length = max(1, int(rng.expovariate(1 / mean_doc_tokens)))
            bounds.append(min(bounds[-1] + length, end))
    return bounds


def bench_loss(*, tokens: int, hidden: int, vocab: int, chunk_sizes: tuple[int, ...]) -> dict[str, Any]:
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, hidden, device="cuda") * 0.02).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device="cuda")

    def plain() -> None:
        F.cross_entropy((h @ w.T).float(), labels, reduction="sum").backward()
        h.grad = w.grad = None

    out: dict[str, Any] = {"tokens": tokens, "hidden": hidden, "vocab": vocab,
                           "fp32_logits_gb": tokens * vocab * 4 / 1e9,
                           "plain": {"fwd_bwd_ms": _timed_ms(plain), "peak_gb_above_inputs": _peak_gb(plain)}}
    for n in chunk_sizes:
        def chunked(n: int = n) -> None:
            cross_entropy_sum(h, w, labels, chunk_tokens=n).backward()
            h.grad = w.grad = None

        out[f"chunked_{n}"] = {"fwd_bwd_ms": _timed_ms(chunked), "peak_gb_above_inputs": _peak_gb(chunked)}
    return out


def bench_attention(*, micro_batch_size: int, seq_len: int, heads: int, kv_heads: int, head_dim: int,
                    mean_doc_tokens: int) -> dict[str, Any]:
    bounds = synthetic_cu_seqlens(micro_batch_size, seq_len, mean_doc_tokens=mean_doc_tokens, seed=0)
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    T = bounds[-1]
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    torch.manual_seed(0)
    q, k, v = (torch.randn(T, h, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(T, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    # Causal in-document work: QK^T and PV over L(L+1)/2 pairs per head; backward = 2.5 x forward.
    fwd_flops = 4 * heads * head_dim * sum(n * (n + 1) // 2 for n in lengths)
    out: dict[str, Any] = {"tokens": T, "documents": len(lengths), "max_doc_tokens": max(lengths),
                           "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}
    out["backends"] = ["varlen", *(["cudnn"] if CUDNN_INSTALLED else []), "sdpa_ref"]
    for backend in out["backends"]:
        def step(backend: str = backend) -> None:
            attention(q, k, v, cu, max(lengths), backend=backend).backward(grad)
            q.grad = k.grad = v.grad = None

        ms = _timed_ms(step, iters=20, queued=True)
        out[backend] = {"fwd_bwd_ms": ms, "tflops": 3.5 * fwd_flops / (ms / 1e3) / 1e12,
                        "fwd_bwd_ms_from_idle": _timed_ms(step)}
    return out


def bench_step(*, preset: str, micro_batch_size: int, seq_len: int, mean_doc_tokens: int,
               chunk_tokens: int, hf_baseline: bool, compile_blocks: bool) -> dict[str, Any]:
    cfg = model_config(preset)
    T = micro_batch_size * seq_len
    bounds = synthetic_cu_seqlens(micro_batch_size, seq_len, mean_doc_tokens=mean_doc_tokens, seed=0)
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (T,), device="cuda")
    labels = torch.roll(ids, -1)
    pos = torch.cat([torch.arange(n, device="cuda") for n in lengths])
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    labels[cu[1:] - 1] = -100  # no target across a document end
    with torch.device("cuda"):
        model = Transformer(cfg).to(torch.bfloat16)
    if compile_blocks:  # the same treatment for both models: torch.compile each decoder layer
        for block in model.layers:
            block.compile()
    mode = "compiled" if compile_blocks else "eager"
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * (n_params - cfg.vocab_size * cfg.hidden_size) + (
        12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len)

    def ours() -> None:
        h = model(ids, pos, cu, max(lengths))
        cross_entropy_sum(h, model.output.weight, labels, chunk_tokens=chunk_tokens).backward()
        model.zero_grad(set_to_none=True)

    def report(ms: float, peak: float) -> dict[str, float]:
        tps = T / (ms / 1e3)
        return {"step_ms": ms, "tokens_per_s": tps, "mfu": tps * flops_per_token / H100_BF16_FLOPS,
                "peak_gb": peak}

    out: dict[str, Any] = {"preset": preset, "params": n_params, "micro_batch_size": micro_batch_size,
                           "seq_len": seq_len, "documents": len(lengths), "flops_per_token": flops_per_token,
                           "gpu": torch.cuda.get_device_name()}
    out[f"ours_{mode}_varlen"] = report(_timed_ms(ours, iters=5), _peak_gb(ours))
    if hf_baseline:
        import transformers  # the hf extra: only for this baseline (--no-hf runs without it)

        with tempfile.TemporaryDirectory() as tmp:
            export_hf(model.state_dict(), cfg, tmp)
            del model
            gc.collect()
            torch.cuda.empty_cache()
            hf = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16,
                                                               attn_implementation="sdpa").cuda()
        if compile_blocks:
            for layer in hf.model.layers:
                layer.compile()
        ids2, labels2 = ids.view(micro_batch_size, seq_len), ids.view(micro_batch_size, seq_len)

        def theirs() -> None:
            hf(input_ids=ids2, labels=labels2, use_cache=False).loss.backward()
            hf.zero_grad(set_to_none=True)

        out[f"hf_sdpa_{mode}_unpacked"] = report(_timed_ms(theirs, iters=5), _peak_gb(theirs))
    return out


def main(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise RuntimeError("slimpack bench model needs a CUDA GPU; run it on a GPU machine")
    cfg = model_config(args.preset)
    parts = args.only or ["loss", "attention", "step"]
    res: dict[str, Any] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    T = args.micro_batch_size * args.seq_len
    if "loss" in parts:
        sizes = tuple(sorted({1024, args.chunk_tokens, 4096}))
        r = res["loss"] = bench_loss(tokens=T, hidden=cfg.hidden_size, vocab=cfg.vocab_size,
                                     chunk_sizes=sizes)
        for name in ("plain", *(f"chunked_{n}" for n in sizes)):
            print(f"loss T={T} V={cfg.vocab_size} {name}: {r[name]['fwd_bwd_ms']:.1f} ms, "
                  f"{r[name]['peak_gb_above_inputs']:.2f} GB peak above inputs")
    if "attention" in parts:
        r = res["attention"] = bench_attention(
            micro_batch_size=args.micro_batch_size, seq_len=args.seq_len, heads=cfg.num_heads,
            kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, mean_doc_tokens=args.mean_doc_tokens)
        print(f"attention T={r['tokens']} docs={r['documents']}: " + " | ".join(
            f"{b} {r[b]['fwd_bwd_ms']:.2f} ms ({r[b]['tflops']:.0f} TFLOP/s; from idle "
            f"{r[b]['fwd_bwd_ms_from_idle']:.2f})" for b in r["backends"]))
    if "step" in parts:
        r = res["step"] = bench_step(preset=args.preset, micro_batch_size=args.micro_batch_size,
                                     seq_len=args.seq_len, mean_doc_tokens=args.mean_doc_tokens,
                                     chunk_tokens=args.chunk_tokens, hf_baseline=not args.no_hf,
                                     compile_blocks=args.compile)
        mode = "compiled" if args.compile else "eager"
        for name in (f"ours_{mode}_varlen", f"hf_sdpa_{mode}_unpacked"):
            if name in r:
                s = r[name]
                print(f"step {name}: {s['tokens_per_s']:,.0f} tok/s, MFU {s['mfu']:.1%}, "
                      f"peak {s['peak_gb']:.1f} GB")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0
