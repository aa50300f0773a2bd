"""Inference on slimpack's own `Transformer`: packed forward with STRING, batched greedy decoding with a
KV cache. Reuses the model's weights and rotary functions; `model/transformer.py` stays the training model.

    hidden = forward_packed(model, input_ids, position_ids, cu_seqlens, max_seqlen, string=None)
    tokens = greedy_generate(model, prompts (B, L), max_new_tokens, string=None)

`forward_packed` is `Transformer.forward` with an optional STRING (`model/string_attention.py`):
evaluations that score whole sequences (loss by position) call it instead of `model(...)` to run
with STRING. `greedy_generate` prefills prompts of any lengths as packed documents through the fused
attention seam (a chunk of samples at a time, so activations stay bounded), keeps each layer's
rotated keys and values in a `KVCache` of shape (B, longest + new, Hkv, Dh) with each sample's own
fill, then decodes one token per step for the whole batch against the cache, each sample at its
own position: no padding enters any attention. It stops once every sample has emitted an EOS.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from slimpack.model.attention import attention
from slimpack.model.string_attention import StringConfig, string_attention
from slimpack.model.transformer import Transformer, apply_rope, rope_cos_sin


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
    """Per-layer rotated keys and values (B, capacity, Hkv, Dh); sample b is filled to `lengths[b]`
    positions (a device tensor for the kernels); `longest` is the largest fill, on the host (every
    sample advances one position per decode step, so it needs no device read)."""

    def __init__(self, model: Transformer, batch: int, capacity: int) -> None:
        cfg = model.cfg
        like = model.tok_embeddings.weight
        shape = (batch, capacity, cfg.num_kv_heads, cfg.head_dim)
        # Zeros, not empty: the exact decode paths read a shorter sample's unwritten rows under a
        # mask, and a masked NaN of uninitialised memory still poisons the product (0 x NaN).
        self.k = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(cfg.num_layers)]
        self.capacity = capacity
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=like.device)
        self.longest = 0


def _qkv(attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unrotated q (..., H, Dh), k and v (..., Hkv, Dh) of one attention layer for inputs x (..., D)."""
    lead = x.shape[:-1]
    q = attn.wq(x).view(*lead, attn.num_heads, attn.head_dim)
    k = attn.wk(x).view(*lead, attn.num_kv_heads, attn.head_dim)
    v = attn.wv(x).view(*lead, attn.num_kv_heads, attn.head_dim)
    return q, k, v


def query_rope(position_ids: torch.Tensor, head_dim: int, theta: float,
               string: StringConfig | None) -> tuple[torch.Tensor, ...]:
    """cos/sin for the queries: at i (and, with STRING, at i - S + W), carrying STRING's logit scale."""
    cos, sin = rope_cos_sin(position_ids, head_dim, theta)
    if string is None:
        return cos, sin
    c = string.logit_scale
    cos_s, sin_s = rope_cos_sin(position_ids - string.shift + string.window, head_dim, theta)
    return cos * c, sin * c, cos_s * c, sin_s * c


