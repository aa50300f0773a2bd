"""Our Transformer state dict <-> a Hugging Face `LlamaForCausalLM` checkpoint directory.

    export_hf(state_dict, cfg, out_dir)   writes out_dir/config.json, model.safetensors,
                                          generation_config.json and the tokenizer files

Only names change: our q/k projections already use HF's `rotate_half` rotary layout (frequency i at
channels i and i + D/2), so no weight is permuted, and `transformers` loading the directory gives
logits equal to ours (tests/train/test_export.py).

The tokenizer is slimpack's own (the tiktoken BPE ranks of llama-models' `tokenizer.model` plus
Meta's 256 special tokens), written offline as a `tokenizers` BPE (`tokenizer.json`) the way
Meta's Hugging Face release of Llama 3 is: byte-level vocabulary, merges recovered from the ranks,
`ignore_merges` (a pre-token that is itself a token is that token, as in tiktoken), Meta's split
pattern, BOS prepended by the post-processor. `AutoTokenizer.from_pretrained(out)` then encodes
text to slimpack's ids without EOS (BOS + text), tested on real text. Two honest differences:
- special-token strings in text: slimpack encodes them as ordinary text; the export's
  `tokenizer_config.json` sets `split_special_tokens` so the HF tokenizer does the same by default
  (pass `split_special_tokens=False` to `from_pretrained` to get control ids, as Meta's HF tokenizer
  gives);
- Meta's reference, and so slimpack, encodes a text over 400,000 characters, or with a run of more
  than 25,000 whitespace or non-whitespace characters, in pieces cut at fixed places
  (`tokenize/tokenizer.py`); the HF tokenizer encodes it whole, so ids may differ next to a cut.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from slimpack.model.transformer import ModelConfig
from slimpack.tokenize.tokenizer import PATTERN, Llama3Tokenizer

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


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character (what `tokenizers`'
    ByteLevel pre-tokenizer maps bytes to, so vocabulary keys must be written in it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _vocab_and_merges(ranks: Mapping[bytes, int]) -> tuple[dict[str, int], list[str]]:
    """Byte-level vocabulary and the BPE merges that rebuild tiktoken's ranks.

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank. A
    `tokenizers` BPE merges by list position instead, so every way a token splits into two tokens
    becomes a merge, ordered by the rank of the token it makes (ties by the ranks of its halves):
    the same construction as transformers' `TikTokenConverter`, the one Meta's Llama 3 release uses.
    """
    to_char = _bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    vocab = {text(token): rank for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])}
    return vocab, [f"{text(left)} {text(right)}" for *_, left, right in merges]


def hf_tokenizer_files(tokenizer: Llama3Tokenizer, *, model_max_length: int) -> dict[str, dict[str, Any]]:
    """{file name: JSON contents} of a Hugging Face fast tokenizer equal to `tokenizer` (see the
    module docstring for what "equal" covers)."""
    ranks = {token: tokenizer.encoding.encode_single_token(token)
             for token in tokenizer.encoding.token_byte_values()}
    vocab, merges = _vocab_and_merges(ranks)
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for tok, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PATTERN}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": {"type": "Sequence", "processors": [
            {**byte_level, "trim_offsets": False},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}}}]},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True, "vocab": vocab, "merges": merges},
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        # slimpack trained on special-token strings in text as ordinary text; so does this tokenizer.
        "split_special_tokens": True,
        "slimpack_tokenizer_sha256": tokenizer.sha256,
    }
    special_tokens_map = {"bos_token": bos, "eos_token": eos}
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": tokenizer_config,
            "special_tokens_map.json": special_tokens_map}


def generation_config(tokenizer: Llama3Tokenizer) -> dict[str, object]:
    """generation_config.json: stop at EOS, greedy unless the caller asks to sample. No max_length:
    callers set max_new_tokens, and transformers warns when both are set."""
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.eos_id,  # base model, no pad token: batches pad with EOS
            "do_sample": False}


def export_hf(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path, *,
              dtype: torch.dtype | None = None, tokenizer: Llama3Tokenizer | None = None) -> Path:
    """Write a Hugging Face LlamaForCausalLM directory (config.json + model.safetensors, the
    tokenizer files and generation_config.json) to out_dir.

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
    tokenizer = tokenizer or Llama3Tokenizer()
    if cfg.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"the model has {cfg.vocab_size:,} token ids but the Llama 3 tokenizer "
                         f"{tokenizer.vocab_size:,}; export-hf writes the Llama 3 tokenizer, so it "
                         "needs a model trained with it")
    dtype = dtype or next(iter(hf.values())).dtype
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in hf.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    files = {"config.json": hf_config(cfg, dtype=dtype), "generation_config.json": generation_config(tokenizer),
             **hf_tokenizer_files(tokenizer, model_max_length=cfg.max_seq_len)}
    for name, contents in files.items():
        (out / name).write_text(json.dumps(contents, indent=2, ensure_ascii=False) + "\n")
    return out
