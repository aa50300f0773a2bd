"""Per-step metrics: MFU arithmetic, a JSONL file in the run directory, wandb (offline by default).

FLOPs per trained token (forward + backward), the formula the paper and PaLM use:

    6 * (N - N_embedding) + 12 * layers * heads * head_dim * seq_len

N counts every parameter; N_embedding only the token embedding (a lookup, no FLOPs); the untied
output projection is a matmul and counts. The second term is attention's QK^T and AV over a full
causal window of `seq_len` (document masking does less work than this, so MFU by this formula is the
conventional, comparable figure). MFU = tokens/s per GPU * FLOPs per token / peak, with the dense
bf16 peak of an H100/H200 SXM, 989 TFLOP/s.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from slimpack.storage import write_atomic

H100_BF16_PEAK_FLOPS = 989e12

log = logging.getLogger(__name__)


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


class MetricsLogger:
    """Rank 0 only: appends one JSON line per record to RUN_DIR/metrics.jsonl, mirrors to wandb."""

    def __init__(self, run_dir: Path, *, config: dict[str, Any], run_id: str, use_wandb: bool,
                 wandb_mode: str, wandb_project: str, console_every: int, resume_step: int = 0) -> None:
        self.path = run_dir / "metrics.jsonl"
        _truncate_after(self.path, resume_step)
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
        if self.wandb is not None:
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


def _truncate_after(path: Path, step: int) -> None:
    """Drop records of steps after `step`: those a crashed run logged past its last checkpoint, which
    the resumed run is about to redo. Atomic and durable (`storage.write_atomic`)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line a kill cut short (without its newline)
            log.warning(f"{path}:{number}: dropping a torn record {line.strip()[:80]!r}")
            continue
        if record.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if keep != lines:
        write_atomic(path, "".join(keep).encode())  # durable: never an empty history after a crash


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
