"""Loss by position: the mean token loss at each position 0..L-1 of held-out documents.

    slimpack eval positions CHECKPOINT --data DIR [--split validation] [--seq-len L] [--max-documents N]
                            [--run-dir RUN_DIR | --out DIR] [--device auto]

The paper (arXiv 2410.18745) asks how far into its context a model still uses what it has read;
loss by position is the cheapest view of it. Only documents of at least L + 1 tokens are used
(their first L tokens are the inputs, the next L the labels), so every position averages the same
documents and a rise or fall along the curve is the model's, not a change in which documents
reach that far. Documents are taken in index order from the split (deterministic), each alone in
its own window starting at position 0: no packing, no truncated neighbour.

Writes `step_NNNNNNNN.json` (the curve, the documents used, buckets) and a PNG beside it into
`--out`, by default `RUN_DIR/eval/positions/` of the checkpoint's run (what `slimpack plot`
reads). The training loop's evaluation writes the same file (`eval.position_buckets`), from its
packed validation windows instead, where positions restart at every document (`source` says which).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimpack.eval.engines import load_slimpack_model, resolve_device
from slimpack.model.inference import forward_packed
from slimpack.model.transformer import ModelConfig
from slimpack.pipeline.index import load_index
from slimpack.pipeline.store import ShardStore
from slimpack.storage import write_atomic

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- the measurement


def position_loss_sums(model: nn.Module, micro_batches: list[dict[str, Any]], device: torch.device,
                       seq_len: int, *, chunk_tokens: int = 1024, string: Any = None) -> torch.Tensor:
    """(2, L) float64 on `device`: summed token loss and token count at each position id; with
    `string` (a `StringConfig`), through STRING's remapped positions (`eval.inference.forward_packed`).

    Logits are made `chunk_tokens` rows at a time (a 128K vocabulary makes whole-window logits
    large). Under FSDP the root stays unsharded after its forward, so `model.output.weight` is whole.
    """

    was_training = model.training
    model.eval()
    out = torch.zeros(2, seq_len, dtype=torch.float64, device=device)
    with torch.no_grad():
        _add_position_losses(model, micro_batches, device, out, chunk_tokens, string)
    model.train(was_training)
    return out


def _add_position_losses(model: nn.Module, micro_batches: list[dict[str, Any]], device: torch.device,
                         out: torch.Tensor, chunk_tokens: int, string: Any) -> None:
    for mb in micro_batches:
        mb = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}
        inputs = (mb["input_ids"], mb["position_ids"], mb["cu_seqlens"], mb["max_seqlen"])
        hidden = model(*inputs) if string is None else forward_packed(model, *inputs, string=string)
        weight = model.output.weight
        for start in range(0, hidden.shape[0], chunk_tokens):
            labels = mb["labels"][start:start + chunk_tokens]
            logits = (hidden[start:start + chunk_tokens] @ weight.T).float()
            loss = nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
            valid = labels != IGNORE_INDEX
            pos = mb["position_ids"][start:start + chunk_tokens][valid]
            out[0].index_add_(0, pos, loss[valid].double())
            out[1].index_add_(0, pos, torch.ones_like(pos, dtype=torch.float64))


def bucket_means(sums: np.ndarray, counts: np.ndarray, buckets: int) -> list[dict[str, Any]]:
    """Mean loss over equal position ranges [start, end) (token-weighted within a bucket)."""
    L = len(sums)
    edges = np.linspace(0, L, min(buckets, L) + 1).round().astype(int)
    out = []
    for a, b in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        n = float(counts[a:b].sum())
        out.append({"start": a, "end": b, "tokens": int(n), "loss": float(sums[a:b].sum() / n) if n else None})
    return out


def curve_record(sums: np.ndarray, counts: np.ndarray, *, step: int, tokens: int, source: str,
                 buckets: int = 16, **extra: Any) -> dict[str, Any]:
    """The JSON both writers produce (`slimpack plot` reads it): mean loss per position, None where
    no token."""
    mean = [float(s / c) if c else None for s, c in zip(sums.tolist(), counts.tolist(), strict=True)]
    return {"step": step, "tokens": tokens, "seq_len": len(sums), "source": source, **extra,
            "mean_loss": mean, "count": [int(c) for c in counts.tolist()],
            "buckets": bucket_means(sums, counts, buckets)}


def write_curve(record: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """`step_NNNNNNNN.json` and `.png` under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step_{record['step']:08d}.json"
    write_atomic(path, (json.dumps(record) + "\n").encode())
    png = path.with_suffix(".png")
    _plot_curve(record, png)
    return path, png


