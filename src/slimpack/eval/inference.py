"""Inference on slimpack's own `Transformer`: packed forward with STRING, batched greedy decoding with a
KV cache. Reuses the model's weights and rotary functions; `train/model.py` stays the training model.

    hidden = forward_packed(model, input_ids, position_ids, cu_seqlens, max_seqlen, string=None)
    tokens = greedy_generate(model, prompts (B, L), max_new_tokens, string=None)

`forward_packed` is `Transformer.forward` with an optional STRING (`train/string_attention.py`):
evaluations that score whole sequences (loss by position) call it instead of `model(...)` to run
with STRING. `greedy_generate` prefills equal-length prompts as packed documents through the fused
attention seam (a chunk of samples at a time, so activations stay bounded), keeps each layer's
rotated keys and values in a `KVCache` of shape (B, L + new, Hkv, Dh), then decodes one token per
step for the whole batch against the cache. Equal-length prompts need no padding: the needle eval
builds every sample of a length to exactly that many tokens.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from slimpack.train.attention import attention
from slimpack.train.model import Transformer, apply_rope, rope_cos_sin
from slimpack.train.string_attention import StringConfig, string_attention


def _varlen_takes_seqused() -> bool:
    """Whether this torch's varlen_attn reads a padded cache in place (`seqused_k`, `enable_gqa`): later
    releases; torch 2.11 has neither (adapt by signature, not version)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    params = inspect.signature(varlen_attn).parameters
    return "seqused_k" in params and "enable_gqa" in params


_VARLEN_SEQUSED = _varlen_takes_seqused()


class KVCache:
    """Per-layer rotated keys and values (B, capacity, Hkv, Dh), filled to `length` positions."""

    def __init__(self, model: Transformer, batch: int, capacity: int) -> None:
        cfg = model.cfg
        like = model.tok_embeddings.weight
        shape = (batch, capacity, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.empty(shape, dtype=like.dtype, device=like.device) for _ in range(cfg.num_layers)]
        self.v = [torch.empty(shape, dtype=like.dtype, device=like.device) for _ in range(cfg.num_layers)]
        self.capacity = capacity
        self.length = 0


