"""STRING (ShifTed Rotary position embeddING, arXiv 2410.18745 section 4): attention at inference
with the well-trained small relative positions reused for large distances.

A query at position i and a key at position j (i >= j, same document) normally rotate by the
relative distance d = i - j. STRING keeps d below the shift S and replaces every d >= S by
d - S + W (W, the local window, keeps the nearest W positions distinct from the shifted ones):

    P[i, j] = d            if d < S        (the "diagonal" part: a sliding window of S tokens)
    P[i, j] = d - S + W    if d >= S       (the "shifted" part)

so the largest position ever used drops from L - 1 to L - 1 - S + W (paper defaults S = L/3 for
training length L, W = 128). RoPE scores depend only on i - j, so the shifted part is ordinary
causal attention with the *queries* rotated at i - S + W and the keys at their own positions,
restricted to keys with j <= i - S. The paper's Algorithm 1 computes it that way, with two
FlashAttention calls merged by their log-sum-exp (lse):

    O_diag,  lse_diag  = attention(q rotated at i,         k at j, window j >= i - S + 1)
    O_shift, lse_shift = attention(q[i >= S] rotated at i - S + W, k[j < len - S], causal j <= i - S)
    O = (exp(lse_diag - lse) O_diag + exp(lse_shift - lse) O_shift),  lse = logaddexp(both)

Queries with i < S have no shifted part and keep O_diag. Packed documents (cu_seqlens) are handled
one document at a time by the reference and as ragged segments by the fused kernel.

Two details follow the paper's public code (HKUNLP/STRING, `string_for_llama.py`) by default:

- Logit scale. Its rotary tables are cos and sin multiplied by `attention_factor = 0.1 ln 2 + 1`
  whenever STRING is on ("STRING will make the attention map smooth, we use the attention_factor to
  recover it"), so q and k are both scaled and every logit, below S too, by its square (~1.143), in
  prefill and decode. `StringConfig.scale` is that factor (1.0 turns it off); the queries carry
  scale**2, which is the same product q.k.
- The diagonal part in prefill. Its FlashAttention window `window_size=[S, 0]` is inclusive: the
  diagonal part keeps d <= S, and the shifted part d >= S, so the key at distance exactly S is in
  both (one key per query i >= S, scored once at position S and once at W). Its decode splits at
  d < S / d >= S, each key once. `StringConfig.overlap=True` (default) does the same: packed
  forwards (prefill, loss by position) keep d <= S in the diagonal part, decoding d < S.
  `overlap=False` is slimpack's exact partition everywhere.

    string_attention(q_diag, q_shift, k, v, cu_seqlens, max_seqlen, shift=S, window=W, backend=...)
    string_attention_dense(q, k, v, cu_seqlens, shift=S, window=W, rope_theta=...)  # the reference

`string_attention` takes q and k already rotated (q twice: at i and at i - S + W). Backends:
"varlen" (torch.nn.attention.varlen.varlen_attn with `window_size` and `return_aux` lse: CUDA,
fp16/bf16) and "sdpa_ref" (exact fp32 math per document, any device). "auto" picks varlen for
fp16/bf16 CUDA tensors; the cuDNN and other training backends offer no lse output, so STRING runs
on varlen there. `string_attention_dense` builds P explicitly and rotates each (query, key) pair by
P[i, j] in fp32: tests and the niah bench hold both paths to it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from slimpack.model.transformer import rope_cos_sin

PAPER_SCALE = 0.1 * math.log(2) + 1  # the paper code's attention_factor on cos and sin (logits x its square)


@dataclass(frozen=True)
class StringConfig:
    """STRING's shift S and local window W (positions d >= S are used as d - S + W), the factor on
    cos and sin (`scale`; logits scale by its square) and whether packed forwards keep the key at
    d = S in both parts as the paper's prefill does (`overlap`; see the module docstring)."""

    shift: int
    window: int = 128
    scale: float = PAPER_SCALE
    overlap: bool = True

    def __post_init__(self) -> None:
        if self.shift <= 0 or self.window < 0 or not self.scale > 0:
            raise ValueError(f"STRING needs shift > 0, window >= 0 and scale > 0; got shift {self.shift}, window "
                             f"{self.window}, scale {self.scale} (the paper: shift = 0.33-0.5 x length, window 128)")

    @property
    def logit_scale(self) -> float:
        """What every q.k is multiplied by: the factor on cos and sin, squared."""
        return self.scale * self.scale

    @property
    def diagonal_window(self) -> int:
        """Keys kept by the diagonal part of a packed forward: d < this (S + 1 with the overlap)."""
        return self.shift + 1 if self.overlap else self.shift


