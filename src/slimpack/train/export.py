"""Our Transformer state dict <-> a Hugging Face `LlamaForCausalLM` checkpoint directory.

    export_hf(state_dict, cfg, out_dir)   writes out_dir/config.json + out_dir/model.safetensors

Only names change: our q/k projections already use HF's `rotate_half` rotary layout (frequency i at
channels i and i + D/2), so no weight is permuted, and `transformers` loading the directory gives
logits equal to ours (tests/train/test_export.py). The directory holds no tokenizer: slimpack's
Llama 3 tokenizer is tiktoken-based; pair the export with the Llama 3 tokenizer files you use.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from slimpack.train.model import ModelConfig

# Wrapper prefixes that torch.compile, activation checkpointing and DDP insert into state-dict keys.
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "module.")

_TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_OURS_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _strip_wrappers(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        key = key.replace(prefix, "")
    return key


def _rename(state_dict: Mapping[str, torch.Tensor], top: dict[str, str], per_layer: dict[str, str],
            layer_re: re.Pattern[str], layer_prefix: str, what: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for raw_key, tensor in state_dict.items():
        key = _strip_wrappers(raw_key)
        if key in top:
            out[top[key]] = tensor
            continue
        m = layer_re.fullmatch(key)
        if m is None or m.group(2) not in per_layer:
            raise ValueError(f"unexpected key {raw_key!r} in {what} state dict; it is not part of the "
                             "Llama architecture (was the state dict saved from another model?)")
        out[f"{layer_prefix}{m.group(1)}.{per_layer[m.group(2)]}"] = tensor
    return out


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter names -> HF LlamaForCausalLM names (tensors shared, not copied)."""
    return _rename(state_dict, _TOP_LEVEL, _PER_LAYER, _OURS_LAYER, "model.layers.", "slimpack")


def from_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM names -> ours (the inverse of `to_hf_state_dict`)."""
    top = {v: k for k, v in _TOP_LEVEL.items()}
    per_layer = {v: k for k, v in _PER_LAYER.items()}
    # HF may carry a non-persistent rotary buffer in older checkpoints; it is recomputed, not a weight.
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    return _rename(state_dict, top, per_layer, _HF_LAYER, "layers.", "Hugging Face")


def hf_config(cfg: ModelConfig, *, dtype: torch.dtype) -> dict[str, object]:
    """config.json contents for LlamaForCausalLM (keys read by transformers 4.45+ and 5)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": 128_000,  # Llama 3 <|begin_of_text|>
        "eos_token_id": 128_001,  # Llama 3 <|end_of_text|>
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def export_hf(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path, *,
              dtype: torch.dtype | None = None) -> Path:
    """Write a Hugging Face LlamaForCausalLM directory (config.json + model.safetensors) to out_dir.

    `state_dict` is a full (unsharded) model state dict, e.g. `model.state_dict()` or one gathered
    from a distributed checkpoint; tensors are moved to CPU and cast to `dtype` (default: as given).
    Returns out_dir.
    """
    from safetensors.torch import save_file

    hf = to_hf_state_dict(state_dict)
    expected = cfg.num_params()
    got = sum(t.numel() for t in hf.values())
    if got != expected:
        raise ValueError(f"state dict has {got:,} parameters but ModelConfig {cfg} needs {expected:,}; "
                         "export with the config the checkpoint was trained with")
    dtype = dtype or next(iter(hf.values())).dtype
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in hf.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg, dtype=dtype), indent=2) + "\n")
    return out
