"""The training loop: packed batches -> FSDP2 model -> chunked loss -> AdamW, with checkpoints and metrics.

    slimpack train --config configs/train/debug-cpu.toml [--set key=value ...]      # one process
    torchrun --nproc-per-node 8 -m slimpack.train --config configs/train/paper-2k.toml

One optimiser step = `grad_accum` micro-batches per rank. The loss is the sum of token losses over
all micro-batches of all ranks divided by the global count of valid labels (counted before the
forward passes, one all-reduce), so every token weighs the same whatever the packing, the
micro-batch size or the number of GPUs. FSDP averages gradients over ranks, so each rank scales its
loss by `world_size` to turn that average back into the sum the formula needs.

Stopping: SIGTERM (Slurm's pre-emption signal) or Ctrl-C (SIGINT) sets a flag; the ranks agree on it
at the end of the step (it rides in the loss all-reduce), save a checkpoint and return normally; the
command then exits 75 after SIGTERM (resumable: a Slurm script requeues on it) and 130 after Ctrl-C.
A second Ctrl-C aborts at once (a save in progress is never loaded: see checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from slimpack import __version__
from slimpack.provenance import git_sha
from slimpack.storage import write_atomic
from slimpack.train import checkpoint as ckpt
from slimpack.train.config import TrainConfig
from slimpack.train.ledger import (
    PositionLedger,
    counts_to_device,
    prune_history,
    step_segment_counts,
    write_position_frequency,
)
from slimpack.train.metrics import MetricsLogger, mfu, model_flops_per_token
from slimpack.train.optim import build_optimizer, lr_at, set_lr
from slimpack.train.parallel import Dist, all_reduce_sum, begin_micro_batch, init_distributed, parallelize

log = logging.getLogger(__name__)


@dataclass
class TrainReport:
    run_dir: str
    start_step: int
    end_step: int
    max_steps: int
    stopped_by_signal: bool
    losses: list[float]
    last_checkpoint: str | None
    val_loss: float | None
    stop_signal: str | None = None   # "SIGTERM" or "SIGINT" when stopped_by_signal
    stop_simulated: bool = False     # stopped by debug_sigterm_after_step's own SIGTERM and no other signal

    def summary(self) -> str:
        how = (f"stopped by {self.stop_signal} (checkpoint saved; --resume auto continues)"
               if self.stopped_by_signal else "finished")
        loss = f"loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f}" if self.losses else "no steps run"
        val = f", val loss {self.val_loss:.4f}" if self.val_loss is not None else ""
        return (f"train {how}: steps {self.start_step} -> {self.end_step} of {self.max_steps}, {loss}{val}; "
                f"checkpoint {self.last_checkpoint}; metrics {self.run_dir}/metrics.jsonl")


# ----------------------------------------------------------------------------- one step


def to_device(mb: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}


def micro_step_loss(model: nn.Module, mb: dict[str, Any], *, max_seqlen: int | None = None) -> torch.Tensor:
    """fp32 SUM of token losses of one (device) micro-batch."""
    from slimpack.train.loss import cross_entropy_sum

    hidden = model(mb["input_ids"], mb["position_ids"], mb["cu_seqlens"],
                   max_seqlen if max_seqlen is not None else mb["max_seqlen"])
    # After the root's forward FSDP2 leaves the root unsharded: `output.weight` is the full bf16 weight.
    return cross_entropy_sum(hidden, model.output.weight, mb["labels"])


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[dict[str, Any]], *,
               device: torch.device, world_size: int, grad_clip_norm: float,
               max_seqlen: int | None = None,
               reshard: str = "step") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward/backward over this rank's micro-batches, clip, step. Returns device tensors
    (this rank's loss sum, the global valid-label count, the total gradient norm); no host sync.
    `reshard` is the model's `parallel.reshard` (see `parallel.begin_micro_batch`)."""
    from slimpack.train.loss import count_valid

    local_valid = sum(count_valid(mb["labels"]) for mb in micro_batches)
    n_valid = all_reduce_sum(torch.tensor(float(local_valid), device=device))
    scale = world_size / n_valid.clamp(min=1.0)
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for i, mb in enumerate(micro_batches):
        begin_micro_batch(model, last=i == len(micro_batches) - 1, reshard=reshard)
        loss = micro_step_loss(model, to_device(mb, device), max_seqlen=max_seqlen)
        (loss * scale).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, n_valid, grad_norm