def _plot_curve(record: dict[str, Any], path: Path) -> None:

    import matplotlib  # the plots extra: training (which writes these records) does not need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.array([np.nan if v is None else v for v in record["mean_loss"]])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(np.arange(len(y)), y, linewidth=0.8, label="per position")
    for b in record["buckets"]:
        if b["loss"] is not None:
            ax.hlines(b["loss"], b["start"], b["end"] - 1, colors="red", linewidth=2)
    ax.set(xlabel="position in the document (tokens)", ylabel="mean token loss (nats)",
           title=f"Loss by position, step {record['step']:,} ({record['source']})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- held-out documents


def long_documents(data: str, *, split: str, seq_len: int, max_documents: int) -> tuple[list[np.ndarray], int, int]:
    """The first `max_documents` documents of `split` (index order) with at least L + 1 tokens, cut
    to L + 1; also how many such documents the split holds and its longest document."""
    index = load_index(data)
    if split not in index.split_names:
        raise ValueError(f"{data} has no {split!r} split (it has {list(index.split_names)}); tokenize a "
                         f"held-out split or pass --split")
    store = ShardStore(index, cache_dir=None, cache_limit_bytes=0, decoded_cache_bytes=1 << 30)
    docs, found, longest = [], 0, 0
    try:
        for sample in index.split_samples(split).tolist():
            tokens, cu = store.sample(sample)  # checked against the index's hash
            lengths = np.diff(cu)
            longest = max(longest, int(lengths.max()))
            for k in np.flatnonzero(lengths >= seq_len + 1).tolist():
                found += 1
                if len(docs) < max_documents:
                    docs.append(tokens[cu[k]:cu[k] + seq_len + 1].astype(np.int64))
    finally:
        store.close()
    if not docs:
        raise ValueError(f"{data}: no document of split {split!r} holds {seq_len + 1} tokens (L = {seq_len} "
                         f"inputs and the token after them); its longest has {longest:,}. Lower --seq-len "
                         f"or use a split with longer documents")
    return docs, found, longest


def document_batches(docs: list[np.ndarray], seq_len: int, per_batch: int) -> list[dict[str, Any]]:
    """Micro-batches of whole windows, one document each from position 0."""

    batches = []
    for i in range(0, len(docs), per_batch):
        chunk = np.stack(docs[i:i + per_batch])  # (k, L + 1)
        k = len(chunk)
        batches.append({
            "input_ids": torch.from_numpy(chunk[:, :-1].reshape(-1).copy()),
            "labels": torch.from_numpy(chunk[:, 1:].reshape(-1).copy()),
            "position_ids": torch.arange(seq_len).repeat(k),
            "cu_seqlens": torch.arange(0, (k + 1) * seq_len, seq_len, dtype=torch.int32),
            "max_seqlen": seq_len,
        })
    return batches


# ----------------------------------------------------------------------------- the command


def evaluate_positions(checkpoint: str | Path, data: str, *, split: str = "validation",
                       seq_len: int | None = None, max_documents: int = 64, per_batch: int = 4,
                       device: str = "auto", buckets: int = 16, string: Any = None) -> dict[str, Any]:
    """The loss-by-position record of one checkpoint (see the module docstring), with STRING when
    `string` (a `StringChoice`: its shift, or int(ratio x L) for auto) is given."""
    dev = resolve_device(device)
    model, meta = load_slimpack_model(checkpoint, device=dev)
    ckpt, mcfg = Path(meta["path"]), ModelConfig(**meta["model_config"])
    L = seq_len or int(meta.get("config", {}).get("data", {}).get("seq_len") or mcfg.max_seq_len)
    if not 0 < L <= mcfg.max_seq_len:
        raise ValueError(f"--seq-len {L} is beyond this model's maximum of {mcfg.max_seq_len} positions "
                         f"(model_config.max_seq_len of {ckpt}); use at most {mcfg.max_seq_len}")
    if max_documents < 1:
        raise ValueError(f"--max-documents must be >= 1, got {max_documents}")
    docs, found, longest = long_documents(data, split=split, seq_len=L, max_documents=max_documents)
    string_cfg = string.for_budget(L) if string is not None else None
    sums = position_loss_sums(model, document_batches(docs, L, per_batch), dev, L, string=string_cfg).cpu().numpy()
    return curve_record(sums[0], sums[1], step=int(meta["step"]), tokens=int(meta.get("tokens", 0)),
                        source=f"eval positions: {len(docs)} {split} documents of >= {L + 1} tokens",
                        buckets=buckets, checkpoint=str(ckpt), data=str(data), split=split,
                        documents=len(docs), documents_long_enough=found, longest_document=longest,
                        model_config=dataclasses.asdict(mcfg),
                        string=({**string.describe(), "shift_by_length": {str(L): string_cfg.shift if string_cfg
                                                                           else None}} if string else None))
