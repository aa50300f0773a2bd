"""Document-masked causal attention through cuDNN's fused flash attention on the ragged layout.

    cudnn_varlen_attention(q, k, v, cu_seqlens, max_seqlen) -> out (T, H, D)

The contract of `attention`'s backends: q (T, H, D), k/v (T, Hkv, D) bf16/fp16 CUDA, cu_seqlens
(n+1,) int32 rising 0..T (empty documents allowed), max_seqlen at least the longest document;
causal inside each document, scale 1/sqrt(D). Grouped-query attention runs natively (no repeated
K/V). Needs the cuDNN frontend (pip install nvidia-cudnn-frontend==1.16.0) and cuDNN >= 9.6, which
torch's CUDA wheels carry.

Layout. cuDNN sees each tensor as dims [b, h, s, d]: b documents, s = max_seqlen. The packed storage
(token t, head i at element t*h*D + i*D) is strides [s*h*D, D, h*D, 1] plus a ragged offset per
document, (b+1, 1, 1, 1) int64 in elements (document j starts at cu[j]*h*D); seq_len (b, 1, 1, 1)
int32 and the padding mask bound each document. The softmax statistics kept for backward are
ragged too, (T, H) fp32. Lengths and offsets are computed on the device: no host sync.

Graphs. A cuDNN graph has fixed dims, so the document count is padded up to a multiple of
`BUCKET` with empty trailing documents and max_seqlen rounded up to a power of two (an upper bound
gives the same result); a few graphs per (heads, head dim, T) serve every batch. They are built on
first use and cached per device.

The forward and backward are torch.library custom ops, so torch.compile traces them as opaque
calls (fake implementations give the shapes).
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

BUCKET = 64
_FIX = "pip install nvidia-cudnn-frontend==1.16.0"
_MIN_CUDNN = 90600  # ragged offsets in int64, GQA backward

_cudnn: Any = None
_handles: dict[int, int] = {}
_graphs: dict[tuple, tuple[Any, dict[str, Any], int]] = {}


def _lib() -> Any:
    """The cuDNN frontend, imported on first use (this module imports without it)."""
    global _cudnn
    if _cudnn is None:
        try:  # load torch's libcudnn by path, wherever its wheel lives, before the frontend looks
            import nvidia.cudnn

            for root in nvidia.cudnn.__path__:
                for lib in Path(root, "lib").glob("libcudnn.so.9"):
                    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        except (ImportError, OSError):
            pass  # the frontend then searches by itself
        try:
            import cudnn
        except ImportError as e:
            raise RuntimeError(f"attention backend 'cudnn' needs the cuDNN frontend ({_FIX}), "
                               "or use 'varlen'") from e
        if cudnn.backend_version() < _MIN_CUDNN:
            raise RuntimeError(f"attention backend 'cudnn' needs cuDNN >= 9.6, this process loaded "
                               f"{cudnn.backend_version()}; use 'varlen'")
        _cudnn = cudnn
    return _cudnn


def _handle(device: torch.device) -> int:
    """This device's cuDNN handle, bound to torch's current stream."""
    cudnn = _lib()
    if device.index not in _handles:
        with torch.cuda.device(device):
            _handles[device.index] = cudnn.create_handle()
    cudnn.set_stream(handle=_handles[device.index], stream=torch.cuda.current_stream(device).cuda_stream)
    return _handles[device.index]


def _bucket(n: Any) -> Any:
    return (n + BUCKET - 1) // BUCKET * BUCKET  # also for symbolic sizes (fake implementations)


def doc_meta(cu_seqlens: torch.Tensor, b: int, heads: int, kv_heads: int,
             head_dim: int) -> tuple[torch.Tensor, ...]:
    """Per-document lengths (b, 1, 1, 1) int32 and ragged offsets (b+1, 1, 1, 1) int64, in elements,
    of q/o, k/v and the (T, H) stats; padded to `b` documents with empty ones at offset T."""
    lengths = F.pad((cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int32), (0, b - cu_seqlens.numel() + 1))
    starts = F.pad(torch.cumsum(lengths, 0, dtype=torch.int64), (1, 0))
    return tuple(x.view(-1, 1, 1, 1) for x in (lengths, starts * (heads * head_dim),
                                                starts * (kv_heads * head_dim), starts * heads))


def _graph(backward: bool, b: int, H: int, Hkv: int, D: int, S: int, T: int, dtype: torch.dtype,
           device: torch.device) -> tuple[Any, dict[str, Any], int]:
    """The forward or backward graph for these dims (built once): (graph, its tensors by name,
    workspace bytes)."""
    key = (backward, b, H, Hkv, D, S, T, dtype, device.index)
    if key in _graphs:
        return _graphs[key]
    cudnn = _lib()
    dt = cudnn.data_type
    io = dt.BFLOAT16 if dtype == torch.bfloat16 else dt.HALF
    g = cudnn.pygraph(io_data_type=io, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT,
                      handle=_handle(device))
    t: dict[str, Any] = {}
    # One graph tensor per role (q and kv lengths; q, o, k, v and stats offsets), bound at execution
    # to the shared buffers of `_execute`.
    for name in ("seq_q", "seq_kv"):
        t[name] = g.tensor(name=name, dim=[b, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dt.INT32)
    for name in ("off_q", "off_o", "off_k", "off_v", "off_stats"):
        t[name] = g.tensor(name=name, dim=[b + 1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dt.INT64)

    def packed(h: int) -> dict[str, Any]:  # (T, h, D) storage seen as [b, h, S, D]
        return {"dim": [b, h, S, D], "stride": [S * h * D, D, h * D, 1]}

    def tensor(name: str, h: int, offset: str) -> Any:
        t[name] = g.tensor(name=name, data_type=io, ragged_offset=t[offset], **packed(h))
        return t[name]

    def output(name: str, x: Any, h: int, offset: str) -> None:
        x.set_output(True).set_dim(packed(h)["dim"]).set_stride(packed(h)["stride"])
        x.set_ragged_offset(t[offset])
        t[name] = x

    def stats_layout(x: Any) -> Any:  # (T, H) fp32 storage seen as [b, H, S, 1]
        x.set_data_type(dt.FLOAT).set_dim([b, H, S, 1]).set_stride([H * S, 1, H, 1])
        x.set_ragged_offset(t["off_stats"])
        t["stats"] = x
        return x

    # Causal from each document's first token: no key right of the diagonal, aligned top-left.
    mask = {"attn_scale": 1.0 / math.sqrt(D), "use_padding_mask": True, "seq_len_q": t["seq_q"],
            "seq_len_kv": t["seq_kv"], "diagonal_alignment": cudnn.diagonal_alignment.TOP_LEFT,
            "diagonal_band_right_bound": 0}
    q, k, v = tensor("q", H, "off_q"), tensor("k", Hkv, "off_k"), tensor("v", Hkv, "off_v")
    if not backward:
        o, stats = g.sdpa(name="fwd", q=q, k=k, v=v, generate_stats=True, **mask)
        output("o", o, H, "off_o")
        stats_layout(stats).set_output(True)
    else:
        o, do = tensor("o", H, "off_o"), tensor("do", H, "off_o")
        stats = stats_layout(g.tensor(name="stats", dim=[b, H, S, 1], stride=[H * S, 1, H, 1],
                                      data_type=dt.FLOAT))
        # max_total_seq_len_*: size the fp32 dQ accumulator and the GQA dK/dV buffers by the T
        # packed tokens (rounded up to a tile) instead of b * S.
        tiles = -(-T // 128) * 128
        dq, dk, dv = g.sdpa_backward(name="bwd", q=q, k=k, v=v, o=o, dO=do, stats=stats,
                                     max_total_seq_len_q=tiles, max_total_seq_len_kv=tiles, **mask)
        output("dq", dq, H, "off_q")
        output("dk", dk, Hkv, "off_k")
        output("dv", dv, Hkv, "off_v")
    try:
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
    except Exception as e:  # e.g. a GPU or cuDNN build without this fused kernel
        raise RuntimeError(
            f"cuDNN cannot build its ragged attention {'backward' if backward else 'forward'} for "
            f"{torch.cuda.get_device_name(device)} (documents {b}, heads {H}/{Hkv}, head dim {D}, "
            f"max_seqlen {S}): {e}; use --set model.attention_backend=varlen (or uninstall "
            "nvidia-cudnn-frontend so that auto picks it)") from e
    _graphs[key] = (g, t, g.get_workspace_size())
    return _graphs[key]


def _execute(backward: bool, buffers: dict[str, torch.Tensor], cu_seqlens: torch.Tensor,
             max_seqlen: int) -> None:
    q, k = buffers["q"], buffers["k"]
    (T, H, D), Hkv = q.shape, k.shape[1]
    b = _bucket(cu_seqlens.numel() - 1)
    S = 1 << max(6, (max_seqlen - 1).bit_length())  # a power of two: eager max_seqlen varies per batch
    g, tensors, workspace_bytes = _graph(backward, b, H, Hkv, D, S, T, q.dtype, q.device)
    seq, off_q, off_kv, off_stats = doc_meta(cu_seqlens, b, H, Hkv, D)
    buffers = {**buffers, "seq_q": seq, "seq_kv": seq, "off_q": off_q, "off_o": off_q, "off_k": off_kv,
               "off_v": off_kv, "off_stats": off_stats}
    workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=q.device)
    with torch.cuda.device(q.device):
        g.execute({tensors[name]: x for name, x in buffers.items()}, workspace, handle=_handle(q.device))


@torch.library.custom_op("slimpack::cudnn_varlen_fwd", mutates_args=())
def cudnn_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    stats = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    _execute(False, {"q": q, "k": k, "v": v, "o": out, "stats": stats}, cu_seqlens, max_seqlen)
    return out, stats


@cudnn_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("slimpack::cudnn_varlen_bwd", mutates_args=())
def cudnn_varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     stats: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, out, dout = (x.contiguous() for x in (q, k, v, out, dout))  # dO is often an expand
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _execute(True, {"q": q, "k": k, "v": v, "o": out, "do": dout, "stats": stats, "dq": dq, "dk": dk,
                    "dv": dv}, cu_seqlens, max_seqlen)
    return dq, dk, dv


@cudnn_varlen_bwd.register_fake
def _(dout, q, k, v, out, stats, cu_seqlens, max_seqlen):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, cu_seqlens, max_seqlen = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens)
    ctx.max_seqlen = max_seqlen


def _backward(ctx: Any, dout: torch.Tensor, _dstats: torch.Tensor) -> tuple:
    dq, dk, dv = cudnn_varlen_bwd(dout, *ctx.saved_tensors, ctx.max_seqlen)
    return dq, dk, dv, None, None


cudnn_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)


def cudnn_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           max_seqlen: int) -> torch.Tensor:
    """Causal attention within each document of a packed batch; see the module docstring."""
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"attention backend 'cudnn' wants fp16/bf16 CUDA tensors, got {q.dtype} on "
                         f"{q.device}; use 'sdpa_ref' there")
    return cudnn_varlen_fwd(q, k, v, cu_seqlens, int(max_seqlen))[0]
