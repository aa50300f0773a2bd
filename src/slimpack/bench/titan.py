"""torchtitan's Llama 3, trained as torchtitan trains it: the peer baseline of `slimpack bench train`.

torchtitan is the stack a user would pick instead of slimpack (FSDP2, per-block compile, its own
Llama with document masking). Its CLI trainer reads its own data, so the bench drives its parts on
slimpack's micro-batches, in the order and with the settings of its `Trainer` (0.2.x):

- model: `torchtitan.models.llama3` in the TinyLlama shape (FFN width set to ours through
  `multiple_of`; RoPE without Llama 3.1's scaling), initialised by its `init_weights`;
- attention: flex attention with the "block_causal" mask. A token attends to the earlier tokens of
  its own document, the documents being cut after each EOS id in the input (each row is a window,
  so windows are cut too). slimpack's documents all end in EOS, so the mask is slimpack's document
  mask. Not masked like ours: positions run on across a window's documents (RoPE is relative, so
  attention within a document is the same) and the label after an EOS is left to the labels (ours
  mark it -100, and the loss ignores it);
- `apply_compile` (each block compiled, fullgraph) and the loss compiled (its default components),
  then `apply_fsdp` (bf16 parameters, fp32 reduction, gradient division off) with its default
  cadence: blocks reshard after forward, gradients reduce-scattered every micro-batch;
- loss: cross-entropy summed in fp32 over the whole micro-batch's logits (no chunking) and divided
  by the step's labelled tokens; its `clip_grad_norm_` (1.0); AdamW, fused, over all parameters.

The 0.2 releases are the newest whose modules run on torch 2.11 (0.3.0 imports FSDP names that torch
2.11 does not have): `pip install 'slimpack[titan]'`.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import torch
import torch.distributed as dist

from slimpack.train.loss import count_valid

TESTED = "0.2.2"


def unavailable() -> str | None:
    """Why torchtitan's parts cannot be imported here (None when they can)."""
    try:
        from torchtitan.models.llama3.infra.parallelize import apply_fsdp  # noqa: F401
        from torchtitan.models.llama3.model.model import Transformer  # noqa: F401
    except Exception as err:  # ImportError, or a torch too old or new for this torchtitan
        return (f"torchtitan {TESTED} cannot be imported ({type(err).__name__}: {err}); "
                f"pip install 'slimpack[titan]'")
    return None


def version() -> str:
    return metadata.version("torchtitan")


class _Eos:
    """What `get_attention_masks` reads of a tokenizer."""

    def __init__(self, eos_id: int) -> None:
        self.eos_id = eos_id


def model_args(cfg: Any, *, seq_len: int, attention: str = "flex", eos_id: int = 0) -> Any:
    """torchtitan's model arguments for our ModelConfig `cfg`. Its FFN width is 8/3 x dim rounded up
    to `multiple_of`; ours is set directly, so `multiple_of` is ours (an optional multiplier first
    brings 8/3 x dim below it)."""
    from torchtitan.models.llama3.model.args import RoPEScalingArgs, TransformerModelArgs

    natural = int(2 * 4 * cfg.hidden_size / 3)
    return TransformerModelArgs(
        dim=cfg.hidden_size, n_layers=cfg.num_layers, n_heads=cfg.num_heads, n_kv_heads=cfg.num_kv_heads,
        vocab_size=cfg.vocab_size, multiple_of=cfg.intermediate_size,
        ffn_dim_multiplier=None if natural <= cfg.intermediate_size else cfg.intermediate_size / natural,
        norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        rope_scaling_args=RoPEScalingArgs(scaling_factor=1.0),  # 1.0: plain RoPE, as ours
        max_seq_len=seq_len, attn_type=attention,
        attn_mask_type="block_causal" if attention != "sdpa" else "causal", eos_id=eos_id)


def build(cfg: Any, device: torch.device, mesh: Any, *, seq_len: int, compile_blocks: bool,
          mixed_precision: bool, attention: str = "flex") -> tuple[Any, Any]:
    """(model, loss_fn), set up as torchtitan's trainer sets them up; seeded like ours."""
    from torchtitan.components.loss import cross_entropy_loss
    from torchtitan.config.job_config import Compile
    from torchtitan.models.llama3.infra.parallelize import apply_compile, apply_fsdp
    from torchtitan.models.llama3.model.model import Transformer

    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(model_args(cfg, seq_len=seq_len, attention=attention))
    width = model.layers["0"].feed_forward.w1.out_features
    if width != cfg.intermediate_size:
        raise ValueError(f"torchtitan's FFN width came out {width}, not {cfg.intermediate_size}")
    loss_fn = cross_entropy_loss
    if compile_blocks:
        compile_cfg = Compile(enable=True)
        apply_compile(model, compile_cfg)
        loss_fn = torch.compile(loss_fn, backend=compile_cfg.backend)
    dtype = torch.bfloat16 if mixed_precision and device.type == "cuda" else torch.float32
    apply_fsdp(model, mesh, param_dtype=dtype, reduce_dtype=torch.float32, pp_enabled=False)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    model.train()
    return model, loss_fn


def optimizer(model: Any) -> torch.optim.Optimizer:
    """torchtitan's default optimiser: AdamW over every parameter (fused on CUDA)."""
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=8e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                             fused=fused, foreach=None if fused else True)


def step(model: Any, opt: torch.optim.Optimizer, loss_fn: Any, micro_batches: list[dict[str, Any]], *,
         device: torch.device, seq_len: int, eos_id: int, attention: str = "flex") -> torch.Tensor:
    """One optimiser step as torchtitan's `Trainer.train_step`: the step's labelled tokens counted on
    the host first, then per micro-batch forward, summed loss / that count, backward; clip; step.
    Returns this rank's loss sum over the global count (summed over ranks: the mean token loss; a
    device tensor, no host sync)."""
    from torchtitan.distributed.utils import clip_grad_norm_

    labelled = torch.tensor(float(sum(count_valid(mb["labels"]) for mb in micro_batches)), device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(labelled)  # the global count, as its trainer divides by
    total = torch.zeros((), device=device)
    tokenizer = _Eos(eos_id)
    for mb in micro_batches:
        ids = mb["input_ids"].to(device, non_blocking=True).view(-1, seq_len)
        labels = mb["labels"].to(device, non_blocking=True).view(-1, seq_len)
        masks = model.get_attention_masks(input_batch=ids, tokenizer=tokenizer) if attention != "sdpa" else None
        pred = model(ids, attention_masks=masks)
        loss = loss_fn(pred, labels) / labelled
        del pred
        loss.backward()
        total += loss.detach()
    clip_grad_norm_(list(model.parameters()), 1.0, foreach=True)
    opt.step()
    opt.zero_grad()
    return total
