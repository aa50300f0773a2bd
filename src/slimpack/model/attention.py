"""The one attention seam: causal attention inside each packed document, never across documents.

    attention(q, k, v, cu_seqlens, max_seqlen, *, backend="auto") -> (T, H, D)

q (T, H, D), k/v (T, Hkv, D) with H % Hkv == 0 (grouped-query attention: query head h reads KV
head h // (H // Hkv), as in HF Llama's `repeat_kv`); cu_seqlens (k+1,) int32 boundaries [0, ..., T];
max_seqlen a Python int at least the longest document: the kernels size their grids by it, so an
upper bound such as the packed seq_len gives the same result and spares torch.compile a new
specialisation per batch. Scale 1/sqrt(D).

Backends (all must agree; tests/model/test_attention.py and tests/train/test_gpu.py prove it):
- "varlen":     torch.nn.attention.varlen.varlen_attn, PyTorch's built-in FlashAttention-2 (CUDA,
                fp16/bf16). Its keywords changed between releases, so we read its signature:
                2.10 takes `is_causal=True`, 2.11+ `window_size=(-1, 0)`; where the signature
                offers `enable_gqa` (not yet 2.11) GQA runs without copies, else K/V heads are
                repeated (a copy).
- "cudnn":      cuDNN's fused flash attention on the ragged (THD) layout through the cuDNN frontend
                (`cudnn_attention`; pip install 'slimpack[cudnn]'; cuDNN >= 9.6, CUDA, fp16/bf16,
                GQA native).
- "flash_attn": flash_attn.flash_attn_varlen_func (Dao-AILab package, if installed; GQA native).
- "xformers":   xformers memory_efficient_attention with BlockDiagonalCausalMask (if installed;
                GQA through a broadcast 5-D view, no copy). Builds the mask from a host copy of
                cu_seqlens (one device sync per call).
- "sdpa_ref":   pure-PyTorch reference, any device: per-document causal
                F.scaled_dot_product_attention with enable_gqa. Syncs on cu_seqlens; for CPU and tests.
- "auto":       for fp16/bf16 CUDA tensors "cudnn" where the cuDNN frontend is installed (the `cudnn`
                extra: installing it is the opt-in; its kernels ran 1.1-1.45x faster than
                FlashAttention-2's on an H100 and training 5-9% faster end to end, BENCHMARKS.md),
                else "varlen"; "sdpa_ref" otherwise (no fused kernel exists for fp32 or CPU; the
                result is the same function either way).
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from slimpack.model.cudnn_attention import cudnn_varlen_attention

BACKENDS = ("auto", "varlen", "cudnn", "flash_attn", "xformers", "sdpa_ref")
# Whether the cuDNN frontend is installed; looked up once, since "auto" runs under torch.compile.
CUDNN_INSTALLED = importlib.util.find_spec("cudnn") is not None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
              max_seqlen: int, *, backend: str = "auto") -> torch.Tensor:
    """Causal attention within each document of a packed batch; see the module docstring."""
    _check_shapes(q, k, v)
    name = resolve_backend(backend, q)
    return _IMPLS[name](q, k, v, cu_seqlens, max_seqlen)


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The concrete backend `attention` uses for `backend` and tensors like `q`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return "sdpa_ref"
    return "cudnn" if CUDNN_INSTALLED else "varlen"


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"attention wants q (T, H, D) and k, v (T, Hkv, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} disagree: same T and D needed, "
                         "and query heads a multiple of KV heads")


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(T, Hkv, D) -> (T, Hkv * groups, D), head h = kv head h // groups (a copy)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


# ---- sdpa_ref: the reference ---------------------------------------------------------------------


def _check_cu_seqlens(bounds: list[int], total: int) -> None:
    rising = all(a <= b for a, b in itertools.pairwise(bounds))
    if not bounds or bounds[0] != 0 or bounds[-1] != total or not rising:
        raise ValueError(f"cu_seqlens must rise from 0 to T={total} (document boundaries of the packed "
                         f"batch); got {bounds[:8]}{'...' if len(bounds) > 8 else ''} ending at "
                         f"{bounds[-1] if bounds else None}")


def _sdpa_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
              max_seqlen: int) -> torch.Tensor:
    bounds = cu_seqlens.tolist()
    _check_cu_seqlens(bounds, q.shape[0])
    outs = []
    for start, end in itertools.pairwise(bounds):
        if end == start:
            continue
        # (1, H, L, D) views: SDPA attends over L, causal from the document's first token.
        qd, kd, vd = (x[start:end].transpose(0, 1)[None] for x in (q, k, v))
        od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
        outs.append(od[0].transpose(0, 1))  # (L, H, D)
    return torch.cat(outs) if outs else q.new_empty(q.shape)


# ---- varlen: torch.nn.attention.varlen.varlen_attn -------------------------------------------------


def varlen_causal_kwargs(signature: inspect.Signature) -> tuple[dict[str, Any], bool]:
    """Keyword arguments that make `varlen_attn` causal, and whether it accepts `enable_gqa`.

    torch 2.10: `varlen_attn(..., is_causal=False, return_aux=None)`, K/V heads must equal Q heads.
    torch 2.11: `varlen_attn(..., *, return_aux, scale, window_size=(-1, -1))`, where causal is the
    window (-1, 0): unbounded left, nothing to the right; still no GQA.
    later (2.14 here): `window_size` plus `enable_gqa`, so K/V need not be repeated.
    """
    params = signature.parameters
    if "window_size" in params:
        causal: dict[str, Any] = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        raise RuntimeError(f"torch.nn.attention.varlen.varlen_attn{signature} has neither window_size "
                           "nor is_causal; this torch release is not supported, use backend='sdpa_ref' "
                           "or 'flash_attn'")
    return causal, "enable_gqa" in params


def _resolve_varlen() -> tuple[tuple[Callable[..., torch.Tensor], dict[str, Any], bool] | None, str]:
    """(varlen_attn, causal keywords, accepts enable_gqa), or None and why; once, at import, so that
    torch.compile traces a plain global rather than a cached call."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, (f"attention backend 'varlen' needs torch >= 2.10 (torch.nn.attention.varlen); "
                      f"this is torch {torch.__version__}")
    try:
        causal, gqa = varlen_causal_kwargs(inspect.signature(varlen_attn))
    except RuntimeError as e:
        return None, str(e)
    return (varlen_attn, causal, gqa), ""


