"""Distributed set-up and FSDP2, applied to the model from outside (the model knows nothing of it).

`init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...) or,
without it, makes a one-process group, so one code path serves `slimpack train` and `torchrun`.
`parallelize(model, ...)` applies, in this order: activation checkpointing and torch.compile per
block, then `fully_shard` per block and at the root; `begin_micro_batch(...)` sets, before each
micro-batch, when FSDP2 communicates (`parallel.reshard`).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from slimpack.ranks import TORCHRUN_LOCAL, rank_from_env
from slimpack.train.config import ParallelSection

# The process groups' timeout at start-up: model build, checkpoint load, compile and the first
# collectives may take minutes. After the first step the loop lowers it to parallel.step_timeout_s.
START_TIMEOUT_S = 30 * 60


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh


def init_distributed(device: str = "auto", *, dp_replicate: int = 1) -> Dist:
    """Process group + device mesh. NCCL on CUDA, gloo on CPU."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but CUDA is not available; use --set device=cpu")
    backend = "nccl" if use_cuda else "gloo"
    local_rank = rank_from_env((TORCHRUN_LOCAL,))[0] or 0
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=START_TIMEOUT_S)
        if rank_from_env()[0] is not None:  # torchrun's RANK
            dist.init_process_group(backend, timeout=timeout,
                                    device_id=dev if use_cuda else None)
        else:
            # `slimpack train` without torchrun: a group of one, no ports needed.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % dp_replicate:
        raise ValueError(f"parallel.dp_replicate={dp_replicate} does not divide world size {world}; "
                         f"set it to the number of nodes")
    if dp_replicate > 1:
        # Hybrid sharding: a 2-D mesh (replicate, shard). Parameters are sharded within a row (one
        # node: all-gathers and reduce-scatters stay on NVLink) and replicated across rows (one
        # all-reduce of the already-reduced shard per step crosses the slower inter-node network).
        mesh = init_device_mesh(dev.type, (dp_replicate, world // dp_replicate),
                                mesh_dim_names=("dp_replicate", "dp_shard"))
    else:
        mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp_shard",))
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=dev, mesh=mesh)


def parallelize(model: nn.Module, mesh: DeviceMesh, cfg: ParallelSection, device: torch.device, *,
                blocks: nn.ModuleList | None = None, compile_mode: str | None = None) -> nn.Module:
    """Wrap `model` in place and return it. `blocks` are its repeated decoder blocks (default
    `model.layers`; the benchmark passes Hugging Face's `model.model.layers` to wrap its Llama the
    same way). `compile_mode` is torch.compile's `mode` (None: its default; `bench train` measures
    others)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = model.layers if blocks is None else blocks
    for i, block in enumerate(blocks):
        if cfg.activation_checkpointing:
            # Whole-block recomputation: saves only each block's input, ~1/3 more compute. Non-
            # reentrant, so it composes with compile and FSDP2's hooks; RNG state is not preserved
            # because the model has no dropout.
            block = checkpoint_wrapper(block, preserve_rng_state=False)
        if cfg.compile:
            # Per block, not the whole model: the 22 blocks share one graph (compiled once), graph
            # breaks at FSDP's hooks between blocks are harmless, and compile time stays short.
            # nn.Module.compile() keeps parameter names unchanged (no `_orig_mod.` prefix).
            block.compile(mode=compile_mode)
        blocks[i] = block

    # bf16 parameters for compute (all-gathered in bf16: half the bytes), gradients reduced in fp32
    # (summing up to 16K ranks' bf16 gradients would lose bits), master weights and optimiser state
    # in fp32 (the sharded parameters keep their dtype). bf16 is for CUDA; on CPU the test config
    # turns it off and everything stays fp32.
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if cfg.mixed_precision and device.type == "cuda" else MixedPrecisionPolicy())
    for i, block in enumerate(blocks):
        # Each block is one all-gather/reduce-scatter unit, prefetched one block ahead. With
        # reshard="forward" a block is freed after forward and gathered again in backward (peak
        # memory ~2 unsharded blocks); the last block is used again first in backward, so it stays.
        last = i == len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard == "forward" and not last)
    # The root unit holds the embedding, final norm and output projection. It must stay unsharded
    # after forward (explicitly: newer torch only does so by default under reshard_after_forward=None):
    # the chunked loss then uses `model.output.weight`, the unsharded (bf16) parameter, right after
    # `model(...)` returns, and its gradient is reduced with the root's at the end of backward.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return model


def begin_micro_batch(model: nn.Module, *, last: bool, reshard: str) -> None:
    """Set FSDP2's communication for the micro-batch about to run (the `last` of its optimiser step).

    reshard="step": gradient accumulation without communication. Before the last micro-batch no
    reduce-scatter (nor HSDP all-reduce) runs; FSDP2 accumulates each block's unsharded gradient in
    fp32 (the reduce dtype) and keeps the gathered bf16 parameters, so a step costs one all-gather and
    one reduce-scatter per block however many micro-batches it has. After the last backward the
    parameters are freed: the optimiser changes the shards and the next step gathers them afresh.
    Other modes reduce-scatter every micro-batch (freeing the unsharded gradients) and, with hybrid
    sharding, all-reduce across nodes only after the last one, on the sum of them all.
    """
    if not hasattr(model, "set_requires_gradient_sync"):  # not an FSDP2 module
        return
    if reshard == "step":
        model.set_requires_gradient_sync(last)
        model.set_reshard_after_backward(last)
    else:
        model.set_requires_all_reduce(last)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def set_collective_timeout(seconds: float, mesh: DeviceMesh) -> None:
    """Every process group of the run (the world's and the device mesh's) waits at most `seconds`
    for a collective, from its next collective on. With gloo the waiting rank raises; with NCCL
    the watchdog aborts the process (a timed-out NCCL communicator cannot be trusted again)."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    timeout = datetime.timedelta(seconds=seconds)
    for group in {dist.group.WORLD, *mesh.get_all_groups()}:
        _set_pg_timeout(timeout, group)