def _qkv(attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unrotated q (..., H, Dh), k and v (..., Hkv, Dh) of one attention layer for inputs x (..., D)."""
    lead = x.shape[:-1]
    q = attn.wq(x).view(*lead, attn.num_heads, attn.head_dim)
    k = attn.wk(x).view(*lead, attn.num_kv_heads, attn.head_dim)
    v = attn.wv(x).view(*lead, attn.num_kv_heads, attn.head_dim)
    return q, k, v


def forward_packed(model: Transformer, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   cu_seqlens: torch.Tensor, max_seqlen: int, *, string: StringConfig | None = None,
                   kv_out: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """Final-normed hidden states (T, D) of flat packed inputs, as `model(...)` returns them, with
    STRING when given. `kv_out`, if a list, receives each layer's rotated (k, v) (T, Hkv, Dh)."""
    cfg = model.cfg
    cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta)  # (T, 1, Dh)
    if string is not None:  # the shifted queries' rotation: position i - S + W
        cos_s, sin_s = rope_cos_sin(position_ids - string.shift + string.window, cfg.head_dim, cfg.rope_theta)
    h = model.tok_embeddings(input_ids)  # (T, D)
    for layer in model.layers:
        attn = layer.attention
        q, k, v = _qkv(attn, layer.attention_norm(h))  # (T, H, Dh), (T, Hkv, Dh) x 2
        q_rot, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if string is None:
            out = attention(q_rot, k, v, cu_seqlens, max_seqlen, backend=attn.backend)
        else:
            out = string_attention(q_rot, apply_rope(q, cos_s, sin_s), k, v, cu_seqlens, max_seqlen,
                                   string=string, backend=attn.backend)
        if kv_out is not None:
            kv_out.append((k, v))
        h = h + attn.wo(out.reshape(out.shape[0], -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.norm(h)


@torch.no_grad()
def prefill(model: Transformer, prompts: torch.Tensor, cache: KVCache, *, string: StringConfig | None = None,
            chunk_tokens: int = 65_536) -> torch.Tensor:
    """Run prompts (B, L) into an empty cache; returns the last position's logits (B, V) in fp32.

    Samples go through in chunks of about `chunk_tokens` tokens, each a packed batch of B_chunk
    documents of length L (cu_seqlens 0, L, 2L, ...), so the fused kernels do the attention.
    """
    if cache.length:
        raise ValueError("prefill needs an empty KVCache")
    B, L = prompts.shape
    if cache.capacity < L:
        raise ValueError(f"prompt length {L} exceeds the cache capacity {cache.capacity}")
    per_chunk = max(1, chunk_tokens // L)
    last = []
    for b0 in range(0, B, per_chunk):
        ids = prompts[b0:b0 + per_chunk]
        n = ids.shape[0]
        positions = torch.arange(L, device=ids.device).repeat(n)
        cu = torch.arange(0, n * L + 1, L, dtype=torch.int32, device=ids.device)
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        hidden = forward_packed(model, ids.reshape(-1), positions, cu, L, string=string, kv_out=kv)
        for layer, (k, v) in enumerate(kv):
            cache.k[layer][b0:b0 + n, :L] = k.view(n, L, *k.shape[1:])
            cache.v[layer][b0:b0 + n, :L] = v.view(n, L, *v.shape[1:])
        last.append(model.output(hidden.view(n, L, -1)[:, -1]).float())
    cache.length = L
    return torch.cat(last)


def _decode_varlen(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, used: int) -> torch.Tensor:
    """FlashAttention over the cache in place: sample b is query segment b (one row) against key
    segment b, the cache's rows b * capacity ... of which `used` count (seqused_k); no copy."""
    B, cap = k_cache.shape[:2]
    cu_q = torch.arange(B + 1, dtype=torch.int32, device=q.device)
    cu_k = torch.arange(0, B * cap + 1, cap, dtype=torch.int32, device=q.device)
    seqused = torch.full((B,), used, dtype=torch.int32, device=q.device)
    k, v = k_cache.view(B * cap, *k_cache.shape[2:]), v_cache.view(B * cap, *v_cache.shape[2:])
    if _VARLEN_SEQUSED:
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu_q, cu_k, 1, cap, seqused_k=seqused, enable_gqa=q.shape[1] != k.shape[1])
    # torch 2.10/2.11: varlen_attn has no seqused_k; the FlashAttention-2 op beneath it has, and serves
    # grouped K/V heads natively. One query per segment, so no causal mask is needed.
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, 1, cap, 0.0, False, False,
                                                   seqused_k=seqused)[0]


def _decode_attention(q: torch.Tensor, q_shift: torch.Tensor | None, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, position: int, string: StringConfig | None) -> torch.Tensor:
    """One query per sample, q (B, H, Dh), against the cache (B, capacity, Hkv, Dh) filled up to
    `position` inclusive; returns (B, H, Dh). fp16/bf16 on CUDA without STRING: FlashAttention in
    place (`_decode_varlen`); otherwise SDPA or, with STRING, exact math on the filled part.

    STRING: a key at distance d = position - j scores with q (rotated at `position`) when d < S, else
    with q_shift (rotated at position - S + W), the same P[i, j] as the packed path.
    """
    k, v = k_cache[:, :position + 1], v_cache[:, :position + 1]
    B, H, Dh = q.shape
    Hkv = k.shape[2]
    if string is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _decode_varlen(q, k_cache, v_cache, position + 1)
    if string is None:
        out = F.scaled_dot_product_attention(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2),
                                             enable_gqa=True)  # (B, H, 1, Dh): the cache holds no future
        return out[:, :, 0]
    qg = q.float().view(B, Hkv, H // Hkv, Dh)
    scores = torch.einsum("bhgd,bthd->bhgt", qg, k.float())
    scores_shift = torch.einsum("bhgd,bthd->bhgt", q_shift.float().view(B, Hkv, H // Hkv, Dh), k.float())
    distance = position - torch.arange(k.shape[1], device=k.device)
    scores = torch.where(distance < string.shift, scores, scores_shift) / Dh**0.5
    out = torch.einsum("bhgt,bthd->bhgd", scores.softmax(-1), v.float())
    return out.reshape(B, H, Dh).to(q.dtype)


@torch.no_grad()
def decode_step(model: Transformer, tokens: torch.Tensor, cache: KVCache, *,
                string: StringConfig | None = None) -> torch.Tensor:
    """Append one token per sample (B,) at position cache.length; returns its logits (B, V) in fp32."""
    p = cache.length
    if p >= cache.capacity:
        raise ValueError(f"KVCache full ({cache.capacity} positions)")
    cfg = model.cfg
    position = torch.tensor([p], device=tokens.device)
    cos, sin = rope_cos_sin(position, cfg.head_dim, cfg.rope_theta)  # (1, 1, Dh), broadcasts over B
    if string is not None:
        cos_s, sin_s = rope_cos_sin(position - string.shift + string.window, cfg.head_dim, cfg.rope_theta)
    h = model.tok_embeddings(tokens)  # (B, D)
    for i, layer in enumerate(model.layers):
        attn = layer.attention
        q, k, v = _qkv(attn, layer.attention_norm(h))  # (B, H, Dh), (B, Hkv, Dh) x 2
        cache.k[i][:, p] = apply_rope(k, cos, sin)
        cache.v[i][:, p] = v
        q_shift = apply_rope(q, cos_s, sin_s) if string is not None else None
        out = _decode_attention(apply_rope(q, cos, sin), q_shift, cache.k[i], cache.v[i], p, string)
        h = h + attn.wo(out.reshape(out.shape[0], -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    cache.length = p + 1
    return model.output(model.norm(h)).float()


@torch.no_grad()
def greedy_generate(model: Transformer, prompts: torch.Tensor, max_new_tokens: int, *,
                    string: StringConfig | None = None, chunk_tokens: int = 65_536) -> torch.Tensor:
    """Greedy continuation (B, max_new_tokens) of equal-length prompts (B, L), with a KV cache."""
    B, L = prompts.shape
    cache = KVCache(model, B, L + max_new_tokens)
    logits = prefill(model, prompts, cache, string=string, chunk_tokens=chunk_tokens)
    out = []
    for step in range(max_new_tokens):
        token = logits.argmax(-1)  # (B,)
        out.append(token)
        if step + 1 < max_new_tokens:
            logits = decode_step(model, token, cache, string=string)
    return torch.stack(out, dim=1)
