"""`slimpack bench niah`: needle-in-a-haystack throughput on the 1.3B shape, checked and timed in one run.

    slimpack bench niah --json niah-bench.json        # one GPU: the sweep 113 s on an H100; all of it > 5.5 min
    slimpack bench niah --quick                        # CPU smoke run of the same code (tiny model)

Random weights (timing only: accuracy means nothing here); haystack: Python's own documentation
text (as `slimpack demo` builds it). In order:

- checks: cached greedy decoding equals full recomputation (fp32, reference attention: tokens
  exactly, logits to 1e-3; and the bf16 fused path's logits within 5% of that), and STRING through
  the fused kernel ("varlen") equals the dense fp32 reference that builds the remapped positions;
- sweep: the paper's protocol (`--protocol paper`: its prompts, up to 128 new tokens), lengths
  256..2048 in 128-token steps (128 leaves no prompt after 128 answer tokens; keyed adds it) x 500
  samples (4 needles, greedy, KV cache), prefill batched per length (chunks of --prefill-tokens)
  and decode batched over all samples of a length; prefill and decode timed apart (tokens/s each).
  Random weights never emit EOS, so every sample decodes all 128 tokens: the worst case of the
  early stop;
- hf: Hugging Face `generate` (greedy, its KV cache, SDPA) on the exported model, --hf-samples per
  length batched left-padded under an attention mask, tokens/s against ours on the same samples;
  its full sweep time is scaled from them;
- string: the sweep with STRING (--string-shift, default training length 2048 / 3; window 128) and
  without, on --string-samples per length: STRING's cost as a ratio of times.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimpack.demo.corpus import iter_corpus
from slimpack.eval.engines import hf_engine
from slimpack.eval.niah import NiahConfig, StringChoice, default_lengths, run_niah, string_label
from slimpack.model.inference import KVCache, decode_step, forward_packed, greedy_generate, prefill, query_rope
from slimpack.model.string_attention import StringConfig, string_attention, string_attention_dense
from slimpack.model.transformer import Transformer, apply_rope, model_config, rope_cos_sin
from slimpack.tokenize.tokenizer import Llama3Tokenizer
from slimpack.train.export import export_hf


def _sync(device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _haystack(encode: Any, tokens: int, protocol: str) -> str | np.ndarray:
    """The demo corpus's documents, joined by a paragraph break, up to `tokens` tokens: text for the
    paper protocol, tokens for keyed."""
    texts, total = [], 0
    for _, _, text in iter_corpus():
        texts.append(text)
        total += len(encode(text))
        if total >= tokens:
            break
    joined = "\n\n".join(texts)
    return joined if protocol == "paper" else np.asarray(encode(joined), dtype=np.int64)


class _TimedGenerate:
    """Our batched greedy generation (`greedy_generate`, EOS stop included) with prefill and decode
    timed apart."""

    def __init__(self, model: Any, *, prefill_tokens: int, eos_ids: tuple[int, ...] = ()) -> None:
        self.model, self.prefill_tokens, self.eos_ids = model, prefill_tokens, eos_ids
        self.device = model.tok_embeddings.weight.device
        self.prefill_s = self.decode_s = 0.0
        self.prefill_tokens_done = self.decode_tokens_done = 0

    def __call__(self, prompts: list[np.ndarray], new: int, string: Any) -> list[list[int]]:
        batch = [torch.as_tensor(p, device=self.device) for p in prompts]
        marks = []

        def prefilled() -> None:
            _sync(self.device)
            marks.append(time.perf_counter())

        _sync(self.device)
        t0 = time.perf_counter()
        out = greedy_generate(self.model, batch, new, eos_ids=self.eos_ids, string=string,
                              chunk_tokens=self.prefill_tokens, after_prefill=prefilled)
        result = out.cpu().tolist()  # the copy syncs
        t2 = time.perf_counter()
        self.prefill_s += marks[0] - t0
        self.decode_s += t2 - marks[0]
        self.prefill_tokens_done += sum(len(p) for p in prompts)
        self.decode_tokens_done += out.numel()
        return result

    def figures(self) -> dict[str, float]:
        return {"prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "prefill_tokens": self.prefill_tokens_done, "decode_tokens": self.decode_tokens_done,
                "prefill_tokens_per_s": self.prefill_tokens_done / max(self.prefill_s, 1e-9),
                "decode_tokens_per_s": self.decode_tokens_done / max(self.decode_s, 1e-9),
                "tokens_per_s": (self.prefill_tokens_done + self.decode_tokens_done)
                / max(self.prefill_s + self.decode_s, 1e-9)}


def _check_cache(model: Any, fp32: Any, device: Any, *, length: int) -> dict[str, Any]:
    """Cached greedy == full recomputation: fp32 exactly (tokens), the model's dtype within 5%."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 32_000, (4, length), generator=g).to(device)
    seq, want_logits = prompts, []
    with torch.no_grad():
        for _ in range(8):
            B, L = seq.shape
            cu = torch.arange(0, B * L + 1, L, dtype=torch.int32, device=device)
            hidden = forward_packed(fp32, seq.reshape(-1), torch.arange(L, device=device).repeat(B), cu, L)
            logits = fp32.output(hidden.view(B, L, -1)[:, -1]).float()
            want_logits.append(logits)
            seq = torch.cat([seq, logits.argmax(-1)[:, None]], dim=1)
    want = seq[:, length:]
    res: dict[str, Any] = {"length": length, "new_tokens": 8}
    for name, m in (("fp32", fp32), ("model_dtype", model)):
        cache = KVCache(m, 4, length + 8)
        logits = prefill(m, prompts, cache)
        errs = []
        for step in range(8):
            errs.append(((logits - want_logits[step]).abs().max() / want_logits[step].abs().max()).item())
            logits = decode_step(m, want[:, step], cache)
        res[name] = {"max_rel_logit_err": max(errs)}
    res["fp32"]["tokens_equal"] = bool(torch.equal(
        torch.as_tensor(_TimedGenerate(fp32, prefill_tokens=1 << 16)(list(prompts.cpu().numpy()), 8, None)),
        want.cpu()))
    res["ok"] = (res["fp32"]["tokens_equal"] and res["fp32"]["max_rel_logit_err"] < 1e-3
                 and res["model_dtype"]["max_rel_logit_err"] < 0.05)
    return res


