"""The Llama-architecture model (TinyLlama shape with the Llama 3 vocabulary), alone.

Readable top to bottom: config and presets, RMSNorm, rotary embedding, attention, SwiGLU MLP, block,
model. Inputs are FLAT packed tensors (documents concatenated, no padding, no batch axis):

    input_ids    (T,)   int64   token ids
    position_ids (T,)   int64   0, 1, ... restarting at every document start
    cu_seqlens   (k+1,) int32   document boundaries [0, ..., T]
    max_seqlen   int            longest document, or any upper bound such as seq_len (a Python
                                int, so kernels need no host sync)

and the model returns the final-normed hidden states (T, D), not logits: the loss applies
`model.output` in token chunks so (T, 128256) fp32 logits never exist (see `train/loss.py`).

Attention goes through the one seam `train.attention.attention`, which keeps every query inside its
own document. Tensor layouts and weight conventions equal Hugging Face `LlamaForCausalLM` (q/k in the
`rotate_half` layout), so `train/export.py` renames weights and never permutes them.

No distributed, checkpoint or performance code lives here: FSDP, activation checkpointing and
torch.compile are applied from outside (`train/parallel.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimpack.model.attention import BACKENDS, attention


@dataclass(frozen=True)
class ModelConfig:
    """Llama architecture hyper-parameters; defaults are the paper's TinyLlama shape (1.3B)."""

    vocab_size: int = 128_256
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_layers: int = 22
    num_heads: int = 32
    num_kv_heads: int = 4
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    init_std: float = 0.02
    max_seq_len: int = 4096

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)} must be positive")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}; pick num_heads dividing it")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads "
                             f"{self.num_kv_heads} (grouped-query attention shares each KV head "
                             "across a whole group)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_params(self) -> int:
        """Exact parameter count (weights of every Linear, Embedding and RMSNorm)."""
        d, f, kv = self.hidden_size, self.intermediate_size, self.num_kv_heads * self.head_dim
        per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d  # wq wo, wk wv, w1 w2 w3, 2 norms
        return 2 * self.vocab_size * d + self.num_layers * per_layer + d  # embed + output, final norm


PRESETS: dict[str, ModelConfig] = {
    # The paper's model: TinyLlama-1.1B shape with the Llama 3 vocabulary = 1,494,312,960 params.
    "tinyllama-1.3b": ModelConfig(),
    # Demo / CPU runs: ~0.8M non-embedding params; embeddings dominate (2 x 128256 x 128 = 32.8M).
    "small": ModelConfig(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                         num_kv_heads=2, max_seq_len=2048),
    # CPU unit tests: the smallest shape that still has GQA (2 query heads per KV head) and 2 layers.
    "tiny": ModelConfig(hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_seq_len=512),
}


def model_config(name: str) -> ModelConfig:
    """The preset called `name` (see PRESETS)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 and cast back before the weight (as HF Llama does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, D) -> (T, D)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int,
                 theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, 1, head_dim) in fp32 for the `rotate_half` layout: frequency i sits at i and i + D/2.

    Computed from position_ids, which restart per document, so each document sees positions 0..len-1.
    """
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)  # (D/2,)
    freqs = position_ids.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, D)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (T, H, D) by position; the pair (i, i + D/2) rotates together (HF `rotate_half`)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # rotate_half
    return (xf * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention, causal within each packed document."""

    def __init__(self, cfg: ModelConfig, backend: str):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.backend = backend
        d, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
        self.wq = nn.Linear(d, cfg.num_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(d, kv, bias=False)
        self.wv = nn.Linear(d, kv, bias=False)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:
        T = x.shape[0]
        q = self.wq(x).view(T, self.num_heads, self.head_dim)  # (T, H, Dh)
        k = self.wk(x).view(T, self.num_kv_heads, self.head_dim)  # (T, Hkv, Dh)
        v = self.wv(x).view(T, self.num_kv_heads, self.head_dim)  # (T, Hkv, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, k, v, cu_seqlens, max_seqlen, backend=self.backend)  # (T, H, Dh)
        return self.wo(out.reshape(T, self.num_heads * self.head_dim))  # (T, D)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 = HF gate_proj, w3 = up_proj, w2 = down_proj."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, D) -> (T, D)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, cfg: ModelConfig, backend: str):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg, backend)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cu_seqlens, max_seqlen)
        return h + self.feed_forward(self.ffn_norm(h))


def _check_inputs(input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """Shape and dtype checks only (metadata, no device sync); values are the data loader's contract."""
    if input_ids.dim() != 1 or position_ids.shape != input_ids.shape:
        raise ValueError(f"input_ids and position_ids must be flat (T,) tensors of one length; got "
                         f"{tuple(input_ids.shape)} and {tuple(position_ids.shape)} (flatten a "
                         "(micro_batch, seq_len) batch and give its document boundaries in cu_seqlens)")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be a (k+1,) int32 tensor of document boundaries; got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)} (use .to(torch.int32))")


class Transformer(nn.Module):
    """Llama decoder over flat packed sequences; returns final-normed hidden states (T, D).

    Untied embeddings: `tok_embeddings` (V, D) and `output` (V, D) are separate parameters. The
    loss applies `output` itself, chunked (`train/loss.py`); `logits()` is the plain path for tests.
    """

    def __init__(self, cfg: ModelConfig, *, attention_backend: str = "auto"):
        super().__init__()
        if attention_backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {attention_backend!r}; choose one of {BACKENDS}")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, attention_backend) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, init_std) for every Linear and the embedding, ones for RMSNorm weights.

        TinyLlama's choice (HF `initializer_range` 0.02 everywhere, no depth scaling): the paper
        setup, kept plain. Safe to call after `to_empty()` on meta-initialised (also FSDP) modules.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:
        _check_inputs(input_ids, position_ids, cu_seqlens)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)  # (T, 1, Dh) fp32
        h = self.tok_embeddings(input_ids)  # (T, D)
        for layer in self.layers:
            h = layer(h, cos, sin, cu_seqlens, max_seqlen)
        return self.norm(h)  # (T, D)

    def logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
               max_seqlen: int) -> torch.Tensor:
        """Full (T, V) logits in the weight dtype: for tests and evaluation, not for training."""
        return self.output(self.forward(input_ids, position_ids, cu_seqlens, max_seqlen))

