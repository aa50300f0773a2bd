"""AdamW with decay/no-decay parameter groups and the cosine learning-rate schedule.

The schedule is a pure function of the optimiser step (0-based: the step about to be taken), so its
only state is the step counter the checkpoint already stores:

    step < warmup:      lr * (step + 1) / warmup                      (linear, never exactly 0)
    warmup <= step:     min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * p)),
                        p = min(1, (step - warmup) / (max_steps - warmup))

so the last warm-up step and the first cosine step both run at `lr`, and step `max_steps` (and
beyond) at `min_lr`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slimpack.train.config import OptimSection


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if max_steps <= warmup_steps:
        return min_lr
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, cfg: OptimSection) -> list[dict]:
    """Two groups: decayed matrices, and (by default) undecayed norm gains and token embedding."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = "tok_embeddings" in name
        is_norm = p.ndim < 2
        if (is_embedding and not cfg.decay_embeddings) or (is_norm and not cfg.decay_norms):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimSection, device: torch.device) -> torch.optim.AdamW:
    impl = cfg.implementation
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    # lr is set before every step from lr_at(); the value here only initialises the groups.
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
