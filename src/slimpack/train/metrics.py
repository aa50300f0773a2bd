"""Per-step metrics: MFU arithmetic, a JSONL file in the run directory, wandb (offline by default).

FLOPs per trained token (forward + backward), the formula the paper and PaLM use:

    6 * (N - N_embedding) + 12 * layers * heads * head_dim * seq_len

N counts every parameter; N_embedding only the token embedding (a lookup, no FLOPs); the untied
output projection is a matmul and counts. The second term is attention's QK^T and AV over a full
causal window of `seq_len` (document masking does less work than this, so MFU by this formula is the
conventional, comparable figure). MFU = tokens/s per GPU * FLOPs per token / peak, with the dense
bf16 peak of the GPU the run is on, by its name (`peak_flops_for`); a GPU not in that table gets no
MFU (null) rather than a wrong one, unless `log.peak_tflops` (the trainer) or `--peak-tflops`
(`bench train`) gives its peak.

Goodput (`Goodput`): the share of the run's wall-clock time, over all its restarts, spent on steps
that count; the rest is itemised (start-up, compile, checkpoint stalls, evaluation, skipped
steps, steps recomputed after a resume, garbage collection).
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Any

from slimpack.storage import write_atomic

H100_BF16_PEAK_FLOPS = 989e12

# Dense bf16 tensor-core peak of one GPU (TFLOP/s, without sparsity) by a substring of
# torch.cuda.get_device_name(); the first match wins, so the specific names come first.
# "NVIDIA H100 80GB HBM3" is the SXM part; GH200's GPU is an H100/H200 SXM die.
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
)

log = logging.getLogger(__name__)


def peak_flops_for(device_name: str) -> float | None:
    """A GPU's dense bf16 peak in FLOP/s from its name, or None when the table does not know it."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None


def flops_per_token(*, params: int, embedding_params: int, num_layers: int, num_heads: int, head_dim: int,
                    seq_len: int) -> float:
    return 6 * (params - embedding_params) + 12 * num_layers * num_heads * head_dim * seq_len


def model_flops_per_token(model_cfg: Any, params: int, seq_len: int) -> float:
    """`model_cfg` is a ModelConfig; `params` the total parameter count."""
    return flops_per_token(params=params, embedding_params=model_cfg.vocab_size * model_cfg.hidden_size,
                           num_layers=model_cfg.num_layers, num_heads=model_cfg.num_heads,
                           head_dim=model_cfg.head_dim, seq_len=seq_len)


def mfu(tokens_per_s_per_gpu: float, flops_per_tok: float, peak_flops: float = H100_BF16_PEAK_FLOPS) -> float:
    return tokens_per_s_per_gpu * flops_per_tok / peak_flops