@torch.no_grad()
def evaluate(model: nn.Module, micro_batches: list[dict[str, Any]], device: torch.device,
             max_seqlen: int | None = None) -> tuple[float, int]:
    """Mean loss over a fixed held-out set (this rank's share; summed over ranks)."""
    from slimpack.train.loss import count_valid

    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for mb in micro_batches:
        total[0] += micro_step_loss(model, to_device(mb, device), max_seqlen=max_seqlen).double()
        total[1] += count_valid(mb["labels"])
    model.train()
    all_reduce_sum(total)
    return (total[0] / total[1].clamp(min=1)).item(), int(total[1].item())


def _position_buckets(model: nn.Module, val_set: list[dict[str, Any]], d: Dist, cfg: TrainConfig,
                      step: int, tokens: int) -> list[float | None]:
    """Validation loss by position (eval/positions.py), summed over ranks; rank 0 writes
    RUN_DIR/eval/positions/step_N.json. Returns the bucket means for metrics.jsonl."""
    from slimpack.eval.positions import curve_record, position_loss_sums, write_curve

    sums = all_reduce_sum(position_loss_sums(model, val_set, d.device, cfg.data.seq_len)).cpu().numpy()
    record = curve_record(sums[0], sums[1], step=step, tokens=tokens, buckets=cfg.eval.position_buckets,
                          source="training evaluation: packed validation windows, positions within documents")
    if d.rank == 0:
        write_curve(record, Path(cfg.run_dir) / "eval" / "positions")
    return [b["loss"] for b in record["buckets"]]


# ----------------------------------------------------------------------------- set-up


def build_model(cfg: TrainConfig, d: Dist) -> tuple[nn.Module, Any, int]:
    """Full model on the device with the same seed on every rank (identical weights whatever the
    world size), then sharded. Returns (model, ModelConfig, parameter count)."""
    from slimpack.train.model import Transformer, model_config

    mcfg = model_config(cfg.model.preset)
    torch.manual_seed(cfg.seed)
    with torch.device(d.device):
        model = Transformer(mcfg, attention_backend=cfg.model.attention_backend)
    model.init_weights()
    n_params = sum(p.numel() for p in model.parameters())
    parallelize(model, d.mesh, cfg.parallel, d.device)
    return model, mcfg, n_params


def build_loader(cfg: TrainConfig, d: Dist, *, path: str | None = None, split: str = "train",
                 global_batch_tokens: int | None = None, epochs: int | None = None) -> Any:
    from slimpack.pipeline import LoaderConfig, PackedLoader

    return PackedLoader(LoaderConfig(
        path or cfg.data.path, cfg.data.seq_len,
        global_batch_tokens or cfg.data.global_batch_tokens, cfg.data.micro_batch_size,
        rank=d.rank, world_size=d.world_size, seed=cfg.data.seed, num_workers=cfg.data.num_workers,
        split=split, epochs=epochs, cache_dir=cfg.data.cache_dir, fetch_attempts=cfg.data.fetch_attempts,
        fetch_backoff_max_s=cfg.data.fetch_backoff_max_s, fetch_timeout_s=cfg.data.fetch_timeout_s))


