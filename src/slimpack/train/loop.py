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
import gc
import json
import logging
import math
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
from slimpack.exitcodes import CollectiveTimeoutError, NonFiniteStepsError
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
from slimpack.train.loss import CHUNK_TOKENS, count_valid, cross_entropy_sum
from slimpack.train.metrics import (
    Goodput,
    LossSpikes,
    MetricsLogger,
    environment,
    is_kept,
    mfu,
    model_flops_per_token,
    peak_flops_for,
)
from slimpack.train.optim import build_optimizer, lr_at, set_lr
from slimpack.train.parallel import (
    START_TIMEOUT_S,
    Dist,
    all_reduce_sum,
    begin_micro_batch,
    init_distributed,
    parallelize,
    set_collective_timeout,
)

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
    goodput: str | None = None       # Goodput.summary() (rank 0)

    def summary(self) -> str:
        how = (f"stopped by {self.stop_signal} (checkpoint saved; --resume auto continues)"
               if self.stopped_by_signal else "finished")
        loss = f"loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f}" if self.losses else "no steps run"
        val = f", val loss {self.val_loss:.4f}" if self.val_loss is not None else ""
        good = f"; {self.goodput}" if self.goodput else ""
        return (f"train {how}: steps {self.start_step} -> {self.end_step} of {self.max_steps}, {loss}{val}{good}; "
                f"checkpoint {self.last_checkpoint}; metrics {self.run_dir}/metrics.jsonl")


# ----------------------------------------------------------------------------- one step


def to_device(mb: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}