def environment(device: Any, *, world_size: int, attention_backend: str) -> dict[str, Any]:
    """What actually runs: versions, the GPUs, the resolved attention backend (not "auto")."""
    import torch

    from slimpack import __version__
    from slimpack.provenance import git_sha

    cuda = device.type == "cuda"
    nccl = None
    if cuda:
        try:
            version = torch.cuda.nccl.version()
            nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except (AttributeError, RuntimeError):
            pass
    return {"slimpack": __version__, "git_sha": git_sha(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "nccl": nccl, "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.machine()})",
            "gpus": world_size if cuda else 0, "world_size": world_size, "attention_backend": attention_backend}


class LossSpikes:
    """A loss above `factor` times the median of the last `window` losses is a spike (recorded, not
    acted on). Detection starts once the window is full."""

    def __init__(self, factor: float, window: int, history: list[float] = ()) -> None:
        self.factor = factor
        self.losses: deque[float] = deque(history, maxlen=window)

    def check(self, loss: float) -> tuple[bool, float | None]:
        """(is it a spike, the median it was compared with); then `loss` joins the window."""
        median = statistics.median(self.losses) if len(self.losses) == self.losses.maxlen else None
        self.losses.append(loss)
        return median is not None and loss > self.factor * median, median


class Goodput:
    """Wall-clock accounting of a run across its restarts (rank 0's clock).

    `counted` holds the seconds of steps that count: every step's time (data wait included) except
    the first of each start (compile, warm-up), skipped ones and those a resume recomputes. `lost`
    itemises the rest. The wall clock is each start's, from `train()`'s entry to its last record;
    the time between a crash and its last record, and the time a requeued job waits, are not seen.
    The state of earlier starts is read back from metrics.jsonl (`resume`)."""

    CATEGORIES = ("startup", "compile", "checkpoint", "eval", "skipped", "recomputed", "gc")

    def __init__(self, *, start: float | None = None, wall_before: float = 0.0, counted: float = 0.0,
                 lost: dict[str, float] | None = None) -> None:
        self.start = time.perf_counter() if start is None else start  # this start's perf_counter()
        self.wall_before = wall_before
        self.counted = counted
        self.lost = {c: 0.0 for c in self.CATEGORIES} | (lost or {})

    @classmethod
    def resume(cls, records: list[dict[str, Any]], step: int, *, start: float | None = None) -> Goodput:
        """From the records metrics.jsonl held before this start (in file order) and the step it
        resumes at: the train records past `step` are steps this start recomputes."""
        train = [r for r in records if r.get("kind") == "train"]
        kept = [r for r in train if r["step"] <= step]
        with_wall = [r for r in records if "wall_s" in r]
        if with_wall:
            last = with_wall[-1]
            wall = last["wall_s"] + max(r.get("time", 0) for r in records) - last["time"]
            lost = dict(last.get("lost_s", {}))
        else:  # written by a slimpack without goodput: its records' time span
            times = [r["time"] for r in records if "time" in r]
            wall, lost = (max(times) - min(times) if times else 0.0), {}
        lost["recomputed"] = lost.get("recomputed", 0.0) + sum(_counted(r) for r in train if r["step"] > step)
        return cls(start=start, wall_before=wall, counted=sum(_counted(r) for r in kept), lost=lost)

    def add(self, category: str, seconds: float) -> None:
        self.lost[category] += seconds

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.start

    def record(self) -> dict[str, Any]:
        wall = self.wall()
        return {"goodput": self.counted / wall if wall > 0 else None, "wall_s": wall,
                "lost_s": dict(self.lost)}

    def summary(self) -> str:
        wall = self.wall()
        if wall <= 0:
            return "goodput -"
        parts = ", ".join(f"{c} {100 * s / wall:.1f}%" for c, s in self.lost.items() if s > 0)
        lost = f" (lost: {parts})" if parts else ""
        return f"goodput {100 * self.counted / wall:.1f}% of {wall:,.0f} s wall-clock{lost}"


def _counted(record: dict[str, Any]) -> float:
    return record.get("counted_s", record.get("step_time_s", 0.0))


class MetricsLogger:
    """Rank 0 only: appends one JSON line per record to RUN_DIR/metrics.jsonl, mirrors to wandb.
    `previous` holds the records the file held before this start (all of them, in file order:
    Goodput.resume reads the ones the truncation drops too)."""

    def __init__(self, run_dir: Path, *, config: dict[str, Any], run_id: str, use_wandb: bool,
                 wandb_mode: str, wandb_project: str, console_every: int, resume_step: int = 0,
                 resume_batch: int | None = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.previous = _truncate_after(self.path, resume_step, resume_batch)
        self.file = open(self.path, "a")
        self.console_every = max(1, console_every)
        self.wandb = None
        self.wandb_sync_hint = None
        if use_wandb:
            self.wandb = _start_wandb(run_dir, config=config, run_id=run_id, mode=wandb_mode,
                                      project=wandb_project)
        if self.wandb is not None and self.wandb.settings.mode == "offline":
            # wandb ignores `resume` offline: every segment of a resumed run is its own
            # offline-run-<time>-<id> directory. `wandb sync --id` uploads them, oldest first, as one run.
            segments = f"{run_dir}/wandb/offline-run-*-{run_id}"
            self.wandb_sync_hint = (f"wandb is offline; upload every segment of this run as one run with: "
                                    f"wandb sync --id {run_id} -p {wandb_project} {segments}")

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        # A start record's step is the one resumed at, which wandb has already seen: metrics.jsonl only.
        if self.wandb is not None and record.get("kind") != "start":
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                           step=record.get("step"))
        if record.get("kind") == "train" and record["step"] % self.console_every == 0:
            log.info(_console_line(record))
        elif record.get("kind") == "eval":
            log.info(f"step {record['step']:>7} | val loss {record['val_loss']:.4f} "
                     f"({record['val_tokens']:,} tokens)")

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.wandb_sync_hint:
            print(self.wandb_sync_hint, flush=True)


def is_kept(record: dict[str, Any], step: int, batch: int | None = None) -> bool:
    """Does a resume at optimiser `step`, loader position `batch`, keep this record? A record of a
    skipped step carries the loader position after its batch ("batch"): a skip and the save at the
    same step may come in either order."""
    if "batch" in record and batch is not None:
        return record["batch"] <= batch
    return record.get("step", 0) <= step


def _truncate_after(path: Path, step: int, batch: int | None = None) -> list[dict[str, Any]]:
    """Drop records of steps after `step` (`is_kept`): those a crashed run logged past its last
    checkpoint, which the resumed run is about to redo. Atomic and durable (`storage.write_atomic`).
    Returns every readable record the file held, dropped ones included."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    keep, records = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line a kill cut short (without its newline)
            log.warning(f"{path}:{number}: dropping a torn record {line.strip()[:80]!r}")
            continue
        records.append(record)
        if is_kept(record, step, batch):
            keep.append(line if line.endswith("\n") else line + "\n")
    if keep != lines:
        write_atomic(path, "".join(keep).encode())  # durable: never an empty history after a crash
    return records


def _console_line(r: dict[str, Any]) -> str:
    # Per-GPU rate and MFU only where there are GPUs (the loop records mfu None on a CPU).
    gpu = (f" ({r['tokens_per_s_per_gpu']:,.0f}/gpu) | mfu {100 * r['mfu']:.1f}%"
           if r.get("mfu") is not None else "")
    return (f"step {r['step']:>7}/{r['max_steps']} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
            f"gnorm {r['grad_norm']:.3f} | {r['tokens_per_s']:,.0f} tok/s{gpu} | "
            f"data {1000 * r['data_wait_s']:.0f} ms | mem {r['peak_memory_gib']:.1f} GiB")


def _start_wandb(run_dir: Path, *, config: dict[str, Any], run_id: str, mode: str, project: str) -> Any:
    """wandb is optional: missing or failing, training goes on with the JSONL file alone."""
    import os

    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed (pip install 'slimpack[train]'); metrics go to metrics.jsonl only")
        return None
    try:
        return wandb.init(project=project, id=run_id, resume="allow", dir=str(run_dir), config=config,
                          mode=os.environ.get("WANDB_MODE", mode))
    except Exception as err:  # a wandb outage must not stop a training run
        log.warning(f"wandb.init failed ({err}); metrics go to metrics.jsonl only")
        return None
