"""GPU checks of the context-length instruments, run deliberately on a CUDA machine:
`pytest -m gpu tests/train/test_gpu_ledger.py`.

The ledger's counts reach the GPU for the loss all-reduce through a pinned, non-blocking copy and come
back exact; the loss by position under FSDP2 mixed precision (bf16 unsharded output weight after the
forward) adds up to the chunked training loss of the same batch. Skipped without CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from slimpack.bench.train import synthetic_micro_batches
from slimpack.eval.positions import position_loss_sums
from slimpack.model.transformer import Transformer, model_config
from slimpack.train.config import ParallelSection
from slimpack.train.ledger import counts_to_device, step_segment_counts
from slimpack.train.loop import micro_step_loss, to_device
from slimpack.train.parallel import init_distributed, parallelize

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def dist_cuda():
    d = init_distributed("cuda")
    yield d
    dist.destroy_process_group()


def test_counts_travel_exactly(dist_cuda):
    batches = synthetic_micro_batches(seq_len=2048, micro_batch_size=8, vocab_size=128_256)
    counts = step_segment_counts([next(batches) for _ in range(16)], 2048)
    on_gpu = counts_to_device(counts, dist_cuda.device)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float64
    back = np.rint(on_gpu.cpu().numpy()).astype(np.int64)
    assert back.tolist() == counts.tolist()


def test_loss_by_position_adds_up_to_the_training_loss_under_fsdp(dist_cuda):
    cfg = model_config("small")
    torch.manual_seed(0)
    with torch.device(dist_cuda.device):
        model = Transformer(cfg)
    parallelize(model, dist_cuda.mesh, ParallelSection(), dist_cuda.device)
    batch = next(synthetic_micro_batches(seq_len=512, micro_batch_size=4, vocab_size=cfg.vocab_size))
    sums = position_loss_sums(model, [batch], dist_cuda.device, 512).cpu()
    with torch.no_grad():
        model.eval()
        total = micro_step_loss(model, to_device(batch, dist_cuda.device)).item()
        model.train()
    assert sums[1].sum().item() == int((batch["labels"] != -100).sum())
    assert sums[0].sum().item() == pytest.approx(total, rel=1e-3)