def _check_string(device: Any, dtype: Any, string: Any, theta: float, *, heads: int, kv_heads: int,
                  head_dim: int, lengths: list[int]) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    T = sum(lengths)
    q = torch.randn(T, heads, head_dim, generator=g).to(device)
    k = torch.randn(T, kv_heads, head_dim, generator=g).to(device)
    v = torch.randn(T, kv_heads, head_dim, generator=g).to(device)
    pos = torch.cat([torch.arange(n) for n in lengths]).to(device)
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=device)
    cos, sin = rope_cos_sin(pos, head_dim, theta)
    qc, qs, qc_s, qs_s = query_rope(pos, head_dim, theta, string)  # carrying STRING's logit scale
    backend = "varlen" if device.type == "cuda" else "sdpa_ref"
    inputs = [x.to(dtype) for x in (apply_rope(q, qc, qs), apply_rope(q, qc_s, qs_s), apply_rope(k, cos, sin), v)]
    got = string_attention(*inputs, cu, max(lengths), string=string, backend=backend).float()
    ref = string_attention(*inputs, cu, max(lengths), string=string, backend="sdpa_ref").float()
    want = string_attention_dense(q, k, v, cu, string=string, rope_theta=theta)
    err = (got - want).abs().max().item()
    # Budget: twice what rounding the inputs to `dtype` costs the exact reference path (as the
    # training backends' GPU tests allow); fp32 on CPU: float precision.
    tol = 1e-4 if dtype == torch.float32 else max(2 * (ref - want).abs().max().item(), 1e-2 * want.abs().max().item())
    return {"backend": backend, "dtype": str(dtype), "lengths": lengths, "max_abs_err": err, "tolerance": tol,
            "ok": err < tol}


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.preset, args.samples, args.hf_samples, args.string_samples = "tiny", 4, 2, 4
        args.lengths = args.lengths or "128,256"
        args.max_new_tokens = args.max_new_tokens or 16
        args.string_window = min(args.string_window, 16)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if device.type != "cuda" and not args.quick:
        raise RuntimeError("slimpack bench niah needs a CUDA GPU (or --quick for the CPU smoke run)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = model_config(args.preset)
    lengths = tuple(int(x) for x in args.lengths.split(",")) if args.lengths else default_lengths(
        2048, protocol=args.protocol, max_new_tokens=args.max_new_tokens or 0)
    string = StringChoice(args.string_shift or None, args.string_ratio, args.string_window)  # per length
    check_string = StringConfig(max(lengths) // 3, args.string_window)  # the fused-vs-dense check's
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the GPU: the 1.3B init on the host takes a while
        fp32 = Transformer(cfg, attention_backend="sdpa_ref").eval()
        model = Transformer(cfg).to(dtype).eval()
    model.load_state_dict(fp32.state_dict())
    res: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                           "torch": torch.__version__, "preset": args.preset, "dtype": str(dtype),
                           "lengths": list(lengths), "samples": args.samples, "protocol": args.protocol,
                           "string": string.describe()}
    print(f"bench niah: {args.preset} on {res['device']} ({dtype}), lengths {lengths[0]}..{lengths[-1]}",
          flush=True)

    t0 = time.perf_counter()
    res["checks"] = {
        "cache": _check_cache(model, fp32, device, length=min(512, max(lengths))),
        "string": _check_string(device, dtype, check_string, cfg.rope_theta, heads=cfg.num_heads,
                                kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                                lengths=[max(lengths), check_string.shift, check_string.shift + 1, 7]),
    }
    res["checks"]["seconds"] = time.perf_counter() - t0
    del fp32
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"checks: cache {res['checks']['cache']['ok']}, string {res['checks']['string']['ok']} "
          f"({res['checks']['seconds']:.1f} s)", flush=True)

    tok = Llama3Tokenizer()
    encode = tok.encoding.encode_ordinary
    haystack = _haystack(encode, 4 * max(lengths), args.protocol)
    eos = (tok.eos_id,)

    def niah_config(samples: int, sweep_lengths: tuple[int, ...] = lengths) -> NiahConfig:
        return NiahConfig(lengths=sweep_lengths, protocol=args.protocol, samples=samples,
                          max_new_tokens=args.max_new_tokens)

    def ours() -> _TimedGenerate:
        return _TimedGenerate(model, prefill_tokens=args.prefill_tokens, eos_ids=eos)

    def sweep(generate: Any, samples: int, *, name: str, string_choice: Any = None) -> dict[str, Any]:
        _sync(device)
        start = time.perf_counter()
        report = run_niah(generate, tok.decode, encode, haystack, niah_config(samples), bos_id=tok.bos_id,
                          eos_ids=eos, model=name, string=string_choice)
        _sync(device)
        seconds = time.perf_counter() - start
        out = {"samples": samples, "seconds": seconds, "prompt_tokens": report.prompt_tokens,
               "generated_tokens": report.generated_tokens,
               "tokens_per_s": (report.prompt_tokens + report.generated_tokens) / seconds}
        if isinstance(generate, _TimedGenerate):
            out.update(generate.figures())
        print(f"{name}: {samples} samples x {len(lengths)} lengths in {seconds:.1f} s "
              f"({out['tokens_per_s']:,.0f} tokens/s)", flush=True)
        return out

    # Warm-up: one small sweep so kernels, allocator and tokenizer caches do not land in the timings.
    run_niah(ours(), tok.decode, encode, haystack, niah_config(2, lengths[-2:]), bos_id=tok.bos_id, eos_ids=eos)
    res["sweep"] = sweep(ours(), args.samples, name="ours")
    res["ours_at_hf_samples"] = sweep(ours(), args.hf_samples, name="ours (hf sample count)")
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model.state_dict(), cfg, Path(tmp) / "hf", dtype=dtype)
        engine = hf_engine(Path(tmp) / "hf", device=device, dtype=dtype, eos_ids=eos, pad_left=True)
        res["hf"] = sweep(engine.generate, args.hf_samples, name="hf generate")
        del engine
    res["hf"]["scaled_sweep_seconds"] = res["hf"]["seconds"] * args.samples / args.hf_samples
    res["speedup_vs_hf"] = res["hf"]["seconds"] / res["ours_at_hf_samples"]["seconds"]
    plain = sweep(ours(), args.string_samples, name="ours without STRING")
    with_string = sweep(ours(), args.string_samples, name="ours with STRING", string_choice=string)
    res["string_cost"] = {"plain": plain, "string": with_string,
                          "time_ratio": with_string["seconds"] / plain["seconds"]}
    res["ok"] = res["checks"]["cache"]["ok"] and res["checks"]["string"]["ok"]
    return res