def micro_step_loss(model: nn.Module, mb: dict[str, Any], *, max_seqlen: int | None = None,
                    loss_chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """fp32 SUM of token losses of one (device) micro-batch (the loss kernel `loss_chunk_tokens` at a time)."""
    hidden = model(mb["input_ids"], mb["position_ids"], mb["cu_seqlens"],
                   max_seqlen if max_seqlen is not None else mb["max_seqlen"])
    # After the root's forward FSDP2 leaves the root unsharded: `output.weight` is the full bf16 weight.
    return cross_entropy_sum(hidden, model.output.weight, mb["labels"], chunk_tokens=loss_chunk_tokens)


def forward_backward(model: nn.Module, micro_batches: list[dict[str, Any]], *, device: torch.device,
                     world_size: int, grad_clip_norm: float, max_seqlen: int | None = None,
                     reshard: str = "step", poison: bool = False,
                     loss_chunk_tokens: int = CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward/backward over this rank's micro-batches, then clip: the gradients wait in `.grad`
    for the optimiser step. Returns device tensors (this rank's loss sum, the global valid-label
    count, the global gradient norm before clipping); no host sync. `reshard` is the model's
    `parallel.reshard` (see `parallel.begin_micro_batch`). `poison` makes the loss NaN (a test hook)."""
    local_valid = sum(count_valid(mb["labels"]) for mb in micro_batches)
    n_valid = all_reduce_sum(torch.tensor(float(local_valid), device=device))
    scale = world_size / n_valid.clamp(min=1.0)
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for i, mb in enumerate(micro_batches):
        begin_micro_batch(model, last=i == len(micro_batches) - 1, reshard=reshard)
        loss = micro_step_loss(model, to_device(mb, device), max_seqlen=max_seqlen,
                               loss_chunk_tokens=loss_chunk_tokens)
        if poison and i == 0:
            loss = loss * float("nan")
        (loss * scale).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    return loss_sum, n_valid, grad_norm


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[dict[str, Any]], *,
               device: torch.device, world_size: int, grad_clip_norm: float,
               max_seqlen: int | None = None, reshard: str = "step",
               loss_chunk_tokens: int = CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`forward_backward` then the optimiser step, unconditionally (the benchmark's and the tests'
    step; the training loop checks the step for non-finite values first). No host sync."""
    loss_sum, n_valid, grad_norm = forward_backward(model, micro_batches, device=device, world_size=world_size,
                                                    grad_clip_norm=grad_clip_norm, max_seqlen=max_seqlen,
                                                    reshard=reshard, loss_chunk_tokens=loss_chunk_tokens)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, n_valid, grad_norm


@torch.no_grad()
def evaluate(model: nn.Module, micro_batches: list[dict[str, Any]], device: torch.device,
             max_seqlen: int | None = None) -> tuple[float, int]:
    """Mean loss over a fixed held-out set (this rank's share; summed over ranks)."""
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
    from slimpack.model.transformer import Transformer, model_config

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
    """Ctrl-C and SIGTERM, from the start of `train` to its end.

    Start-up (model build, checkpoint load): Ctrl-C raises KeyboardInterrupt at once, as Python's
    own handler does, and is remembered, because a library may swallow it: pybind11 turns one raised
    while its extension module loads into an ImportError, which torch's optional imports catch (seen
    with triton's). `start_loop` raises it again. SIGTERM keeps its default action until then.

    The loop: SIGTERM and Ctrl-C ask for a save and a stop at the end of the step; a second Ctrl-C
    (an impatient one) raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.signal: str | None = None  # the first one received
        self.received = 0
        self.simulated = 0  # SIGTERMs that debug_sigterm_after_step sent
        self.in_loop = False
        self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._handle)}

    @property
    def set(self) -> bool:
        return self.signal is not None

    def start_loop(self) -> None:
        if self.signal == "SIGINT":  # raised during start-up and swallowed on its way out
            raise KeyboardInterrupt
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        self.in_loop = True

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and (self.signal == "SIGINT" or not self.in_loop):
            self.signal = "SIGINT"
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


def _json_float(x: float) -> float | str:
    """A float for metrics.jsonl: NaN and Inf as the strings "nan", "inf", "-inf" (strict JSON)."""
    return x if math.isfinite(x) else str(x)


def _resolved_backend(cfg: TrainConfig, device: torch.device) -> str:
    from slimpack.model.attention import resolve_backend

    dtype = torch.bfloat16 if cfg.parallel.mixed_precision and device.type == "cuda" else torch.float32
    return resolve_backend(cfg.model.attention_backend, torch.empty(0, device=device, dtype=dtype))


def train(cfg: TrainConfig) -> TrainReport:
    stop = _StopFlag()
    try:
        return _train(cfg, stop)
    finally:
        stop.restore()


def _train(cfg: TrainConfig, stop: _StopFlag) -> TrainReport:
    entered = time.perf_counter()
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
    env = environment(d.device, world_size=d.world_size, attention_backend=_resolved_backend(cfg, d.device))
    peak_flops = (cfg.log.peak_tflops * 1e12 if cfg.log.peak_tflops is not None
                  else peak_flops_for(env["device"]) if d.device.type == "cuda" else None)
    mfu_note = (None if peak_flops is not None else
                "MFU is against a GPU's bf16 peak: none on a CPU" if d.device.type != "cuda" else
                f"no bf16 peak known for {env['device']!r}: MFU is null; set log.peak_tflops to its "
                f"dense bf16 TFLOP/s")

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
                            console_every=cfg.log.every_steps, resume_step=step, resume_batch=loader.step)
              if is_main else None)
    previous = logger.previous if logger is not None else []
    goodput = Goodput.resume(previous, step, start=entered)
    kept = [r for r in previous if is_kept(r, step, loader.step)]
    spikes = LossSpikes(cfg.train.loss_spike_factor, cfg.train.loss_spike_window,
                        [r["loss"] for r in kept if r.get("kind") == "train"][-cfg.train.loss_spike_window:])
    skipped_total = sum(r.get("kind") == "skipped" for r in kept)
    log.info(f"model {cfg.model.preset}: {n_params:,} parameters; world {d.world_size} on {d.device.type}; "
             f"grad_accum {grad_accum} x micro_batch {cfg.data.micro_batch_size} x seq {cfg.data.seq_len}; "
             f"{max_steps} steps")
    log.info("running " + ", ".join(f"{k} {v}" for k, v in env.items()) + (f"; {mfu_note}" if mfu_note else ""))
    flops_tok = model_flops_per_token(mcfg, n_params, cfg.data.seq_len)
    saver = ckpt.AsyncCheckpointer() if cfg.checkpoint.async_save else None

    def save(at_step: int) -> Path:
        meta = {"tokens": tokens_seen, "loader": loader.state_dict(), "run_id": run_id,
                "schedule": {"step": at_step, "max_steps": max_steps,
                             "lr_next": lr_at(at_step, lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
                                              warmup_steps=cfg.optim.warmup_steps, max_steps=max_steps)},
                "world_size": d.world_size, "config": cfg.to_dict(), "model_config": dataclasses.asdict(mcfg),
                "slimpack_version": __version__, "git_sha": git_sha(), "environment": env,
                "saved_at": time.time()}
        ledger_bytes = ledger.to_bytes()
        meta["position_frequency"] = ledger.meta()
        if is_main:  # the run's history of f, kept when old checkpoints are pruned (plot reads it)
            write_position_frequency(run_dir, at_step, ledger_bytes)
        save_fn = saver.save if saver is not None else ckpt.save_checkpoint
        return save_fn(ckpt_root, at_step, model, optimizer, meta, keep_last=cfg.checkpoint.keep_last,
                       extra_files={meta["position_frequency"]["file"]: ledger_bytes})

    def timed(category: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """`fn(...)` under the start-up timeout (a save or rank 0's evaluation may outlast a step's),
        its time charged to `category`."""
        t = time.perf_counter()
        if step_timeout_on:
            set_collective_timeout(START_TIMEOUT_S, d.mesh)
        try:
            return fn(*args, **kwargs)
        finally:
            if step_timeout_on:
                set_collective_timeout(cfg.parallel.step_timeout_s, d.mesh)
            goodput.add(category, time.perf_counter() - t)

    losses: list[float] = []
    last_ckpt: Path | None = resume
    val_loss: float | None = None
    start_step = step
    stopping = False
    batches = None
    step_timeout_on = False  # parallel.step_timeout_s in force (after the first step, world > 1)
    poisoned, consecutive = 0, 0
    gc_every = cfg.train.gc_every_steps
    try:
        stop.start_loop()
        batches = iter(loader)
        if gc_every:  # start-up's objects (model, loader, caches) live for the run: out of the scans
            gc.collect()
            gc.freeze()
            gc.disable()
        goodput.add("startup", time.perf_counter() - entered)
        if logger is not None:
            logger.log({"kind": "start", "step": step, "environment": env, "config": cfg.to_dict(),
                        "resumed_from": str(resume) if resume else None, "peak_flops": peak_flops,
                        "mfu_note": mfu_note, "gc": {"every_steps": gc_every, "frozen": gc.get_freeze_count()},
                        **goodput.record()})
        first = True
        while step < max_steps:
            t0 = time.perf_counter()
            micro_batches = next(batches)
            data_wait = time.perf_counter() - t0
            lr = lr_at(step, lr=cfg.optim.lr, min_lr=cfg.optim.min_lr, warmup_steps=cfg.optim.warmup_steps,
                       max_steps=max_steps)
            set_lr(optimizer, lr)
            poison = (cfg.debug_nonfinite_step == step + 1 and poisoned < cfg.debug_nonfinite_times)
            poisoned += poison
            loss_sum, n_valid, grad_norm = forward_backward(
                model, micro_batches, device=d.device, world_size=d.world_size,
                grad_clip_norm=cfg.optim.grad_clip_norm, max_seqlen=max_seqlen, reshard=cfg.parallel.reshard,
                poison=poison and is_main)
            # Host numpy over the CPU micro-batches while the GPU runs the backward just queued.
            segments = step_segment_counts(micro_batches, cfg.data.seq_len)
            if cfg.debug_sigterm_after_step == step + 1 and is_main:  # seen by this step's all-reduce
                stop.simulated += 1
                os.kill(os.getpid(), signal.SIGTERM)
            # One all-reduce carries the loss and the stop flag: all ranks stop at the same step.
            # The step's ledger segment counts ride along (float64: exact for counts below 2**53).
            stats = torch.cat([torch.stack([loss_sum.double(), torch.tensor(float(stop.set), dtype=torch.float64,
                                                                            device=d.device)]),
                               counts_to_device(segments, d.device)])
            all_reduce_sum(stats)
            # The step's one host sync, before the optimiser step: it decides whether the step is
            # applied. Every value in it is global (all-reduced; clip_grad_norm_ reduced the norm), so
            # every rank decides alike. Why on the host: docs/DESIGN.md, "A long run".
            host = torch.cat([stats, torch.stack([grad_norm.detach().double(), n_valid.double()])]).cpu().numpy()
            # A step whose micro-batches hold no label (possible only with tiny windows) logs 0, not NaN.
            loss = float(host[0] / max(host[-1], 1.0))
            norm = float(host[-2])
            stopping = host[1] > 0
            finite = math.isfinite(loss) and math.isfinite(norm)
            if finite:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not finite:  # nothing changed: weights, optimiser state, schedule, ledger, token count
                consecutive += 1
                skipped_total += 1
                dt = time.perf_counter() - t0
                goodput.add("skipped", dt)
                log.warning(f"step {step + 1}: non-finite loss {loss} (gradient norm {norm}); skipped, "
                            f"no optimiser step ({consecutive} in a row, train.max_nonfinite_steps="
                            f"{cfg.train.max_nonfinite_steps})")
                if logger is not None:
                    logger.log({"kind": "skipped", "step": step + 1, "batch": loader.step, "loss": _json_float(loss),
                                "grad_norm": _json_float(norm), "consecutive": consecutive,
                                "skipped_steps": skipped_total, "step_time_s": dt, **goodput.record()})
                if consecutive >= cfg.train.max_nonfinite_steps:
                    if saver is not None:  # the checkpoint the message names is complete
                        saver.wait()
                    raise NonFiniteStepsError(
                        f"{consecutive} non-finite steps in a row (the last: step {step + 1}, loss {loss}, "
                        f"gradient norm {norm}); none was applied and nothing was saved: resume from "
                        f"{last_ckpt or 'the start'} with a lower optim.lr or another seed, or roll back "
                        f"with --resume PATH")
            else:
                consecutive = 0
                ledger.add_segments(np.rint(host[2:-2]).astype(np.int64))
                step += 1
                tokens_seen += cfg.data.global_batch_tokens
                dt = time.perf_counter() - t0
                if first:
                    goodput.add("compile", dt)  # the first step of a start: compile, warm-up
                else:
                    goodput.counted += dt
                losses.append(loss)
                spike, median = spikes.check(loss)
                if first and d.world_size > 1:
                    # Compile and the first collectives are done: from now on a rank that hangs
                    # fails the job within the step timeout.
                    set_collective_timeout(cfg.parallel.step_timeout_s, d.mesh)
                    step_timeout_on = True
                if logger is not None:
                    tps = cfg.data.global_batch_tokens / dt
                    logger.log({"kind": "train", "step": step, "max_steps": max_steps, "loss": loss, "lr": lr,
                                "grad_norm": norm, "tokens": tokens_seen, "tokens_per_s": tps,
                                "tokens_per_s_per_gpu": tps / d.world_size,
                                # MFU against the GPU's bf16 peak; null on a CPU or an unknown GPU.
                                "mfu": mfu(tps / d.world_size, flops_tok, peak_flops) if peak_flops else None,
                                "data_wait_s": data_wait,
                                "step_time_s": dt, "peak_memory_gib": _peak_memory_gib(d.device),
                                "loss_median": median, "loss_spike": spike, "skipped_steps": skipped_total,
                                "counted_s": 0.0 if first else dt, **goodput.record(),
                                **ledger.summary()})
                    if spike:
                        log.warning(f"step {step}: loss spike {loss:.4f}, above {cfg.train.loss_spike_factor} x "
                                    f"the median {median:.4f} of the last {cfg.train.loss_spike_window} steps")
                first = False
                if gc_every and step % gc_every == 0:
                    t = time.perf_counter()
                    gc.collect()
                    goodput.add("gc", time.perf_counter() - t)
                if val_set and (step % cfg.eval.every_steps == 0 or step == max_steps):
                    val_loss, val_tokens = timed("eval", evaluate, model, val_set, d.device, max_seqlen)
                    record = {"kind": "eval", "step": step, "val_loss": val_loss, "val_tokens": val_tokens}
                    if cfg.eval.position_buckets:
                        record["val_loss_by_position"] = timed("eval", _position_buckets, model, val_set, d, cfg,
                                                               step, tokens_seen)
                    if logger is not None:
                        logger.log(record)
                if niah is not None and niah.due(tokens_seen - cfg.data.global_batch_tokens, tokens_seen):
                    # a collective; rank 0 evaluates
                    record = timed("eval", niah.run, model, step=step, tokens=tokens_seen)
                    if logger is not None:
                        logger.log(record)
                        log.info(f"step {step:>7} | niah effective length {record['niah_effective_length']} "
                                 f"({record['niah_seconds']:.1f} s)")
            periodic = finite and cfg.checkpoint.every_steps > 0 and step % cfg.checkpoint.every_steps == 0
            final = finite and step == max_steps and cfg.checkpoint.save_final
            if periodic or final or stopping:
                last_ckpt = timed("checkpoint", save, step)
                if is_main:
                    log.info(f"saving checkpoint {last_ckpt}" if saver else f"saved checkpoint {last_ckpt}")
            if stopping:
                break
        if saver is not None:  # the last save is complete before the run reports it
            timed("checkpoint", saver.wait)
            if is_main and last_ckpt is not None and last_ckpt != resume:
                log.info(f"saved checkpoint {last_ckpt}")
    except RuntimeError as err:
        # gloo raises "Timed out waiting ..." in the rank still waiting (NCCL's watchdog aborts it).
        if not step_timeout_on or "timed out" not in str(err).lower():
            raise
        raise CollectiveTimeoutError(
            f"a collective waited more than parallel.step_timeout_s={cfg.parallel.step_timeout_s:g} s for "
            f"another rank at step {step + 1} (a rank hung or died): {str(err).splitlines()[0]}; resume "
            f"from the last checkpoint, {last_ckpt or 'none yet'} (--resume auto; the Slurm script "
            f"requeues on this exit status)") from err
    finally:
        if gc_every:
            gc.unfreeze()
            gc.enable()
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
                       stop_simulated=stop.received == stop.simulated > 0,
                       goodput=goodput.summary() if is_main else None)