def forward_packed(model: Transformer, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   cu_seqlens: torch.Tensor, max_seqlen: int, *, string: StringConfig | None = None,
                   kv_out: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """Final-normed hidden states (T, D) of flat packed inputs, as `model(...)` returns them, with
    STRING when given. `kv_out`, if a list, receives each layer's rotated (k, v) (T, Hkv, Dh)."""
    cfg = model.cfg
    cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta)  # (T, 1, Dh): keys (and plain queries)
    q_rope = query_rope(position_ids, cfg.head_dim, cfg.rope_theta, string) if string is not None else ()
    h = model.tok_embeddings(input_ids)  # (T, D)
    for layer in model.layers:
        attn = layer.attention
        q, k, v = _qkv(attn, layer.attention_norm(h))  # (T, H, Dh), (T, Hkv, Dh) x 2
        k = apply_rope(k, cos, sin)
        if string is None:
            out = attention(apply_rope(q, cos, sin), k, v, cu_seqlens, max_seqlen, backend=attn.backend)
        else:
            out = string_attention(apply_rope(q, q_rope[0], q_rope[1]), apply_rope(q, q_rope[2], q_rope[3]), k, v,
                                   cu_seqlens, max_seqlen, string=string, backend=attn.backend)
        if kv_out is not None:
            kv_out.append((k, v))
        h = h + attn.wo(out.reshape(out.shape[0], -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.norm(h)


def _as_prompts(prompts: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A (B, L) tensor or a sequence of 1-D tensors, as a list of 1-D prompts."""
    out = list(prompts.unbind(0)) if isinstance(prompts, torch.Tensor) else list(prompts)
    if not out or any(p.dim() != 1 or len(p) == 0 for p in out):
        raise ValueError("prompts must be a (B, L) tensor or a non-empty sequence of non-empty 1-D tensors")
    return out


@torch.no_grad()
def prefill(model: Transformer, prompts: torch.Tensor | Sequence[torch.Tensor], cache: KVCache, *,
            string: StringConfig | None = None, chunk_tokens: int = 65_536) -> torch.Tensor:
    """Run prompts (B, L), or B prompts of their own lengths, into an empty cache; returns each
    prompt's last-position logits (B, V) in fp32.

    Prompts go through in chunks of about `chunk_tokens` tokens (at least one prompt), each a packed
    batch of documents (cu_seqlens at the prompts' ends), so the fused kernels do the attention.
    """
    prompts = _as_prompts(prompts)
    if cache.longest:
        raise ValueError("prefill needs an empty KVCache")
    lengths = [len(p) for p in prompts]
    if len(prompts) != len(cache.lengths) or max(lengths) > cache.capacity:
        raise ValueError(f"{len(prompts)} prompts of up to {max(lengths)} tokens do not fit a cache of "
                         f"{len(cache.lengths)} x {cache.capacity}")
    device = cache.lengths.device
    chunks, b0 = [], 0
    while b0 < len(prompts):
        b1, tokens = b0 + 1, lengths[b0]
        while b1 < len(prompts) and tokens + lengths[b1] <= chunk_tokens:
            tokens += lengths[b1]
            b1 += 1
        chunks.append((b0, b1))
        b0 = b1
    last = []
    for b0, b1 in chunks:
        ids = torch.cat(prompts[b0:b1]).to(device)
        n = torch.tensor(lengths[b0:b1], device=device)
        cu = torch.nn.functional.pad(n.cumsum(0), (1, 0)).to(torch.int32)
        starts = torch.repeat_interleave(cu[:-1].long(), n)
        positions = torch.arange(len(ids), device=device) - starts
        rows = torch.repeat_interleave(torch.arange(b0, b1, device=device), n)
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        hidden = forward_packed(model, ids, positions, cu, max(lengths[b0:b1]), string=string, kv_out=kv)
        for layer, (k, v) in enumerate(kv):
            cache.k[layer][rows, positions] = k
            cache.v[layer][rows, positions] = v
        last.append(model.output(hidden[cu[1:].long() - 1]).float())
    cache.lengths.copy_(torch.tensor(lengths))
    cache.longest = max(lengths)
    return torch.cat(last)


def _decode_varlen(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """FlashAttention over the cache in place: sample b is query segment b (one row) against key
    segment b, the cache's rows b * capacity ... of which `used[b]` count (seqused_k); no copy."""
    B, cap = k_cache.shape[:2]
    cu_q = torch.arange(B + 1, dtype=torch.int32, device=q.device)
    cu_k = torch.arange(0, B * cap + 1, cap, dtype=torch.int32, device=q.device)
    seqused = used.to(torch.int32)
    k, v = k_cache.view(B * cap, *k_cache.shape[2:]), v_cache.view(B * cap, *v_cache.shape[2:])
    if _VARLEN_SEQUSED:
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu_q, cu_k, 1, cap, seqused_k=seqused, enable_gqa=q.shape[1] != k.shape[1])
    # torch 2.10/2.11: varlen_attn has no seqused_k; the FlashAttention-2 op beneath it has, and serves
    # grouped K/V heads natively. One query per segment, so no causal mask is needed.
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, 1, cap, 0.0, False, False,
                                                   seqused_k=seqused)[0]


def _decode_attention(q: torch.Tensor, q_shift: torch.Tensor | None, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, positions: torch.Tensor, longest: int,
                      string: StringConfig | None) -> torch.Tensor:
    """One query per sample, q (B, H, Dh), against the cache (B, capacity, Hkv, Dh), sample b filled
    up to `positions[b]` inclusive (`longest` = the largest, on the host); returns (B, H, Dh).
    fp16/bf16 on CUDA without STRING: FlashAttention in place (`_decode_varlen`); otherwise SDPA or,
    with STRING, exact math on the filled part.

    STRING: a key at distance d = position - j scores with q (rotated at `position`) when d < S, else
    with q_shift (rotated at position - S + W): the paper's decode, each key once.
    """
    if string is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _decode_varlen(q, k_cache, v_cache, positions + 1)
    k, v = k_cache[:, :longest + 1], v_cache[:, :longest + 1]
    B, H, Dh = q.shape
    Hkv = k.shape[2]
    distance = positions[:, None] - torch.arange(k.shape[1], device=k.device)  # (B, T); < 0: not yet written
    if string is None:
        out = F.scaled_dot_product_attention(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=(distance >= 0)[:, None, None], enable_gqa=True)
        return out[:, :, 0]
    qg = q.float().view(B, Hkv, H // Hkv, Dh)
    scores = torch.einsum("bhgd,bthd->bhgt", qg, k.float())
    scores_shift = torch.einsum("bhgd,bthd->bhgt", q_shift.float().view(B, Hkv, H // Hkv, Dh), k.float())
    d = distance[:, None, None]
    scores = torch.where(d < string.shift, scores, scores_shift).masked_fill(d < 0, float("-inf")) / Dh**0.5
    out = torch.einsum("bhgt,bthd->bhgd", scores.softmax(-1), v.float())
    return out.reshape(B, H, Dh).to(q.dtype)


@torch.no_grad()
def decode_step(model: Transformer, tokens: torch.Tensor, cache: KVCache, *,
                string: StringConfig | None = None) -> torch.Tensor:
    """Append one token per sample (B,), sample b at position `cache.lengths[b]`; returns its logits
    (B, V) in fp32."""
    longest = cache.longest
    if longest >= cache.capacity:
        raise ValueError(f"KVCache full ({cache.capacity} positions)")
    cfg = model.cfg
    positions = cache.lengths
    rows = torch.arange(len(positions), device=positions.device)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)  # (B, 1, Dh)
    q_rope = query_rope(positions, cfg.head_dim, cfg.rope_theta, string)
    h = model.tok_embeddings(tokens)  # (B, D)
    for i, layer in enumerate(model.layers):
        attn = layer.attention
        q, k, v = _qkv(attn, layer.attention_norm(h))  # (B, H, Dh), (B, Hkv, Dh) x 2
        cache.k[i][rows, positions] = apply_rope(k, cos, sin)
        cache.v[i][rows, positions] = v
        q_shift = apply_rope(q, q_rope[2], q_rope[3]) if string is not None else None
        out = _decode_attention(apply_rope(q, q_rope[0], q_rope[1]), q_shift, cache.k[i], cache.v[i], positions,
                                longest, string)
        h = h + attn.wo(out.reshape(out.shape[0], -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    cache.lengths += 1
    cache.longest += 1
    return model.output(model.norm(h)).float()


@torch.no_grad()
def greedy_generate(model: Transformer, prompts: torch.Tensor | Sequence[torch.Tensor], max_new_tokens: int, *,
                    eos_ids: Sequence[int] = (), string: StringConfig | None = None,
                    chunk_tokens: int = 65_536, stop_check_every: int = 4,
                    after_prefill: Callable[[], None] | None = None) -> torch.Tensor:
    """Greedy continuations (B, n) of prompts (B, L) or of B prompts of their own lengths, with a KV
    cache. n = max_new_tokens, or fewer once every sample has emitted one of `eos_ids` (checked
    every `stop_check_every` steps: each check waits for the GPU). A sample's tokens after its first
    EOS are arbitrary: callers cut there. `after_prefill` is called between prefill and decoding
    (the bench times the two apart)."""
    prompts = _as_prompts(prompts)
    cache = KVCache(model, len(prompts), max(len(p) for p in prompts) + max_new_tokens)
    logits = prefill(model, prompts, cache, string=string, chunk_tokens=chunk_tokens)
    if after_prefill is not None:
        after_prefill()
    eos = torch.tensor(list(eos_ids), dtype=torch.int64, device=logits.device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=logits.device)
    out = []
    for step in range(max_new_tokens):
        token = logits.argmax(-1)  # (B,)
        out.append(token)
        if len(eos):
            done |= torch.isin(token, eos)
            if (step + 1) % stop_check_every == 0 and bool(done.all()):
                break
        if step + 1 < max_new_tokens:
            logits = decode_step(model, token, cache, string=string)
    return torch.stack(out, dim=1)
