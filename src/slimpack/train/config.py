"""TrainConfig: the one frozen config of a training run, from configs/train/*.toml plus `--set` overrides.

Sections: `model` (which preset, which attention backend), `data` (shards, sequence and batch
sizes), `optim` (AdamW and the cosine schedule), `checkpoint`, `parallel` (FSDP2 switches),
`eval` (held-out loss), `log` (JSONL, console, wandb). Cross-field checks live in `__post_init__`
and say how to fix the value. The gradient accumulation is derived, never configured:
`global_batch_tokens / (world_size * micro_batch_size * seq_len)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimpack.config import load_config, parse_overrides


@dataclass(frozen=True)
class ModelSection:
    preset: str = "tinyllama-1.3b"   # a key of slimpack.model.transformer.PRESETS
    attention_backend: str = "auto"  # auto | varlen | cudnn | flash_attn | xformers | sdpa_ref


@dataclass(frozen=True)
class DataSection:
    path: str = ""                       # shard dataset (local directory or remote URL)
    seq_len: int = 2048
    global_batch_tokens: int = 4_194_304  # tokens per optimiser step, all ranks together
    micro_batch_size: int = 4            # sequences per rank per micro-step
    seed: int = 0
    num_workers: int = 0
    cache_dir: str | None = None         # local cache for remote shards
    # Remote reads (pipeline.LoaderConfig): tries, the longest wait between them, and the seconds an
    # attempt waits for a silent server, then a one-line error naming the URL.
    fetch_attempts: int = 10
    fetch_backoff_max_s: float = 30.0
    fetch_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.seq_len <= 0 or self.micro_batch_size <= 0:
            raise ValueError("data.seq_len and data.micro_batch_size must be positive")
        if self.global_batch_tokens <= 0:
            raise ValueError(f"data.global_batch_tokens={self.global_batch_tokens} must be positive "
                             f"(tokens per optimiser step, all ranks together, e.g. 4194304)")
        if self.global_batch_tokens % (self.micro_batch_size * self.seq_len):
            raise ValueError(
                f"data.global_batch_tokens={self.global_batch_tokens} is not a multiple of "
                f"micro_batch_size*seq_len={self.micro_batch_size * self.seq_len}; pick sizes whose "
                f"product divides it (for example global_batch_tokens=4194304 with 4x2048)")


@dataclass(frozen=True)
class OptimSection:
    lr: float = 4e-4                 # peak learning rate, reached at the end of warm-up
    min_lr: float = 4e-5             # end of the cosine
    warmup_steps: int = 2000         # optimiser steps of linear warm-up
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Decay applies to every matrix (attention, MLP, output). Norm gains and the token embedding do
    # not decay by default: shrinking a gain towards 0 or a rare token's row towards the origin is a
    # penalty with no regulariser behind it (OLMo, torchtitan do the same). Switches for the paper's
    # lit-gpt setting, which decays everything.
    decay_norms: bool = False
    decay_embeddings: bool = False
    grad_clip_norm: float = 1.0
    implementation: str = "auto"     # auto (fused on CUDA, foreach on CPU) | fused | foreach | for_loop

    def __post_init__(self) -> None:
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr} must lie in [0, optim.lr={self.lr}]")
        if self.warmup_steps < 0:
            raise ValueError("optim.warmup_steps must be >= 0")
        if not self.grad_clip_norm > 0:  # clip_grad_norm_(max_norm=0) zeroes every gradient
            raise ValueError(f"optim.grad_clip_norm={self.grad_clip_norm} must be positive (0 does not "
                             f"disable clipping, it zeroes the gradients; use e.g. 1e9 for no clipping)")
        if self.implementation not in ("auto", "fused", "foreach", "for_loop"):
            raise ValueError(f"optim.implementation={self.implementation!r}: choose auto, fused, foreach "
                             f"or for_loop")


@dataclass(frozen=True)
class CheckpointSection:
    every_steps: int = 1000      # save every N optimiser steps (0: only at the end and on SIGTERM)
    keep_last: int = 3           # keep the newest K complete checkpoints
    resume: str = "auto"         # auto: newest complete checkpoint in run_dir/checkpoints, if any |
                                 # none: start fresh (refuses if checkpoints exist) | a checkpoint path
    save_final: bool = True
    # Training waits only for a host copy of the state; a thread writes, hashes, renames and prunes
    # (checkpoint.AsyncCheckpointer). false: the whole save on the critical path.
    async_save: bool = True


RESHARD_MODES = ("step", "backward", "forward")


@dataclass(frozen=True)
class ParallelSection:
    dp_replicate: int = 1        # >1: hybrid sharding, shard within groups of world/dp_replicate
                                 # ranks (a node), replicate across groups
    mixed_precision: bool = True  # bf16 compute params, fp32 reduction, fp32 master (CUDA only)
    activation_checkpointing: bool = False
    compile: bool = False        # torch.compile each block
    # When FSDP2 gathers parameters and reduce-scatters gradients (slimpack.train.parallel):
    #   "step":     once per optimiser step: parameters stay gathered and gradients accumulate
    #               unreduced (fp32) across the step's micro-batches; costs the whole model's
    #               unsharded bf16 parameters + fp32 gradients per GPU (9 GB for the 1.3B model)
    #   "backward": gather once per micro-batch, reduce-scatter every micro-batch
    #   "forward":  also free each block after forward and gather it again in backward (least memory)
    reshard: str = "step"
    # The process groups' timeout once the first step is done (compile, first collectives): a rank
    # that hangs fails the job in minutes. Until then, and around checkpoint saves and evaluations
    # (rank 0 alone runs the NIAH sweep while the others wait), the start-up timeout of 30 minutes.
    step_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.step_timeout_s > 0:
            raise ValueError(f"parallel.step_timeout_s={self.step_timeout_s} must be positive (seconds a "
                             f"collective may wait for the slowest rank once training runs, e.g. 300)")
        if self.reshard not in RESHARD_MODES:
            raise ValueError(f"parallel.reshard={self.reshard!r}: choose one of {', '.join(RESHARD_MODES)} "
                             f"(step: fastest, most memory; forward: least memory)")


@dataclass(frozen=True)
class EvalSection:
    every_steps: int = 1000      # 0: never
    path: str | None = None      # held-out shard dataset; default: data.path with split below
    split: str = "validation"
    sequences: int = 64          # a fixed set: the first N sequences of the held-out stream
    position_buckets: int = 0    # >0: also the loss by position in N equal ranges (eval/positions.py)
    # Needle in a haystack (slimpack.eval.niah) every N training tokens, 0: never (the paper: every
    # 10B). A smaller sweep than `slimpack eval niah`: niah_samples prompts at each multiple of
    # niah_length_step up to data.seq_len, haystack from the held-out split above; rank 0 runs it
    # on a replica of the weights and writes RUN_DIR/eval/niah/step_NNNNNNNN.json (train/niah_sweep.py).
    niah_every_tokens: int = 0
    niah_samples: int = 50
    niah_length_step: int = 128
    niah_protocol: str = "paper"  # or "keyed" (slimpack's own; eval/niah.py)

    def __post_init__(self) -> None:
        if self.niah_protocol not in ("paper", "keyed"):
            raise ValueError(f"eval.niah_protocol={self.niah_protocol!r}: choose paper or keyed")
        if self.niah_every_tokens < 0 or self.niah_samples <= 0 or self.niah_length_step <= 0:
            raise ValueError(f"eval.niah_every_tokens={self.niah_every_tokens} must be >= 0 (0: off) and "
                             f"eval.niah_samples={self.niah_samples}, eval.niah_length_step="
                             f"{self.niah_length_step} positive")


@dataclass(frozen=True)
class LogSection:
    every_steps: int = 1         # console line every N steps (JSONL gets every step)
    wandb: bool = True           # offline unless wandb_mode says otherwise or WANDB_MODE is set
    wandb_mode: str = "offline"
    wandb_project: str = "slimpack"
    # Dense bf16 peak of one GPU for MFU, TFLOP/s; None: by the device's name (train/metrics.py),
    # and MFU null with a note for a device not in that table.
    peak_tflops: float | None = None


@dataclass(frozen=True)
class TrainSection:
    """Guards of a long run (slimpack.train.loop)."""
    # A step whose loss or global gradient norm is NaN or Inf is skipped (no optimiser or schedule
    # step); this many in a row stop the run (exit status 4, nothing saved).
    max_nonfinite_steps: int = 3
    # A loss above this factor times the median of the last `loss_spike_window` losses is recorded
    # as a spike in metrics.jsonl (a record, not an action).
    loss_spike_factor: float = 3.0
    loss_spike_window: int = 100
    # Python's garbage collector: after start-up the objects alive are frozen out of its scans and
    # automatic collection is off; a full collection runs every N optimiser steps, on every rank at
    # the same step, so a collection pause never makes one rank the others wait for. 0: Python's
    # automatic collection, untouched.
    gc_every_steps: int = 50

    def __post_init__(self) -> None:
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"train.max_nonfinite_steps={self.max_nonfinite_steps} must be >= 1 (the "
                             f"consecutive skipped steps that stop the run)")
        if not self.loss_spike_factor > 1 or self.loss_spike_window < 1:
            raise ValueError(f"train.loss_spike_factor={self.loss_spike_factor} must be > 1 and "
                             f"train.loss_spike_window={self.loss_spike_window} >= 1")
        if self.gc_every_steps < 0:
            raise ValueError(f"train.gc_every_steps={self.gc_every_steps} must be >= 0 (0: Python's "
                             f"automatic garbage collection)")


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/default"
    total_tokens: int = 1_000_000_000_000  # training length; max_steps = total_tokens / global_batch_tokens
    max_steps: int | None = None           # overrides total_tokens when set
    seed: int = 0                          # parameter init
    device: str = "auto"                   # auto | cuda | cpu
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogSection = field(default_factory=LogSection)
    train: TrainSection = field(default_factory=TrainSection)
    # Test hook: rank 0 sends itself SIGTERM during this optimiser step (1-based), so the run stops
    # and saves at its end (exercises the real handler).
    debug_sigterm_after_step: int | None = None
    # Test hook: rank 0's loss is made NaN on the first `debug_nonfinite_times` attempts at this
    # optimiser step (1-based; a skipped step is attempted again with the next batch).
    debug_nonfinite_step: int | None = None
    debug_nonfinite_times: int = 1

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device={self.device!r}: choose auto, cuda or cpu (torchrun's LOCAL_RANK "
                             f"picks the GPU)")
        if self.steps <= 0:
            raise ValueError(f"training has {self.steps} steps; raise total_tokens or max_steps")
        if self.steps < self.optim.warmup_steps:
            raise ValueError(f"max steps {self.steps} < optim.warmup_steps {self.optim.warmup_steps}; "
                             f"lower optim.warmup_steps")

    @property
    def steps(self) -> int:
        """Optimiser steps of the whole run."""
        if self.max_steps is not None:
            return self.max_steps
        return self.total_tokens // self.data.global_batch_tokens

    def grad_accum(self, world_size: int) -> int:
        per_micro = world_size * self.data.micro_batch_size * self.data.seq_len
        if self.data.global_batch_tokens % per_micro:
            raise ValueError(
                f"data.global_batch_tokens={self.data.global_batch_tokens} is not divisible by "
                f"world_size*micro_batch_size*seq_len={world_size}*{self.data.micro_batch_size}*"
                f"{self.data.seq_len}={per_micro}; change micro_batch_size or the number of GPUs")
        return self.data.global_batch_tokens // per_micro

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"--config {path}: no such file; pass a TOML file such as "
                                f"configs/train/debug-cpu.toml, or no --config for the defaults")
    return load_config(TrainConfig, path, parse_overrides(overrides or [], TrainConfig))
