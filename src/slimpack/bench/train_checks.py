"""`slimpack bench train`'s correctness checks, run before its timings (see `bench.train`).

1. attention (`check_attention`): the fused backends vs the per-document SDPA reference on a packed
   bf16 batch, forward output and the q/k/v gradients, both against an fp32 reference.
2. logits (`check_logits`): our Transformer vs a Hugging Face LlamaForCausalLM holding the same
   weights, fp32 (tight) and bf16 (each against the fp32 logits).

`hf_model` builds the Hugging Face model of a config; the throughput harness times it too.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from slimpack.model.attention import CUDNN_INSTALLED, attention, resolve_backend
from slimpack.model.transformer import Transformer
from slimpack.train.export import hf_config, to_hf_state_dict


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.float() - ref.float()).abs().max().item()


def _dense_causal_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cu_seqlens: torch.Tensor) -> torch.Tensor:
    """fp32 attention with an explicit block-diagonal causal mask over the whole packed batch."""
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
    g = torch.Generator().manual_seed(0)
    lengths = [1, 7, 300, 1024, 513, 2] if device.type == "cuda" else [1, 7, 60, 33, 2]
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    T, H, Hkv, D = sum(lengths), 32, 4, 64
    # CPU (--quick) walks the same path in bf16 with the reference as its "fast" backend.
    fast = ["varlen", *(["cudnn"] if CUDNN_INSTALLED else [])] if device.type == "cuda" else ["sdpa_ref"]
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
    for backend in dict.fromkeys([*fast, "sdpa_ref"]):
        out, grads = run(backend, dtype)
        got = {"out": out, "dq": grads[0], "dk": grads[1], "dv": grads[2]}
        result["backends"][backend] = {f"{k}_max_err": _err(got[k], refs[k]) for k in refs}
    ref = result["backends"]["sdpa_ref"]
    # Pass: within 2x the reference path's own error in the same dtype, or within the dtype's
    # resolution of the largest value (bf16 keeps ~3 significant digits: 1% of the max).
    rel = 1e-2 if dtype == torch.bfloat16 else 1e-5
    result["fast_backends"] = fast
    result["ok"] = all(result["backends"][b][f"{k}_max_err"] <= max(2 * ref[f"{k}_max_err"],
                                                                    rel * result["ref_abs_max"][k])
                       for b in fast for k in refs)
    return result


def hf_model(cfg: Any, device: torch.device, dtype: torch.dtype, attn: str = "sdpa") -> Any:
    config = LlamaConfig.from_dict(hf_config(cfg, dtype=dtype))
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)


def check_logits(cfg: Any, device: torch.device) -> dict[str, Any]:
    """Our logits on two packed documents vs HF LlamaForCausalLM on each document alone."""
    torch.manual_seed(0)
    with torch.device(device):
        ours = Transformer(cfg, attention_backend="sdpa_ref").float()
    hf = hf_model(cfg, device, torch.float32)
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
        # bf16 with the default backend (a fused kernel on CUDA; on CPU the reference).
        fast = resolve_backend("auto", torch.empty(0, device=device, dtype=torch.bfloat16))
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
