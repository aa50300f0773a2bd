"""The position-frequency ledger: how often a run has trained on each relative position.

The paper this project reproduces (arXiv 2410.18745, section 3) explains effective context length
by the relative-position frequency of the training data,

    f(i) = sum over (chunked) sequences s of max(|s| - i, 0),    0 <= i < L,

and finds that models reach an effective length of 1,280 when f(1280) reaches the same count. The
ledger keeps the exact f of the tokens a run has trained on, step by step.

What is counted: query-key pairs (q, k), q - k = i, inside one attention segment (the loader
restarts segments at every document and every window: `cu_seqlens`), *whose query has a label*.
The loader masks the label of a document's EOS (it would predict the next document's BOS), and
that EOS is the last token of its segment, so no later query reads it: its pairs carry no gradient
at all, in any layer. A segment of m tokens therefore counts m' = m - 1 if its last label is
masked (it ends at a document end) and m' = m otherwise (it ends at a window cut, where the last
input still predicts the next token of the same document), and adds max(m' - i, 0) at distance i.
So f(0) is the number of valid labels: the tokens the loss averages over. `slimpack shards stats`
counts the same pairs for one epoch of the train split (tested equal).

Beside it the ledger counts the windows trained on, N, which gives the curve of the same windows
*without* document masking, f_unmasked(i) = N (L - i): every window one causal segment of L
tokens, as a stack without document masking trains. The paper's statements (f(1280) of about
100B for an effective length of 1,280) are about its training sequences; docs/effective-context.md
says which curve they compare with and why.

Cost: per micro-batch one gather of the segments' last labels and a bincount of their lengths
(O(segments)); per step two suffix sums over L + 1 bins (O(L)). All numpy on the host, from the
micro-batches' CPU tensors: no GPU sync. Ranks count their own micro-batches; the loop sums the
step's segment counts over ranks inside the all-reduce it already does for the loss (one
collective, no extra host sync). Counts are int64 on the host (exact; they travel as float64,
exact below 2**53, and a step holds at most a few million segments).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from slimpack.shards.stats import distance_frequency, unmasked_distance_frequency

FILENAME = "position_frequency.npy"
IGNORE_INDEX = -100


def segment_lengths(cu_seqlens: np.ndarray, labels: np.ndarray, seq_len: int) -> np.ndarray:
    """Label-carrying query positions of each segment of one micro-batch (0..L)."""
    cu = np.asarray(cu_seqlens, np.int64)
    lengths = np.diff(cu)
    if len(lengths) and int(lengths.max()) > seq_len:
        raise ValueError(f"a segment of {int(lengths.max())} tokens is longer than seq_len {seq_len}")
    # Only a segment's last position can hold a masked label (packing.pack_slice): drop it there.
    return lengths - (np.asarray(labels)[cu[1:] - 1] == IGNORE_INDEX)


def step_segment_counts(micro_batches: list[dict[str, Any]], seq_len: int) -> np.ndarray:
    """(L + 2,) int64: c[m], m = 0..L, the segments with m label-carrying query positions over this
    rank's micro-batches of one step (CPU tensors or numpy arrays; one bincount for the step), then
    the number of windows of L tokens they hold."""
    lengths = [segment_lengths(_numpy(mb["cu_seqlens"]), _numpy(mb["labels"]), seq_len) for mb in micro_batches]
    tokens = sum(int(_numpy(mb["cu_seqlens"])[-1]) for mb in micro_batches)
    if tokens % seq_len:
        raise ValueError(f"micro-batches of {tokens} tokens are not whole windows of seq_len {seq_len}")
    counts = np.bincount(np.concatenate(lengths), minlength=seq_len + 1).astype(np.int64)
    return np.append(counts, tokens // seq_len)


def counts_to_device(segment_counts: np.ndarray, device: Any) -> Any:
    """float64 device tensor of the counts for the loop's all-reduce. On CUDA the copy is from pinned
    memory and non-blocking: a pageable copy would make the host wait for the queued step."""
    import torch

    t = torch.from_numpy(segment_counts.astype(np.float64))
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _numpy(x: Any) -> np.ndarray:
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


class PositionLedger:
    """Cumulative f(0..L-1) (int64) over every step trained so far; part of each checkpoint."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self.frequency = np.zeros(seq_len, np.int64)
        self.windows = 0  # windows of L tokens trained on (the unmasked curve is windows * (L - i))
        self.steps = 0  # steps added (from the run's start, across resumes)

    @property
    def unmasked(self) -> np.ndarray:
        """f(i) of the same windows without document masking."""
        return unmasked_distance_frequency(self.windows, self.seq_len)

    def add_segments(self, segment_counts: np.ndarray) -> None:
        """Add one step's `step_segment_counts` (c[0..L] and the windows), already summed over ranks."""
        c = np.asarray(segment_counts)
        if c.shape != (self.seq_len + 2,):
            raise ValueError(f"segment counts of shape {c.shape}, expected ({self.seq_len + 2},)")
        self.frequency += distance_frequency(c[:-1].astype(np.int64))
        self.windows += int(c[-1])
        self.steps += 1

    def summary(self) -> dict[str, float | int]:
        """A few numbers for metrics.jsonl: f at L/2, 3L/4 and L-1, masked and unmasked, and the
        masked share of pairs at i >= L/2."""
        f, u, L = self.frequency, self.unmasked, self.seq_len
        total = int(f.sum())
        return {"pf_half": int(f[L // 2]), "pf_three_quarters": int(f[3 * L // 4]), "pf_last": int(f[L - 1]),
                "pf_far_share": float(f[L // 2:].sum() / total) if total else 0.0,
                "pf_unmasked_half": int(u[L // 2]), "pf_unmasked_three_quarters": int(u[3 * L // 4]),
                "pf_unmasked_last": int(u[L - 1])}

    # ------------------------------------------------------------------ persistence

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.save(buf, self.frequency, allow_pickle=False)
        return buf.getvalue()

    def meta(self) -> dict[str, Any]:
        """What meta.json records about the array written beside it (`to_bytes()`)."""
        return {"file": FILENAME, "seq_len": self.seq_len, "steps": self.steps, "windows": self.windows,
                "counts": "query-key pairs whose query has a label",
                "unmasked": "windows * (seq_len - i): the same windows without document masking"}

    def load(self, checkpoint: str | Path, meta: dict[str, Any] | None, *, windows_per_step: int) -> None:
        """Restore from a checkpoint directory whose files `checkpoint.load_for_resume` has verified
        (the ledger is one of the files whose size and xxh3_128 meta.json records). A ledger saved
        before the window count was recorded gets steps x `windows_per_step` (every step trains the
        same number of windows)."""
        path = Path(checkpoint) / FILENAME
        if meta is None:
            raise ValueError(f"{checkpoint} has no position-frequency ledger (written before slimpack "
                             f"recorded it); resume from a newer checkpoint or start a new run_dir")
        if meta.get("seq_len") != self.seq_len:
            raise ValueError(f"{path} counts distances for seq_len {meta.get('seq_len')}, this run has "
                             f"data.seq_len={self.seq_len}; resume with the seq_len it was trained with")
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (meta.json records it); the checkpoint is "
                                    f"incomplete: resume from another checkpoint")
        frequency = np.load(path, allow_pickle=False)
        if frequency.dtype != np.int64 or frequency.shape != (self.seq_len,):
            raise ValueError(f"{path} holds {frequency.dtype} {frequency.shape}, expected int64 "
                             f"({self.seq_len},)")
        self.frequency = frequency
        self.steps = int(meta.get("steps", 0))
        self.windows = int(meta.get("windows", self.steps * windows_per_step))


def load_frequency(path: str | Path) -> np.ndarray:
    """A ledger array (checkpoint's or a run's history) as int64."""
    frequency = np.load(path, allow_pickle=False)
    if frequency.dtype != np.int64 or frequency.ndim != 1:
        raise ValueError(f"{path} holds {frequency.dtype} {frequency.shape}, not a position-frequency ledger")
    return frequency


# ----------------------------------------------------------------------------- the run's history

HISTORY_DIR = "position_frequency"  # RUN_DIR/position_frequency/step_NNNNNNNN.npy


def history_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / HISTORY_DIR / f"step_{step:08d}.npy"


def write_position_frequency(run_dir: str | Path, step: int, data: bytes) -> Path:
    """Keep the ledger of a checkpointed step in the run directory (16 KB at L = 2048): checkpoints
    are pruned to the newest few, the curve of f against training tokens needs them all."""
    from slimpack.storage import write_atomic

    path = history_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    return path


def prune_history(run_dir: str | Path, step: int) -> None:
    """Drop history newer than a resumed step: it belongs to the abandoned trajectory (as the
    metrics records the logger truncates)."""
    for path in (Path(run_dir) / HISTORY_DIR).glob("step_*.npy"):
        if int(path.stem.removeprefix("step_")) > step:
            path.unlink()


def read_history(run_dir: str | Path) -> list[tuple[int, np.ndarray]]:
    """(step, f) for every ledger in the run's history, by step."""
    found = []
    for path in (Path(run_dir) / HISTORY_DIR).glob("step_*.npy"):
        digits = path.stem.removeprefix("step_")
        if digits.isdigit():
            found.append((int(digits), load_frequency(path)))
    return sorted(found, key=lambda item: item[0])