def string_positions(length: int, string: StringConfig | None, device: torch.device | None = None) -> torch.Tensor:
    """(length, length) int64 relative positions P[i, j] for i >= j (the upper triangle is -1)."""
    i = torch.arange(length, device=device)
    d = i[:, None] - i[None, :]
    if string is not None:
        d = torch.where(d >= string.shift, d - string.shift + string.window, d)
    return torch.where(i[:, None] >= i[None, :], d, torch.full_like(d, -1))


def string_attention_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                           string: StringConfig | None, rope_theta: float,
                           rows_per_block: int | None = None) -> torch.Tensor:
    """The reference: q (T, H, D), k/v (T, Hkv, D) NOT rotated; fp32 output (T, H, D).

    Per document, score[h, i, j] = c rope(q_i, P[i, j]) . k_j / sqrt(D), c = string.logit_scale,
    using that RoPE's rope(q, i) . rope(k, j) equals rope(q, i - j) . k. With `string.overlap`, query
    i >= S also scores the key j = i - S a second time, at position S (the paper's inclusive
    diagonal window): one more column in its softmax. Query rows go in blocks of `rows_per_block`,
    each materialising (rows, L, H, D) rotated queries: for tests and the bench's check.
    """
    T, H, D = q.shape
    groups = H // k.shape[1]
    scale = (string.logit_scale if string is not None else 1.0) / math.sqrt(D)
    overlap = string is not None and string.overlap
    out = torch.zeros(T, H, D, dtype=torch.float32, device=q.device)
    for start, end in itertools.pairwise(cu_seqlens.tolist()):
        n = end - start
        if n == 0:
            continue
        P = string_positions(n, string, q.device)  # (n, n)
        kd = k[start:end].float().repeat_interleave(groups, dim=1)  # (n, H, D)
        vd = v[start:end].float().repeat_interleave(groups, dim=1)
        rows = rows_per_block or max(1, (1 << 26) // (n * H * D))  # ~256 MB of rotated queries a block
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            m = r1 - r0
            cos, sin = rope_cos_sin(P[r0:r1].clamp(min=0).reshape(-1), D, rope_theta)  # (m*n, 1, D)
            qd = q[start + r0:start + r1].float()[:, None].expand(m, n, H, D).reshape(m * n, H, D)
            x1, x2 = qd.chunk(2, dim=-1)
            q_rot = (qd * cos + torch.cat((-x2, x1), dim=-1) * sin).view(m, n, H, D)  # (i, j, H, D)
            scores = torch.einsum("ijhd,jhd->hij", q_rot, kd) * scale
            scores = scores.masked_fill(P[None, r0:r1] < 0, float("-inf"))
            if not overlap:
                out[start + r0:start + r1] = torch.einsum("hij,jhd->ihd", scores.softmax(-1), vd)
                continue
            # The key at d = S once more, rotated at S: row i's extra column (absent for i < S).
            i = torch.arange(r0, r1, device=q.device)
            j = (i - string.shift).clamp(min=0)
            cos_s, sin_s = rope_cos_sin(torch.full((m,), string.shift, device=q.device), D, rope_theta)
            qi = q[start + r0:start + r1].float()
            y1, y2 = qi.chunk(2, dim=-1)
            extra = torch.einsum("ihd,ihd->hi", qi * cos_s + torch.cat((-y2, y1), dim=-1) * sin_s, kd[j]) * scale
            extra = extra.masked_fill((i < string.shift)[None], float("-inf"))
            probs = torch.cat([scores, extra[..., None]], dim=-1).softmax(-1)  # (H, m, n + 1)
            out[start + r0:start + r1] = (torch.einsum("hij,jhd->ihd", probs[..., :n], vd)
                                          + probs[..., n].transpose(0, 1)[..., None] * vd[j])
    return out


def string_attention(q_diag: torch.Tensor, q_shift: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens: torch.Tensor, max_seqlen: int, *, string: StringConfig,
                     backend: str = "auto") -> torch.Tensor:
    """STRING attention over packed documents; q_diag/q_shift (T, H, D) rotated at i and i - S + W
    (and carrying `string.logit_scale`), k (T, Hkv, D) rotated at j, v (T, Hkv, D). The diagonal
    part keeps d < `string.diagonal_window`. Returns (T, H, D) in q's dtype."""
    if backend == "auto":
        backend = "varlen" if q_diag.is_cuda and q_diag.dtype in (torch.float16, torch.bfloat16) else "sdpa_ref"
    elif backend not in ("varlen", "sdpa_ref"):
        backend = "varlen"  # cudnn, flash_attn, xformers: no lse output here; see the module docstring
    bounds = cu_seqlens.tolist()
    S = string.shift
    # Shifted segments: queries at in-document offsets [S, n) against keys at [0, n - S).
    q_rows = [torch.arange(a + S, b) for a, b in itertools.pairwise(bounds) if b - a > S]
    k_rows = [torch.arange(a, b - S) for a, b in itertools.pairwise(bounds) if b - a > S]
    if backend == "sdpa_ref":
        o_diag, lse_diag = _attend_ref(q_diag, k, v, bounds, bounds, window=string.diagonal_window)
    else:
        o_diag, lse_diag = _attend_varlen(q_diag, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                          window=string.diagonal_window)
    if not q_rows:  # every document is shorter than S: plain causal attention
        return o_diag.to(q_diag.dtype)
    qi = torch.cat(q_rows).to(q_diag.device)
    ki = torch.cat(k_rows).to(q_diag.device)
    seg = [0, *itertools.accumulate(len(r) for r in q_rows)]
    if backend == "sdpa_ref":
        o_shift, lse_shift = _attend_ref(q_shift[qi], k[ki], v[ki], seg, seg, window=None)
    else:
        cu = torch.tensor(seg, dtype=torch.int32, device=q_diag.device)
        longest = max(len(r) for r in q_rows)
        o_shift, lse_shift = _attend_varlen(q_shift[qi].contiguous(), k[ki].contiguous(), v[ki].contiguous(),
                                            cu, cu, longest, longest, window=None)
    # Merge by log-sum-exp (fp32): each part's softmax is renormalised by its share of the total mass.
    lse_d = lse_diag[qi]  # (Ts, H)
    lse = torch.logaddexp(lse_d, lse_shift)
    merged = o_diag[qi] * (lse_d - lse).exp()[..., None] + o_shift * (lse_shift - lse).exp()[..., None]
    out = o_diag.clone()
    out[qi] = merged
    return out.to(q_diag.dtype)


def _attend_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds_q: list[int], bounds_k: list[int],
                *, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention per segment in fp32 with its lse: (T, H, D) output, (T, H) lse.

    Segments pair query rows bounds_q[s]:bounds_q[s+1] with key rows of the same segment, aligned at
    the end (query a sees keys b <= a + len_k - len_q); `window` keeps only keys with a - b < window.
    """
    H, D = q.shape[1], q.shape[2]
    groups = H // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[0], H), float("-inf"), dtype=torch.float32, device=q.device)
    for (qa, qb), (ka, kb) in zip(itertools.pairwise(bounds_q), itertools.pairwise(bounds_k), strict=True):
        if qb == qa:
            continue
        qd = q[qa:qb].float().transpose(0, 1)  # (H, Lq, D)
        kd = k[ka:kb].float().repeat_interleave(groups, dim=1).transpose(0, 1)  # (H, Lk, D)
        vd = v[ka:kb].float().repeat_interleave(groups, dim=1).transpose(0, 1)
        a = torch.arange(qb - qa, device=q.device)[:, None] + (kb - ka) - (qb - qa)
        b = torch.arange(kb - ka, device=q.device)[None, :]
        visible = b <= a
        if window is not None:
            visible &= a - b < window
        scores = (qd @ kd.transpose(1, 2)) / math.sqrt(D)
        scores = scores.masked_fill(~visible, float("-inf"))  # (H, Lq, Lk)
        seg_lse = scores.logsumexp(-1)  # (H, Lq)
        out[qa:qb] = ((scores - seg_lse[..., None]).exp() @ vd).transpose(0, 1)
        lse[qa:qb] = seg_lse.transpose(0, 1)
    return out, lse


def _attend_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                   max_q: int, max_k: int, *, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """varlen_attn (FlashAttention-2) with its lse: fp32 (T, H, D) output and (T, H) lse.

    `window_size=(window - 1, 0)` keeps keys with i - j <= window - 1, i.e. d < window; (-1, 0) is
    causal, aligned at the end of each segment as `_attend_ref` is.
    """
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    from slimpack.model.attention import varlen_gqa

    size = (window - 1, 0) if window is not None else (-1, 0)
    k, v, gqa = varlen_gqa(k, v, q.shape[1] // k.shape[1])
    out, lse = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, return_aux=AuxRequest(lse=True),
                           window_size=size, **gqa)
    return out.float(), lse.float().transpose(0, 1)  # lse (H, T) -> (T, H)
