"""Trainer GPU checks, run deliberately on a CUDA machine: `pytest -m gpu tests/train/test_gpu_train.py`.

FSDP2 mixed precision on CUDA keeps fp32 master weights while the loss sees the bf16 unsharded output
weight; the real train step (varlen attention, chunked loss, fused AdamW, clipping) lowers the loss;
per-block compile and activation checkpointing give the eager step's losses. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from slimpack.bench.train import synthetic_micro_batches
from slimpack.model.transformer import Transformer, model_config
from slimpack.train.config import OptimSection, ParallelSection
from slimpack.train.loop import micro_step_loss, to_device, train_step
from slimpack.train.optim import build_optimizer
from slimpack.train.parallel import init_distributed, parallelize

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def dist_cuda():
    d = init_distributed("cuda")
    yield d
    dist.destroy_process_group()


def _losses(d, parallel: ParallelSection, steps: int = 6) -> list[float]:
    cfg = model_config("small")
    torch.manual_seed(0)
    with torch.device(d.device):
        model = Transformer(cfg)
    parallelize(model, d.mesh, parallel, d.device)
    opt = build_optimizer(model, OptimSection(lr=3e-3), d.device)
    batch = next(synthetic_micro_batches(seq_len=512, micro_batch_size=4, vocab_size=cfg.vocab_size))
    out = []
    for _ in range(steps):  # the same batch every step: the loss must fall
        loss_sum, n_valid, _ = train_step(model, opt, [batch], device=d.device, world_size=1,
                                          grad_clip_norm=1.0, max_seqlen=512 if parallel.compile else None)
        out.append((loss_sum / n_valid).item())
    return out


def test_mixed_precision_master_weights_and_bf16_compute(dist_cuda):
    cfg = model_config("small")
    with torch.device(dist_cuda.device):
        model = Transformer(cfg)
    parallelize(model, dist_cuda.mesh, ParallelSection(), dist_cuda.device)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # sharded master weights
    batch = to_device(next(synthetic_micro_batches(seq_len=256, micro_batch_size=2,
                                                   vocab_size=cfg.vocab_size)), dist_cuda.device)
    loss = micro_step_loss(model, batch)
    assert model.output.weight.dtype == torch.bfloat16  # unsharded compute weight after forward
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)  # fp32 reduced gradients


def test_train_step_lowers_loss_and_compile_matches_eager(dist_cuda):
    eager = _losses(dist_cuda, ParallelSection())
    assert eager[-1] < eager[0] - 0.5
    compiled = _losses(dist_cuda, ParallelSection(compile=True, activation_checkpointing=True))
    assert compiled == pytest.approx(eager, rel=2e-2)
