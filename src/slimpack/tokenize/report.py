"""`TokenizeReport`: what one node's run of the tokenize job did, and its summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TokenizeReport:
    out: str
    node_rank: int
    num_nodes: int
    parts_total: int
    parts_assigned: int
    ignored_files: list[str] = field(default_factory=list)
    parts_done: list[str] = field(default_factory=list)
    parts_skipped_complete: list[str] = field(default_factory=list)
    parts_failed: dict[str, str] = field(default_factory=dict)
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    skipped_records: dict[str, int] = field(default_factory=dict)
    bad_examples: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    merged: bool = False
    merge_note: str = ""
    merge_error: str = ""  # the merge ran and could not write its files (a full disk)
    report_error: str = ""  # this report could not be written under reports/

    @property
    def ok(self) -> bool:
        return not self.parts_failed and not self.merge_error

    def summary(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        lines = [
            f"tokenize: node {self.node_rank}/{self.num_nodes}: {len(self.parts_done)} parts done, "
            f"{len(self.parts_skipped_complete)} already complete, {len(self.parts_failed)} failed "
            f"(of {self.parts_assigned} assigned, {self.parts_total} in all)",
            f"  {self.documents:,} documents, {self.tokens:,} tokens from {self.input_bytes:,} input "
            f"bytes in {self.seconds:.1f} s ({rate:,.0f} tokens/s)",
        ]
        if self.skipped_records:
            reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(self.skipped_records.items()))
            lines.append(f"  skipped records: {reasons}")
            lines += [f"    e.g. {e['file']}:{e['line']}: {e['reason']} ({e['detail']})"
                      for e in self.bad_examples[:5]]
        if self.ignored_files:
            lines.append(f"  ignored {len(self.ignored_files)} file(s) (not a supported input, or "
                         "outside train/validation/test): "
                         + ", ".join(Path(f).name for f in self.ignored_files[:3]))
        for part, err in sorted(self.parts_failed.items()):
            lines.append(f"  FAILED part {part}: {err}")
        if self.merge_error:
            lines.append(f"  merge FAILED: {self.merge_error}")
        else:
            lines.append(f"  merged: {self.out}" if self.merged else f"  not merged: {self.merge_note}")
        if self.report_error:
            lines.append(f"  report not written: {self.report_error}")
        return "\n".join(lines)
