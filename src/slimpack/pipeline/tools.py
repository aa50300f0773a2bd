"""Loader tools behind `slimpack pipeline digest|inspect`: library functions returning reports.

``digest_steps`` proves two machines or configurations see the same data: it builds every
simulated rank's micro-batches with a real ``PackedLoader`` (resumed at the start step by
``load_state_dict``), puts them back in global sequence order and hashes each step. The digest
depends only on the data order (dataset, split, seed, seq_len, global batch, locality), never on
world size, micro-batch size or workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from slimpack.pipeline.index import load_index
from slimpack.pipeline.loader import LoaderConfig, PackedLoader, step_digest


@dataclass
class DigestReport:
    fingerprint: str
    world_size: int
    micro_batch_size: int
    grad_accum: int
    epoch: dict[str, int]
    digests: list[tuple[int, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"step {step:08d} {digest}" for step, digest in self.digests]


def digest_steps(cfg: LoaderConfig, *, start_step: int, steps: int) -> DigestReport:
    """One digest per step over the step's global tokens, from every rank of ``cfg.world_size``."""
    index = load_index(cfg.path, retry=cfg.retry)
    loaders = []
    for rank in range(cfg.world_size):
        loader = PackedLoader(replace(cfg, rank=rank, epochs=None, max_tokens=None), index=index)
        state = loader.state_dict()
        loader.load_state_dict({**state, "step": start_step, "epoch": loader.stream.epoch_of(start_step)})
        loaders.append(iter(loader))
    report = DigestReport(fingerprint=loader.fingerprint, world_size=cfg.world_size,
                          micro_batch_size=cfg.micro_batch_size, grad_accum=loader.grad_accum,
                          epoch=loader.epoch_report())
    for step in range(start_step, start_step + steps):
        per_rank = [next(it) for it in loaders]
        report.digests.append((step, step_digest(per_rank)))
    for it in loaders:
        it.close()
    loader.close()
    return report


@dataclass
class Segment:
    """One cu_seqlens span of a micro-batch: a piece of one document inside one window."""

    begin: int
    end: int
    window: int
    starts_document: bool  # its first token is a document's BOS (else it continues one)
    ends_document: bool  # its last label is -100: the document's EOS is inside
    text: str


@dataclass
class InspectReport:
    step: int
    micro: int
    rank: int
    world_size: int
    seq_len: int
    micro_batch_size: int
    max_seqlen: int
    masked_labels: int
    segments: list[Segment]

    def lines(self, max_chars: int = 160) -> list[str]:
        out = [f"step {self.step} micro-batch {self.micro} of rank {self.rank}/{self.world_size}: "
               f"{self.micro_batch_size} x {self.seq_len} tokens, {len(self.segments)} segments "
               f"(cu_seqlens), max_seqlen {self.max_seqlen}, {self.masked_labels} labels -100"]
        window = -1
        for s in self.segments:
            if s.window != window:
                window = s.window
                first = window * self.seq_len
                out.append(f"=== window {window} (tokens {first}..{first + self.seq_len})")
            head = "<doc>" if s.starts_document else "<...continued>"
            tail = "</doc>" if s.ends_document else "<continues...>"
            text = s.text if len(s.text) <= max_chars else (
                s.text[:max_chars // 2] + " [...] " + s.text[-max_chars // 2:])
            out.append(f"  [{s.begin:6d}:{s.end:6d}] {head} {text!r} {tail}")
        return out


def inspect_micro_batch(loader: PackedLoader, step: int, micro: int = 0, *,
                        decode: Callable[[Sequence[int]], str] | None = None,
                        bos_id: int | None = None) -> InspectReport:
    """Split one micro-batch at its cu_seqlens and decode each piece."""
    if step < 0:
        raise ValueError(f"step {step} is negative; steps count from 0")
    if not 0 <= micro < loader.grad_accum:
        # micro >= grad_accum would silently show another step's (or rank's) sequences.
        raise ValueError(f"micro-step {micro} is outside [0, grad_accum={loader.grad_accum}) for this "
                         "layout; pick --micro below grad_accum, or change --micro-batch-size")
    mb: dict[str, Any] = loader.stream.micro_batch(step, micro)
    ids, labels, cu = mb["input_ids"], mb["labels"], mb["cu_seqlens"].astype(np.int64)
    bos = loader.index.manifest.get("bos_id") if bos_id is None else bos_id
    segments = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        piece = ids[a:b].tolist()
        segments.append(Segment(begin=a, end=b, window=a // loader.cfg.seq_len,
                                starts_document=piece[0] == bos, ends_document=bool(labels[b - 1] == -100),
                                text=decode(piece) if decode else " ".join(map(str, piece))))
    cfg = loader.cfg
    return InspectReport(step=step, micro=micro, rank=cfg.rank, world_size=cfg.world_size,
                         seq_len=cfg.seq_len, micro_batch_size=cfg.micro_batch_size,
                         max_seqlen=mb["max_seqlen"], masked_labels=int((labels == -100).sum()),
                         segments=segments)