def _summary(res: dict[str, Any]) -> str:
    s, hf = res["sweep"], res["hf"]
    return "\n".join([
        f"niah bench on {res['device']} ({res['preset']}, {res['dtype']}, {res['protocol']} protocol): checks "
        f"{'pass' if res['ok'] else 'FAIL'}",
        f"  sweep {res['samples']} samples x {len(res['lengths'])} lengths: {s['seconds']:.1f} s; prefill "
        f"{s['prefill_tokens_per_s']:,.0f} tok/s, decode {s['decode_tokens_per_s']:,.0f} tok/s",
        f"  HF generate at {hf['samples']} samples: {hf['tokens_per_s']:,.0f} tok/s vs ours "
        f"{res['ours_at_hf_samples']['tokens_per_s']:,.0f} ({res['speedup_vs_hf']:.2f}x); HF's full sweep "
        f"~{hf['scaled_sweep_seconds']:.0f} s (scaled)",
        f"  {string_label(res['string'], before='')} costs "
        f"{res['string_cost']['time_ratio']:.2f}x the time of the plain sweep",
    ])


def main(args: argparse.Namespace) -> int:
    res = run_bench(args)
    print(_summary(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
        print(f"figures: {args.json}", file=sys.stdout)
    return 0 if res["ok"] else 1