_VARLEN, _VARLEN_ERROR = _resolve_varlen()


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
            max_seqlen: int) -> torch.Tensor:
    if _VARLEN is None:
        raise RuntimeError(_VARLEN_ERROR)
    fn, causal, _ = _VARLEN
    k, v, gqa = varlen_gqa(k, v, q.shape[1] // k.shape[1])
    return fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **causal, **gqa)


def varlen_gqa(k: torch.Tensor, v: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """K/V and the keywords with which `varlen_attn` serves `groups` query heads per K/V head:
    `enable_gqa` where this torch's varlen_attn takes it, else K/V repeated (torch 2.10, 2.11)."""
    if _VARLEN is None:
        raise RuntimeError(_VARLEN_ERROR)
    if groups == 1:
        return k, v, {}
    if _VARLEN[2]:
        return k, v, {"enable_gqa": True}
    return _repeat_kv(k, groups), _repeat_kv(v, groups), {}


# ---- flash_attn: Dao-AILab flash-attn ----------------------------------------------------------------


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise RuntimeError("attention backend 'flash_attn' needs the flash-attn package "
                           "(pip install flash-attn --no-build-isolation), or use 'varlen'") from e
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)


# ---- xformers: block-diagonal causal memory-efficient attention --------------------------------------


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
              max_seqlen: int) -> torch.Tensor:
    try:
        from xformers.ops import fmha
    except ImportError as e:
        raise RuntimeError("attention backend 'xformers' needs the xformers package "
                           "(pip install xformers), or use 'varlen'") from e
    T, H, D = q.shape
    G = k.shape[1]
    seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(seqlens)
    # GQA as xformers' 5-D (B, M, G, R, D) layout: query head g*R + r reads KV group g (broadcast).
    q5 = q.view(1, T, G, H // G, D)
    k5 = k[None, :, :, None, :].expand(1, T, G, H // G, D)
    v5 = v[None, :, :, None, :].expand(1, T, G, H // G, D)
    return fmha.memory_efficient_attention(q5, k5, v5, attn_bias=bias).reshape(T, H, D)


_IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "sdpa_ref": _sdpa_ref,
    "varlen": _varlen,
    "cudnn": cudnn_varlen_attention,
    "flash_attn": _flash_attn,
    "xformers": _xformers,
}
