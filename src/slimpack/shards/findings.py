"""What validate reports: the checks and their fixes (`HINTS`), a `Finding`, the `Collector` that
caps findings per check, and `ShardResult`, what one shard holds and what is wrong with it.

Shared by the per-shard checks (`shard_checks.py`), the dataset checks (`dataset_checks.py`),
`--retokenize` (`retokenize.py`) and the report (`validation_report.py`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

MAX_FINDINGS_PER_CHECK = 5  # per shard (or per dataset-level check); the rest are counted

# How a damaged shard is repaired. A re-run of tokenize skips every part whose stats.json exists
# and whose shards have their recorded sizes (it does not hash them: re-runs stay fast), so a
# same-size flip survives it until the part's directory is deleted.
_REDO_PART = ("delete the part's directory and re-run the same `slimpack tokenize` command (it redoes "
              "only parts that are gone or cut short, then merges; see 'repair' below), or re-copy the "
              "file from a good copy")

# check -> how to fix it. Every finding carries one of these codes.
HINTS: dict[str, str] = {
    "index": "the index is malformed: re-run `slimpack shards merge DIR` (or re-tokenize the part)",
    "path": "the index or manifest names a file outside the dataset root (absolute, '..', a symlink "
            "out, or an odd name), so nothing was read from it: this index was not written by "
            "slimpack or was altered; rebuild it from trusted parts (`slimpack shards merge DIR`) or "
            "discard the dataset",
    "missing_shard": f"the file is gone: {_REDO_PART}",
    "unlisted_shard": "a shard file no index lists: delete it, or re-run `slimpack shards merge` if "
                      "its part is complete",
    "size": f"the file is truncated or was overwritten: {_REDO_PART}",
    "hash": f"the bytes differ from those written: {_REDO_PART}",
    "no_hashes": "re-write the shards with hashes (slimpack writes sha1 and xxh3_64)",
    "decompress": f"the compressed file is corrupt: {_REDO_PART}",
    "header": f"the shard header disagrees with the index: {_REDO_PART}",
    "shard_config": "the shard's embedded config differs from its index entry: re-run the merge, "
                    "or re-tokenize the part",
    "columns": "slimpack reads only schema v1 columns (tokens ndarray:uint32, cu_seqlens "
               "ndarray:int32, doc_sources ndarray:uint32), never pickle: re-tokenize the data",
    "sample": f"the sample violates schema v1 (report it if slimpack wrote it): {_REDO_PART}",
    "part": "the part is missing, extra or incomplete: re-run `slimpack tokenize` for it, or delete "
            "the stray directory, then `slimpack shards merge DIR`",
    "input": "an input of the tokenize job has no complete part, so its documents are missing: fix "
             "(or drop) the input, then re-run `slimpack tokenize` with the job's inputs and --out; "
             "it redoes only the parts not complete, then merges",
    "manifest": "slimpack.json disagrees with the shards: re-run `slimpack shards merge DIR`; if it "
                "persists the shards themselves are wrong",
    "sources": "a document's source id is not in the manifest: re-run the merge or re-tokenize",
    "retokenize": "the shards do not hold what the tokenizer makes of the source today: check that "
                  "the input file, tokenizer and config are those recorded, then re-tokenize the part",
}


@dataclass(frozen=True)
class Finding:
    check: str  # a key of HINTS
    message: str
    shard: str | None = None  # stored basename, relative to the dataset root
    sample: int | None = None  # within the shard
    part: str | None = None

    @property
    def hint(self) -> str:
        return HINTS[self.check]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hint": self.hint}

    def line(self) -> str:
        where = self.shard or (f"part {self.part}" if self.part else "")
        if self.sample is not None:
            where += f" sample {self.sample}"
        return f"[{self.check}] {where + ': ' if where else ''}{self.message}"


class Collector:
    """Findings with at most MAX_FINDINGS_PER_CHECK kept per check; the rest are counted."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.suppressed: Counter[str] = Counter()
        self._count: Counter[str] = Counter()

    def add(self, check: str, message: str, **where: Any) -> None:
        self._count[check] += 1
        if self._count[check] > MAX_FINDINGS_PER_CHECK:
            self.suppressed[check] += 1
        else:
            self.findings.append(Finding(check, message, **where))


@dataclass
class ShardResult:
    """What one shard holds and what is wrong with it (returned by a worker)."""

    index: int
    name: str
    part: str | None
    stored_bytes: int = 0
    raw_bytes: int = 0
    findings: list[Finding] = field(default_factory=list)
    suppressed: dict[str, int] = field(default_factory=dict)
    decoded: bool = False  # every sample decoded (counts below are complete)
    seconds: float = 0.0  # spent checking this shard (in its process)
    sample_tokens: np.ndarray | None = None  # int64 per sample
    sample_docs: np.ndarray | None = None  # int64 per sample
    sources_complete: bool = False  # per-source counts cover every document
    source_ids: np.ndarray | None = None  # uint32, unique
    source_docs: np.ndarray | None = None  # int64, per source id
    source_tokens: np.ndarray | None = None  # int64, per source id