def build_val_set(cfg: TrainConfig, d: Dist) -> list[dict[str, Any]]:
    """The first `eval.sequences` sequences of the held-out split, split over ranks; fixed for the run."""
    per_step = d.world_size * cfg.data.micro_batch_size
    if cfg.eval.sequences % per_step:
        raise ValueError(f"eval.sequences={cfg.eval.sequences} must be a multiple of world_size*"
                         f"micro_batch_size={per_step}")
    try:
        loader = build_loader(cfg, d, path=cfg.eval.path, split=cfg.eval.split,
                              global_batch_tokens=cfg.eval.sequences * cfg.data.seq_len)
    except ValueError as err:
        raise ValueError(f"validation set: {err} (set eval.path / eval.split to a held-out split, or "
                         f"eval.every_steps=0 to train without validation)") from err
    return loader.micro_batches(0)


def _run_id(run_dir: Path) -> str:
    """Created once per run directory; a resumed run logs to the same wandb run."""
    path = run_dir / "run.json"
    if path.exists():
        return json.loads(path.read_text())["run_id"]
    run_id = uuid.uuid4().hex[:12]
    write_atomic(path, (json.dumps({"run_id": run_id}) + "\n").encode())  # never a torn run.json
    return run_id


def _resume_path(cfg: TrainConfig, root: Path) -> Path | None:
    mode = cfg.checkpoint.resume
    if mode == "auto":
        return ckpt.latest_checkpoint(root)
    if mode == "none":
        if ckpt.list_checkpoints(root):
            raise ValueError(f"{root} holds checkpoints and checkpoint.resume=none; use --resume auto "
                             f"to continue, or a new run_dir to start over")
        return None
    return Path(mode)


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class _StopFlag:
    """SIGTERM and SIGINT ask for a save and a stop at the end of the step; a second SIGINT (an
    impatient Ctrl-C) raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.signal: str | None = None  # the first one received
        self.received = 0
        self.simulated = 0  # SIGTERMs that debug_sigterm_after_step sent
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    @property
    def set(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signal == "SIGINT":
            raise KeyboardInterrupt
        self.received += 1
        if self.signal is None:
            self.signal = signal.Signals(signum).name
            if signum == signal.SIGINT:
                log.warning("Ctrl-C: saving a checkpoint at the end of this step (Ctrl-C again to abort "
                            "without saving)")

    def restore(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)


# ----------------------------------------------------------------------------- loop


def train(cfg: TrainConfig) -> TrainReport:
    d = init_distributed(cfg.device, dp_replicate=cfg.parallel.dp_replicate)
    is_main = d.rank == 0
    run_dir = Path(cfg.run_dir)
    ckpt_root = run_dir / "checkpoints"
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
        _run_id(run_dir)
    dist.barrier()
    run_id = _run_id(run_dir)

    loader = build_loader(cfg, d)  # first: a wrong data path fails before a 1.5B model is built
    model, mcfg, n_params = build_model(cfg, d)
    optimizer = build_optimizer(model, cfg.optim, d.device)
    grad_accum = cfg.grad_accum(d.world_size)
    if getattr(loader, "grad_accum", grad_accum) != grad_accum:
        raise RuntimeError(f"loader grad_accum {loader.grad_accum} != trainer's {grad_accum}")
    max_steps = cfg.steps
    # With compile on, pass the window length as max_seqlen: a valid upper bound for varlen kernels
    # (it only sizes the launch grid) that keeps one graph instead of one per distinct value.
    max_seqlen = cfg.data.seq_len if cfg.parallel.compile else None

    step, tokens_seen = 0, 0
    ledger = PositionLedger(cfg.data.seq_len)  # f(i) of the trained tokens (train/ledger.py)
    resume = _resume_path(cfg, ckpt_root)
    if resume is not None:
        def check_model(path: Path, saved: dict[str, Any]) -> None:
            saved_model = saved.get("model_config")
            if saved_model is not None and saved_model != dataclasses.asdict(mcfg):
                raise ValueError(f"{path} holds a different model ({saved_model}) than model.preset="
                                 f"{cfg.model.preset!r} builds ({dataclasses.asdict(mcfg)}); resume with the "
                                 f"preset it was trained with, or start a new run_dir")

        # auto: a corrupt newest checkpoint is set aside and the one before it loaded (see load_for_resume)
        resume, meta = ckpt.load_for_resume(resume, model, optimizer, check=check_model,
                                            fall_back=cfg.checkpoint.resume == "auto")
        loader.load_state_dict(meta["loader"])
        ledger.load(resume, meta.get("position_frequency"),
                    windows_per_step=cfg.data.global_batch_tokens // cfg.data.seq_len)
        step, tokens_seen = meta["step"], meta["tokens"]
        run_id = meta.get("run_id", run_id)
        if is_main:
            for aside in ckpt.set_aside_newer(ckpt_root, step):  # a rollback: see set_aside_newer
                log.info(f"set aside {aside} (newer than the resumed step {step})")
            prune_history(run_dir, step)
        dist.barrier()
        log.info(f"resumed from {resume} at step {step}")  # rank 0's, by the logging filter
    val_set = build_val_set(cfg, d) if cfg.eval.every_steps > 0 else []
    niah = None
    if cfg.eval.niah_every_tokens > 0:
        from slimpack.train.niah_sweep import TrainingSweep

        niah = TrainingSweep(cfg, mcfg, d.device, run_dir, is_main=is_main)

    logger = (MetricsLogger(run_dir, config=cfg.to_dict(), run_id=run_id, use_wandb=cfg.log.wandb,
                            wandb_mode=cfg.log.wandb_mode, wandb_project=cfg.log.wandb_project,
                            console_every=cfg.log.every_steps, resume_step=step) if is_main else None)
    log.info(f"model {cfg.model.preset}: {n_params:,} parameters; world {d.world_size} on {d.device.type}; "
             f"grad_accum {grad_accum} x micro_batch {cfg.data.micro_batch_size} x seq {cfg.data.seq_len}; "
             f"{max_steps} steps")
    flops_tok = model_flops_per_token(mcfg, n_params, cfg.data.seq_len)

    def save(at_step: int) -> Path:
        meta = {"tokens": tokens_seen, "loader": loader.state_dict(), "run_id": run_id,
                "schedule": {"step": at_step, "max_steps": max_steps,
                             "lr_next": lr_at(at_step, lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
                                              warmup_steps=cfg.optim.warmup_steps, max_steps=max_steps)},
                "world_size": d.world_size, "config": cfg.to_dict(), "model_config": dataclasses.asdict(mcfg),
                "slimpack_version": __version__, "git_sha": git_sha(), "saved_at": time.time()}
        ledger_bytes = ledger.to_bytes()
        meta["position_frequency"] = ledger.meta()
        if is_main:  # the run's history of f, kept when old checkpoints are pruned (plot reads it)
            write_position_frequency(run_dir, at_step, ledger_bytes)
        return ckpt.save_checkpoint(ckpt_root, at_step, model, optimizer, meta,
                                    keep_last=cfg.checkpoint.keep_last,
                                    extra_files={meta["position_frequency"]["file"]: ledger_bytes})

    stop = _StopFlag()
    losses: list[float] = []
    last_ckpt: Path | None = resume
    val_loss: float | None = None
    start_step = step
    stopping = False
    batches = None
    try:
        batches = iter(loader)
        while step < max_steps:
            t0 = time.perf_counter()
            micro_batches = next(batches)
            data_wait = time.perf_counter() - t0
            lr = lr_at(step, lr=cfg.optim.lr, min_lr=cfg.optim.min_lr, warmup_steps=cfg.optim.warmup_steps,
                       max_steps=max_steps)
            set_lr(optimizer, lr)
            loss_sum, n_valid, grad_norm = train_step(
                model, optimizer, micro_batches, device=d.device, world_size=d.world_size,
                grad_clip_norm=cfg.optim.grad_clip_norm, max_seqlen=max_seqlen, reshard=cfg.parallel.reshard)
            # Host numpy over the CPU micro-batches while the GPU runs the step just queued.
            segments = step_segment_counts(micro_batches, cfg.data.seq_len)
            step += 1
            tokens_seen += cfg.data.global_batch_tokens
            if cfg.debug_sigterm_after_step == step and is_main:
                stop.simulated += 1
                os.kill(os.getpid(), signal.SIGTERM)
            # One all-reduce carries the loss and the stop flag: all ranks stop at the same step.
            # The step's ledger segment counts ride along (float64: exact for counts below 2**53).
            stats = torch.cat([torch.stack([loss_sum.double(), torch.tensor(float(stop.set), dtype=torch.float64,
                                                                            device=d.device)]),
                               counts_to_device(segments, d.device)])
            all_reduce_sum(stats)
            # A step whose micro-batches hold no label (possible only with tiny windows) logs 0, not NaN.
            loss = (stats[0] / n_valid.double().clamp(min=1.0)).item()
            stopping = stats[1].item() > 0
            ledger.add_segments(np.rint(stats[2:].cpu().numpy()).astype(np.int64))
            dt = time.perf_counter() - t0
            losses.append(loss)
            if logger is not None:
                tps = cfg.data.global_batch_tokens / dt
                logger.log({"kind": "train", "step": step, "max_steps": max_steps, "loss": loss, "lr": lr,
                            "grad_norm": grad_norm.item(), "tokens": tokens_seen, "tokens_per_s": tps,
                            "tokens_per_s_per_gpu": tps / d.world_size,
                            # MFU is against a GPU's bf16 peak: meaningless on a CPU, so None there.
                            "mfu": mfu(tps / d.world_size, flops_tok) if d.device.type == "cuda" else None,
                            "data_wait_s": data_wait,
                            "step_time_s": dt, "peak_memory_gib": _peak_memory_gib(d.device),
                            **ledger.summary()})
            if val_set and (step % cfg.eval.every_steps == 0 or step == max_steps):
                val_loss, val_tokens = evaluate(model, val_set, d.device, max_seqlen)
                record = {"kind": "eval", "step": step, "val_loss": val_loss, "val_tokens": val_tokens}
                if cfg.eval.position_buckets:
                    record["val_loss_by_position"] = _position_buckets(model, val_set, d, cfg, step, tokens_seen)
                if logger is not None:
                    logger.log(record)
            if niah is not None and niah.due(tokens_seen - cfg.data.global_batch_tokens, tokens_seen):
                record = niah.run(model, step=step, tokens=tokens_seen)  # a collective; rank 0 evaluates
                if logger is not None:
                    logger.log(record)
                    log.info(f"step {step:>7} | niah effective length {record['niah_effective_length']} "
                             f"({record['niah_seconds']:.1f} s)")
            periodic = cfg.checkpoint.every_steps > 0 and step % cfg.checkpoint.every_steps == 0
            final = step == max_steps and cfg.checkpoint.save_final
            if periodic or final or stopping:
                last_ckpt = save(step)
                if is_main:
                    log.info(f"saved checkpoint {last_ckpt}")
            if stopping:
                break
    finally:
        stop.restore()
        # Stop the loader's feeder thread, workers and a remote root's downloads now, not whenever
        # garbage collection gets to them (an exception's traceback keeps this frame alive).
        if batches is not None:
            batches.close()
        loader.close()
        if logger is not None:
            logger.close()
    return TrainReport(run_dir=str(run_dir), start_step=start_step, end_step=step, max_steps=max_steps,
                       stopped_by_signal=stopping, losses=losses,
                       last_checkpoint=str(last_ckpt) if last_ckpt else None, val_loss=val_loss,
                       # another rank may have received the signal alone (the flag is all-reduced)
                       stop_signal=(stop.signal or "SIGTERM") if stopping else None,
                       stop_simulated=stop.received == stop.simulated > 0)


def main(argv: list[str] | None = None) -> int:
    """`python -m slimpack.train` / `torchrun -m slimpack.train`: same flags as `slimpack train`."""
    import argparse

    from slimpack.cli import run_handler
    from slimpack.train.cli import add_train_arguments, run_train

    parser = argparse.ArgumentParser(prog="slimpack.train", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    return run_handler("slimpack.train", run_train, args)
