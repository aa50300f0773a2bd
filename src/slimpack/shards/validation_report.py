"""`ValidationReport`: what `slimpack shards validate` found, its summary, JSON and exit status, and
the commands that repair damaged parts."""

from __future__ import annotations

import shlex
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from slimpack import exitcodes
from slimpack.shards import schema
from slimpack.shards.findings import Finding

# Findings that mean a shard file is missing or its bytes are not those written.
_DAMAGE = frozenset({"missing_shard", "size", "hash", "decompress"})


@dataclass
class ValidationReport:
    path: str
    findings: list[Finding] = field(default_factory=list)
    suppressed: dict[str, int] = field(default_factory=dict)
    unusable: str | None = None
    notes: list[str] = field(default_factory=list)
    shards: int = 0
    samples: int = 0
    documents: int = 0
    tokens: int = 0
    stored_bytes: int = 0
    raw_bytes: int = 0
    hash_algorithms: list[str] = field(default_factory=list)
    all_hashes: bool = False
    retokenized: int = 0
    workers: int = 1
    seconds: float = 0.0  # wall time, everything included
    shard_seconds: float = 0.0  # summed over processes: time spent in per-shard checks

    @property
    def mb_per_s_per_process(self) -> float:
        """Raw (decompressed) shard MB checked per second of one process."""
        return self.raw_bytes / 1e6 / self.shard_seconds if self.shard_seconds else 0.0

    @property
    def ok(self) -> bool:
        return self.unusable is None and not self.findings

    @property
    def exit_status(self) -> int:
        """0 clean, 1 findings, 3 unusable input (`slimpack.exitcodes`)."""
        return (exitcodes.UNUSABLE if self.unusable else exitcodes.FINDINGS if self.findings
                else exitcodes.OK)

    @property
    def damaged_parts(self) -> list[str]:
        """Parts with a shard that is missing or whose bytes are wrong: redo them to repair."""
        return sorted({schema.part_of(f.shard) for f in self.findings
                       if f.check in _DAMAGE and f.shard and schema.part_of(f.shard)})

    def repair_lines(self) -> list[str]:
        """Shell commands that repair the damaged parts (the tokenize re-run redoes exactly those)."""
        parts = self.damaged_parts
        if not parts:
            return []
        rm = " ".join(shlex.quote(f"{self.path}/{schema.PARTS_DIRNAME}/{p}") for p in parts)
        return [f"rm -r {rm}",
                f"slimpack tokenize <the same inputs and options> --out {shlex.quote(self.path)}"]

    def counts(self) -> dict[str, int]:
        c = Counter(f.check for f in self.findings)
        c.update(self.suppressed)
        return dict(sorted(c.items()))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["findings"] = [f.to_dict() for f in self.findings]
        d["finding_counts"] = self.counts()
        d["ok"], d["exit_status"] = self.ok, self.exit_status
        d["mb_per_s_per_process"] = self.mb_per_s_per_process
        d["damaged_parts"], d["repair"] = self.damaged_parts, self.repair_lines()
        return d

    def summary(self, max_lines: int = 30) -> str:
        if self.unusable:
            return f"validate {self.path}: UNUSABLE INPUT: {self.unusable}"
        # Below ~64 MB, process start-up and first-call costs dominate: no meaningful rate.
        rate = (f"{self.mb_per_s_per_process:,.0f} MB/s raw per process in the shard checks"
                if self.raw_bytes >= 64e6 else "too little data for a meaningful rate")
        lines = [
            f"validate {self.path}: {self.shards:,} shards, {self.samples:,} samples, "
            f"{self.documents:,} documents, {self.tokens:,} tokens",
            f"  {self.stored_bytes / 1e6:,.1f} MB stored, {self.raw_bytes / 1e6:,.1f} MB raw in "
            f"{self.seconds:.1f} s with {self.workers} process(es) ({rate}); "
            f"hashes checked: {', '.join(self.hash_algorithms) or 'none'}"
            + (f"; {self.retokenized} documents re-tokenized" if self.retokenized else ""),
        ]
        lines += [f"  note: {n}" for n in self.notes]
        if self.ok:
            lines.append("  OK: no findings")
            return "\n".join(lines)
        counts = self.counts()
        lines.append(f"  FINDINGS: {sum(counts.values()):,} ("
                     + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + ")")
        shown_hints: set[str] = set()
        for f in self.findings[:max_lines]:
            lines.append(f"  {f.line()}")
            if f.check not in shown_hints:
                shown_hints.add(f.check)
                lines.append(f"      fix: {f.hint}")
        if len(self.findings) > max_lines:
            lines.append(f"  ... {len(self.findings) - max_lines:,} more in the JSON report (--json)")
        repair = self.repair_lines()
        if repair:
            lines.append(f"  repair: {len(self.damaged_parts)} part(s) hold damaged shards; with the "
                         "inputs still at hand, delete them and re-tokenize (re-runs skip complete parts "
                         "without hashing them, so only the deleted ones are redone, then merged):")
            lines += [f"    {cmd}" for cmd in repair]
        return "\n".join(lines)

