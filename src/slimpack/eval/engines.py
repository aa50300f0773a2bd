"""Models for the evaluations: one loader of slimpack checkpoints, device and dtype resolution, and
the greedy-generation engines the needle test drives (ours with its KV cache, or transformers').

    model, meta = load_slimpack_model(CHECKPOINT, device=..., dtype=...)
    engine = open_engine(PATH, device=..., dtype=..., eos_ids=...)   # slimpack checkpoint or HF dir
    engine.generate(prompts, max_new_tokens, string) -> each prompt's new token ids
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimpack.eval.niah import Generate
from slimpack.model.checkpoint_files import load_model_state_dict, resolve_checkpoint
from slimpack.model.inference import greedy_generate
from slimpack.model.transformer import ModelConfig, Transformer

LLAMA3_VOCAB = 128_256


def resolve_device(name: str) -> torch.device:
    """`auto`: a GPU if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a GPU, fp32 elsewhere."""
    return {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "fp32": torch.float32,
            "bf16": torch.bfloat16}[name]


def is_slimpack_path(path: Path) -> bool:
    """A checkpoint (meta.json) or a run directory (checkpoints/; it has a config.json too)."""
    return (path / "meta.json").is_file() or (path / "checkpoints").is_dir()


def load_slimpack_model(path: str | Path, *, device: torch.device, dtype: torch.dtype = torch.float32,
                        backend: str = "auto") -> tuple[Transformer, dict[str, Any]]:
    """A checkpoint directory (or a run directory: its newest checkpoint) as an eval-mode Transformer
    on `device`; meta.json with `path` added. `backend` auto: the fused kernels on a GPU, the exact
    reference elsewhere."""
    path = resolve_checkpoint(path)
    weights, meta = load_model_state_dict(path)
    if "model_config" not in meta:
        raise ValueError(f"{path}/meta.json records no model_config; it was not written by `slimpack train`")
    cfg = ModelConfig(**meta["model_config"])
    if backend == "auto" and device.type != "cuda":
        backend = "sdpa_ref"
    model = Transformer(cfg, attention_backend=backend)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if expected != got:
        wrong = sorted(set(expected) ^ set(got)) or [k for k in expected if expected[k] != got[k]]
        raise ValueError(f"{path}: the checkpoint's weights do not fit the model its meta.json describes "
                         f"({asdict(cfg)}; first difference: {wrong[0]}: {got.get(wrong[0])} vs "
                         f"{expected.get(wrong[0])}); evaluate the checkpoint its run wrote, unedited")
    model.load_state_dict(weights)
    meta["path"] = str(path)
    return model.to(device=device, dtype=dtype).eval(), meta


@dataclass
class Engine:
    """A loaded model: a name, its longest usable prompt, and batched greedy generation."""

    name: str
    max_length: int
    train_length: int | None
    generate: Generate
    meta: dict[str, Any] | None = None  # a slimpack checkpoint's meta.json (step, tokens)


def slimpack_engine(model: Transformer, *, name: str, train_length: int | None, eos_ids: Sequence[int] = (),
                    batch_samples: int = 0, prefill_tokens: int = 65_536,
                    meta: dict[str, Any] | None = None) -> Engine:
    """An Engine over a slimpack `Transformer` already on its device (eval mode): our KV-cache
    decoder over prompts of any lengths, with STRING when asked, stopping once all have an EOS."""
    device = model.tok_embeddings.weight.device

    def generate(prompts: list[np.ndarray], new: int, string: Any) -> list[list[int]]:
        step = batch_samples or len(prompts)
        out: list[list[int]] = []
        for b0 in range(0, len(prompts), step):
            batch = [torch.as_tensor(p, device=device) for p in prompts[b0:b0 + step]]
            out += greedy_generate(model, batch, new, eos_ids=eos_ids, string=string,
                                   chunk_tokens=prefill_tokens).tolist()
        return out

    return Engine(name, model.cfg.max_seq_len, train_length, generate, meta)


def hf_engine(path: str | Path, *, device: torch.device, dtype: torch.dtype, eos_ids: Sequence[int] = (),
              batch_samples: int = 0, pad_left: bool = False) -> Engine:
    """A Hugging Face Llama directory through transformers' own `generate` (greedy, KV cache, offline).
    Prompts of one length go together (no padding: the answers are the paper script's, which decodes
    one prompt at a time); `pad_left` batches them all, left-padded under an attention mask, as a
    user batching `generate` would (the bench's baseline: fewer, larger batches)."""
    import transformers

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ValueError(f"{path}/config.json has model_type {config.get('model_type')!r}; eval niah reads "
                         f"Llama models (slimpack export-hf output or another LlamaForCausalLM)")
    if config.get("vocab_size", 0) < LLAMA3_VOCAB:
        raise ValueError(f"{path}: vocab_size {config.get('vocab_size')} is smaller than Llama 3's 128,256; "
                         f"prompts use slimpack's Llama 3 tokenizer, so the model must share its vocabulary")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model = model.to(device).eval()

    def generate(prompts: list[np.ndarray], new: int, string: Any) -> list[list[int]]:
        if string is not None:
            raise ValueError(f"{path} is a Hugging Face directory: STRING runs on slimpack checkpoints only")
        groups: dict[int, list[int]] = defaultdict(list)
        for i, p in enumerate(prompts):
            groups[0 if pad_left else len(p)].append(i)
        out: list[list[int]] = [[] for _ in prompts]
        for rows in groups.values():
            step = batch_samples or len(rows)
            for r0 in range(0, len(rows), step):
                chunk = rows[r0:r0 + step]
                width = max(len(prompts[i]) for i in chunk)
                ids = torch.zeros((len(chunk), width), dtype=torch.int64)
                mask = torch.zeros_like(ids)
                for r, i in enumerate(chunk):
                    ids[r, width - len(prompts[i]):] = torch.as_tensor(prompts[i])
                    mask[r, width - len(prompts[i]):] = 1
                with torch.no_grad():
                    gen = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                                         do_sample=False, eos_token_id=list(eos_ids) or None, pad_token_id=0)
                for i, row in zip(chunk, gen[:, width:].tolist(), strict=True):
                    out[i] = row
        return out

    return Engine(f"{path.name} (transformers)", int(config.get("max_position_embeddings", 0)) or 1 << 30,
                  None, generate)


def open_engine(path: str | Path, *, device: torch.device, dtype: torch.dtype, eos_ids: Sequence[int] = (),
                backend: str = "auto", batch_samples: int = 0) -> Engine:
    """A slimpack checkpoint (or run directory: its newest) or a Hugging Face Llama directory."""
    path = Path(path)
    if is_slimpack_path(path):
        model, meta = load_slimpack_model(path, device=device, dtype=dtype, backend=backend)
        ckpt = Path(meta["path"])
        train_length = (meta.get("config") or {}).get("data", {}).get("seq_len")
        return slimpack_engine(model, name=f"{ckpt.parent.parent.name}/{ckpt.name}", train_length=train_length,
                               eos_ids=eos_ids, batch_samples=batch_samples, meta=meta)
    if (path / "config.json").is_file():
        return hf_engine(path, device=device, dtype=dtype, eos_ids=eos_ids, batch_samples=batch_samples)
    raise FileNotFoundError(f"{path} is neither a slimpack checkpoint (meta.json), a run directory "
                            f"(checkpoints/) nor a Hugging Face directory (config.json)")
