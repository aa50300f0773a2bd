"""Validate a shard dataset: every byte, every sample, every count, optionally the tokenization.

    slimpack shards validate DIR [--workers N] [--all-hashes] [--retokenize N] [--json FILE]

`validate_dataset` returns a `ValidationReport`; the CLI prints its summary and exits 0 when clean,
1 on any finding, 3 when the input is unusable (no `index.json`, no `slimpack.json`, unreadable
JSON; `slimpack.exitcodes`). Every finding names the check, the shard, the sample (and document)
and a fix.

Checks, per shard (in parallel over shards, one shard in memory per process):
  its name stays inside the dataset root (else nothing is read: `storage.member_path`); file
  present; stored size and hash; zstd decodes (a failure names the frame and block); raw size and
  hash; header sample count equals
  the index; offsets monotonic and in bounds; embedded config equals the index entry; columns are
  schema v1 (never pickle); every sample decodes; `invariants.sample_problems` on every sample,
  vectorised over runs of about 1 MB of consecutive samples, and sample by sample only when a
  run fails, so each finding names its sample.
Over the dataset: the index and each part's own index agree; no unlisted shard files; parts
missing or extra; every input of the tokenize job has a complete part; the manifest's totals,
per-part, per-split and per-source counts, per-sample token counts (`sample_tokens.npy`) and
fingerprint equal what the shards hold.
`--retokenize N` re-reads N random documents from the recorded input files and compares their ids
with a fresh tokenization. A report with damaged shards lists their parts and the commands that
repair them (delete the part directories, re-run the same tokenize command).

Hashes: by default each file is checked with the fastest algorithm its index entry records
(xxh3_64 when present, ~20 GB/s, so decompression bounds the speed); `--all-hashes` checks every
recorded algorithm (sha1 runs at ~1-2 GB/s).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shlex
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from slimpack import exitcodes
from slimpack.shards import mds, schema
from slimpack.shards.columns import column_layouts, gather, global_cu_seqlens, sample_runs
from slimpack.shards.invariants import sample_problems
from slimpack.storage import UnsafePathError, member_path

# Fastest first; an algorithm not listed here is tried after these.
HASH_PREFERENCE = ("xxh3_64", "xxh3_128", "xxh64", "xxh128", "xxh32", "md5", "sha1", "sha256",
                   "sha384", "sha512")
# Samples checked together on the fast path: enough to amortise a dozen numpy calls, small
# enough that the joined columns stay in cache for the checks (see BENCHMARKS.md).
_RUN_BYTES = 1 << 20
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


# Findings that mean a shard file is missing or its bytes are not those written.
_DAMAGE = frozenset({"missing_shard", "size", "hash", "decompress"})


class UnusableInputError(exitcodes.UnusableDatasetError):
    """The input cannot be validated (or described) at all: exit status 3, `exitcodes.UNUSABLE` (the
    CLI's one error path prints it)."""


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


class _Collector:
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


# ----------------------------------------------------------------------------- one shard


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


def pick_hashes(recorded: dict[str, str], all_hashes: bool) -> list[str]:
    algos = sorted(recorded, key=lambda a: HASH_PREFERENCE.index(a) if a in HASH_PREFERENCE else 99)
    return algos if all_hashes else algos[:1]


def _stored_name(entry: dict[str, Any]) -> str:
    try:
        return (entry.get("zip_data") or entry["raw_data"])["basename"]
    except (KeyError, TypeError, AttributeError):
        return "?"


def _check_columns(entry: dict[str, Any], out: _Collector, name: str) -> bool:
    """Schema v1 columns with safe encodings; False when the shard must not be decoded."""
    try:
        columns = dict(zip(entry["column_names"], entry["column_encodings"], strict=True))
    except (KeyError, TypeError, ValueError) as err:
        out.add("index", f"column names/encodings are malformed ({err!r})", shard=name)
        return False
    ok = True
    for col, enc in columns.items():
        if not schema.is_safe_encoding(enc):
            out.add("columns", f"column {col!r} uses encoding {enc!r} (pickle or unknown): "
                               "refusing to decode this shard", shard=name)
            ok = False
    for col, enc in schema.COLUMNS.items():
        if col not in columns and col != "doc_sources":
            out.add("columns", f"required column {col!r} is missing", shard=name)
            ok = False
        elif col in columns and columns[col] != enc and schema.is_safe_encoding(columns[col]):
            out.add("columns", f"column {col!r} is {columns[col]!r}, schema v1 says {enc!r}", shard=name)
            ok = False
    extra = sorted(set(columns) - set(schema.COLUMNS))
    if extra:
        out.add("columns", f"unknown column(s) {extra} (schema v1 has {sorted(schema.COLUMNS)})",
                shard=name)
    return ok


def _check_file(data: bytes, info: dict[str, Any], what: str, all_hashes: bool, out: _Collector,
                name: str) -> bool:
    """Size and hashes of `data` against an index file record (`raw_data` or `zip_data`)."""
    ok = True
    if len(data) != info.get("bytes"):
        out.add("size", f"{what} is {len(data):,} bytes, the index says {info.get('bytes')}", shard=name)
        ok = False
    recorded = info.get("hashes") or {}
    if not recorded:
        out.add("no_hashes", f"the index records no hash of the {what}: integrity is unverifiable",
                shard=name)
    for algo in pick_hashes(recorded, all_hashes):
        try:
            got = mds.hash_bytes(algo, data)
        except (ValueError, AttributeError):
            continue  # an algorithm this machine lacks; another recorded one is tried
        if got != recorded[algo]:
            out.add("hash", f"{algo} of the {what} is {got}, the index says {recorded[algo]}", shard=name)
            ok = False
        if not all_hashes:
            break
    return ok


def _parse_header(raw: bytes, entry: dict[str, Any], out: _Collector, name: str) -> bool:
    """Header count, offsets and embedded config; False when samples cannot be located."""
    if len(raw) < 8:
        out.add("header", f"{len(raw)} bytes is too short for an MDS header", shard=name)
        return False
    n = int(np.frombuffer(raw, np.uint32, 1)[0])
    if n != entry["samples"]:
        out.add("header", f"the shard header says {n:,} samples, the index says {entry['samples']:,}",
                shard=name)
        return False
    head = 4 * (n + 2)
    if head > len(raw):
        out.add("header", f"header claims {n:,} samples but the file ends at byte {len(raw):,}", shard=name)
        return False
    offsets = np.frombuffer(raw, np.uint32, n + 1, 4).astype(np.int64)
    steps = np.diff(offsets)
    if offsets[0] < head or np.any(steps < 0) or offsets[-1] != len(raw):
        k = int(np.argmax(steps < 0)) if np.any(steps < 0) else None
        detail = (f"offset of sample {k + 1} ({int(offsets[k + 1])}) is below sample {k}'s "
                  f"({int(offsets[k])})" if k is not None else
                  f"offsets span [{int(offsets[0])}, {int(offsets[-1])}], the data is "
                  f"[{head}, {len(raw)}]")
        out.add("header", f"sample offsets are not monotonic and in bounds: {detail}", shard=name)
        return False
    try:
        config = json.loads(raw[head:int(offsets[0])])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        out.add("shard_config", f"the embedded config is not JSON ({err})", shard=name)
        return False
    if not isinstance(config, dict):
        out.add("shard_config", "the embedded config is not a JSON object", shard=name)
        return False
    differ = sorted(k for k in config if k in entry and entry[k] != config[k])
    if differ:
        k = differ[0]
        out.add("shard_config", f"embedded config differs from the index entry in {differ}: "
                                f"{k} is {config[k]!r} in the shard, {entry[k]!r} in the index",
                shard=name)
    return True


def check_shard(root: str, index: int, entry: dict[str, Any], *, bos_id: int, eos_id: int,
                vocab_size: int, all_hashes: bool = False) -> ShardResult:
    """Every per-shard check on one index entry; never raises on bad data."""
    name = _stored_name(entry)
    start = time.perf_counter()
    res = ShardResult(index, name, schema.part_of(name))
    out = _Collector()
    try:
        res.decoded = _check_shard(Path(root), index, entry, res, out, bos_id=bos_id, eos_id=eos_id,
                                   vocab_size=vocab_size, all_hashes=all_hashes)
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # a malformed entry
        out.add("index", f"index entry {index} is malformed ({err!r})", shard=name)
    res.findings, res.suppressed = out.findings, dict(out.suppressed)
    res.seconds = time.perf_counter() - start
    return res


def _check_shard(root: Path, index: int, entry: dict[str, Any], res: ShardResult, out: _Collector,
                 *, bos_id: int, eos_id: int, vocab_size: int, all_hashes: bool) -> bool:
    name = res.name
    if entry.get("format") != "mds":
        out.add("index", f"format is {entry.get('format')!r}, not 'mds'", shard=name)
        return False
    columns_ok = _check_columns(entry, out, name)
    try:
        path = member_path(root, name, where=f"index.json shard {index}")
    except UnsafePathError as err:
        out.add("path", f"index.json names {err.name!r}, which {err.reason}; not read", shard=name)
        return False
    try:
        with open(path, "rb") as f:
            stored = f.read()
    except FileNotFoundError:
        out.add("missing_shard", f"listed in index.json but {path} does not exist", shard=name)
        return False
    except OSError as err:
        out.add("missing_shard", f"cannot read {path}: {err}", shard=name)
        return False
    res.stored_bytes = len(stored)
    zip_info, raw_info = entry.get("zip_data"), entry["raw_data"]
    if zip_info:
        _check_file(stored, zip_info, "compressed file", all_hashes, out, name)
        try:
            raw = mds.decompress(entry.get("compression") or "zstd", stored)
        except (zstandard.ZstdError, ValueError) as err:
            out.add("decompress", f"zstd decompression failed: {mds.zstd_damage(stored, err)}", shard=name)
            return False
    else:
        raw = stored
    res.raw_bytes = len(raw)
    _check_file(raw, raw_info, "raw (decompressed) shard", all_hashes, out, name)
    if not _parse_header(raw, entry, out, name) or not columns_ok:
        return False

    info = mds.ShardInfo(index, int(entry["samples"]), name, entry.get("compression"),
                         tuple(entry["column_names"]), tuple(entry["column_encodings"]),
                         tuple(entry["column_sizes"]), entry)
    try:
        shard = mds.Shard(raw, info, name)
    except mds.ShardFormatError as err:  # _parse_header passed, so this is unexpected; still a finding
        out.add("header", str(err), shard=name)
        return False
    fast = _vectorised_checks(shard, bos_id=bos_id, eos_id=eos_id, vocab_size=vocab_size)
    if fast is not None:
        res.sample_tokens, res.sample_docs, lengths, sources = fast
        if sources is not None:
            _count_sources(res, [sources], [lengths])
        res.sources_complete = True
        return True
    return _per_sample_checks(shard, res, out, bos_id=bos_id, eos_id=eos_id, vocab_size=vocab_size)


def _vectorised_checks(shard: mds.Shard, *, bos_id: int, eos_id: int, vocab_size: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None] | None:
    """Every sample check, vectorised over runs of consecutive samples (the fast path).

    Returns (tokens per sample, documents per sample, document lengths, document sources) when
    the shard is sound, None when anything is off: the per-sample path then says where. In each
    run, per-sample boundaries are checked first (each `cu_seqlens` runs from 0 to its sample's
    length), after which the samples' documents are exactly the documents of the run's
    concatenation, and `sample_problems` over the run is equivalent to it over each sample.
    """
    names = [n for n in ("tokens", "cu_seqlens", "doc_sources") if n in shard.info.names]
    try:
        lay = column_layouts(shard, names)
    except (mds.ShardFormatError, ValueError, TypeError):
        return None
    n_tok, n_cu = lay["tokens"].count, lay["cu_seqlens"].count
    n_src = lay["doc_sources"].count if "doc_sources" in lay else None
    if np.any(n_cu < 2) or (n_src is not None and np.any(n_src != n_cu - 1)):
        return None
    lengths, sources = [], []
    for a, b in sample_runs(np.diff(shard.offsets), _RUN_BYTES):
        tokens, cu = gather(lay["tokens"], a, b), gather(lay["cu_seqlens"], a, b)
        ends = np.cumsum(n_cu[a:b])
        if np.any(cu[ends - n_cu[a:b]] != 0) or np.any(cu[ends - 1].astype(np.int64) != n_tok[a:b]):
            return None
        doc_cu = global_cu_seqlens(cu, n_cu[a:b], n_tok[a:b])
        src = gather(lay["doc_sources"], a, b) if n_src is not None else None
        if sample_problems(tokens, doc_cu, bos_id=bos_id, eos_id=eos_id, vocab_size=vocab_size,
                           doc_sources=src):
            return None
        lengths.append(np.diff(doc_cu))
        sources.append(src)
    empty = np.zeros(0, np.int64)
    return (n_tok, n_cu - 1, np.concatenate([empty, *lengths]),
            np.concatenate(sources) if n_src is not None and sources else None)


def _count_sources(res: ShardResult, sources: list[np.ndarray], lengths: list[np.ndarray]) -> None:
    ids, inverse = np.unique(np.concatenate(sources), return_inverse=True)
    res.source_ids = ids
    res.source_docs = np.bincount(inverse, minlength=len(ids)).astype(np.int64)
    res.source_tokens = np.bincount(inverse, weights=np.concatenate(lengths),
                                    minlength=len(ids)).astype(np.int64)


def _per_sample_checks(shard: mds.Shard, res: ShardResult, out: _Collector, *, bos_id: int, eos_id: int,
                       vocab_size: int) -> bool:
    """Sample by sample, so every finding names its sample (the slow path, for bad shards)."""
    name = res.name
    n = len(shard)
    sample_tokens = np.zeros(n, np.int64)
    sample_docs = np.zeros(n, np.int64)
    sources, lengths = [], []
    decoded = True
    for k in range(n):
        try:
            s = shard.sample(k)
            tokens, cu = s["tokens"], s["cu_seqlens"]
            doc_sources = s.get("doc_sources")
            if tokens.ndim != 1 or cu.ndim != 1 or (doc_sources is not None and doc_sources.ndim != 1):
                raise ValueError("columns must be 1-D arrays")
        except (mds.ShardFormatError, ValueError, IndexError, KeyError, TypeError) as err:
            out.add("sample", f"does not decode ({err})", shard=name, sample=k)
            decoded = False
            continue
        problems = sample_problems(tokens, cu, bos_id=bos_id, eos_id=eos_id, vocab_size=vocab_size,
                                   doc_sources=doc_sources)
        for p in problems:
            out.add("sample", p, shard=name, sample=k)
        sample_tokens[k] = len(tokens)
        sample_docs[k] = max(len(cu) - 1, 0)
        if doc_sources is not None and not problems:
            sources.append(doc_sources)
            lengths.append(np.diff(cu.astype(np.int64)))
    res.sample_tokens, res.sample_docs = sample_tokens, sample_docs
    res.sources_complete = decoded and len(sources) == n
    if sources:
        _count_sources(res, sources, lengths)
    return decoded


def _check_shard_task(args: tuple) -> ShardResult:
    root, index, entry, kwargs = args
    return check_shard(root, index, entry, **kwargs)


# ----------------------------------------------------------------------------- the report


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


# ----------------------------------------------------------------------------- the dataset


def read_dataset_json(path: Path, what: str) -> Any:
    """A dataset's index.json or slimpack.json; `what` says why it is needed and how to fix it."""
    if not path.exists():
        raise UnusableInputError(f"{path} does not exist: {what}")
    try:
        return json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnusableInputError(f"{path} is not readable JSON ({err}): {what}") from err


def _run_shards(root: Path, entries: list[dict[str, Any]], kwargs: dict[str, Any], workers: int,
                progress: bool) -> Iterator[ShardResult]:
    from tqdm import tqdm

    tasks = [(str(root), i, e, kwargs) for i, e in enumerate(entries)]
    total = sum(int((e.get("zip_data") or e.get("raw_data") or {}).get("bytes") or 0)
                if isinstance(e, dict) else 0 for e in entries)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="validate", disable=not progress,
               dynamic_ncols=True)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                res = _check_shard_task(task)
                bar.update(res.stored_bytes)
                yield res
        else:
            with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
                for res in pool.imap_unordered(_check_shard_task, tasks):
                    bar.update(res.stored_bytes)
                    yield res
    finally:
        bar.close()


def validate_dataset(path: str | os.PathLike, *, workers: int = 1, all_hashes: bool = False,
                     retokenize: int = 0, seed: int = 0, progress: bool = False) -> ValidationReport:
    """Validate a local dataset directory; see the module docstring for the checks."""
    start = time.monotonic()
    root = Path(path)
    report = ValidationReport(str(root), all_hashes=all_hashes, workers=max(1, workers))
    try:
        _validate(root, report, workers=workers, all_hashes=all_hashes, retokenize=retokenize,
                  seed=seed, progress=progress)
    except UnusableInputError as err:
        report.unusable = str(err)
    report.seconds = time.monotonic() - start
    return report


def _validate(root: Path, report: ValidationReport, *, workers: int, all_hashes: bool,
              retokenize: int, seed: int, progress: bool) -> None:
    if not root.is_dir():
        raise UnusableInputError(f"{root} is not a local directory: point at a dataset directory "
                                 "(for remote shards, copy or mount them locally first)")
    index = read_dataset_json(root / schema.INDEX_FILENAME,
                       "no MDS index; point at a dataset directory or run `slimpack shards merge`")
    manifest = read_dataset_json(root / schema.MANIFEST_FILENAME,
                          "no slimpack manifest; run `slimpack shards merge DIR` on a complete dataset")
    if not isinstance(index, dict) or index.get("version") != schema.MDS_VERSION \
            or not isinstance(index.get("shards"), list):
        raise UnusableInputError(f"{root / schema.INDEX_FILENAME}: not an MDS v2 index "
                                 "(needs 'version': 2 and a 'shards' list)")
    try:
        bos, eos, vocab = int(manifest["bos_id"]), int(manifest["eos_id"]), int(manifest["vocab_size"])
    except (KeyError, TypeError, ValueError) as err:
        raise UnusableInputError(f"{root / schema.MANIFEST_FILENAME}: missing bos_id/eos_id/vocab_size "
                                 f"({err!r}); re-run `slimpack shards merge`") from err

    entries: list[dict[str, Any]] = index["shards"]
    out = _Collector()
    kwargs = {"bos_id": bos, "eos_id": eos, "vocab_size": vocab, "all_hashes": all_hashes}
    results: list[ShardResult] = [None] * len(entries)  # type: ignore[list-item]
    algos: set[str] = set()
    for res in _run_shards(root, entries, kwargs, workers, progress):
        results[res.index] = res
    for res in results:  # index order, whatever order the workers finished in
        report.findings.extend(res.findings)
        for k, v in res.suppressed.items():
            report.suppressed[k] = report.suppressed.get(k, 0) + v
    for e in entries:
        for key in ("zip_data", "raw_data"):
            rec = e.get(key) if isinstance(e, dict) else None
            if isinstance(rec, dict) and rec.get("hashes"):
                algos.update(pick_hashes(rec["hashes"], all_hashes))
    report.hash_algorithms = sorted(algos, key=lambda a: HASH_PREFERENCE.index(a)
                                    if a in HASH_PREFERENCE else 99)
    report.shards = len(entries)
    report.stored_bytes = sum(r.stored_bytes for r in results)
    report.raw_bytes = sum(r.raw_bytes for r in results)
    report.shard_seconds = sum(r.seconds for r in results)
    report.samples = sum(len(r.sample_tokens) for r in results if r.sample_tokens is not None)
    report.documents = sum(int(r.sample_docs.sum()) for r in results if r.sample_docs is not None)
    report.tokens = sum(int(r.sample_tokens.sum()) for r in results if r.sample_tokens is not None)

    _check_files(root, entries, out)
    _check_parts(root, entries, manifest, results, out)
    _check_inputs(root, manifest, out)
    _check_manifest(root, entries, manifest, results, out, report.notes)
    if retokenize > 0:
        from slimpack.shards.retokenize import check_retokenize

        report.retokenized = check_retokenize(root, manifest, entries, results, retokenize, seed=seed,
                                              out=out, notes=report.notes)
    report.findings.extend(out.findings)
    for k, v in out.suppressed.items():
        report.suppressed[k] = report.suppressed.get(k, 0) + v


def _check_files(root: Path, entries: list[dict[str, Any]], out: _Collector) -> None:
    """Shard files on disk that no index entry lists."""
    listed = set()
    for e in entries:
        for key in ("zip_data", "raw_data"):
            rec = e.get(key) if isinstance(e, dict) else None
            if isinstance(rec, dict) and "basename" in rec:
                listed.add(rec["basename"])
    for path in sorted(root.rglob("shard.*.mds*")):
        name = path.relative_to(root).as_posix()
        if path.is_file() and name not in listed and ".tmp" not in path.name:
            out.add("unlisted_shard", f"{name} is on disk but in no index entry", shard=name,
                    part=schema.part_of(name))


def _group_by_part(entries: list[dict[str, Any]]) -> dict[str | None, list[int]]:
    groups: dict[str | None, list[int]] = {}
    for i, e in enumerate(entries):
        groups.setdefault(schema.part_of(_stored_name(e)), []).append(i)
    return groups


def _check_parts(root: Path, entries: list[dict[str, Any]], manifest: dict[str, Any],
                 results: list[ShardResult], out: _Collector) -> None:
    """Parts listed vs present; each part's own index.json and stats.json vs the shards."""
    listed = manifest.get("parts") or {}
    groups = _group_by_part(entries)
    parts_dir = root / schema.PARTS_DIRNAME
    on_disk = {p.parent.relative_to(parts_dir).as_posix()
               for name in (schema.INDEX_FILENAME, schema.PART_STATS_FILENAME)
               for p in parts_dir.rglob(name)} if parts_dir.is_dir() else set()
    for part, rec in listed.items():  # a part with no documents has no shards: check it all the same
        if isinstance(rec, dict) and rec.get("shards") == 0 and part in on_disk:
            groups.setdefault(part, [])
    for part in sorted(set(listed) - set(groups)):
        where = "its directory is missing too" if part not in on_disk else "its directory exists"
        out.add("part", f"part {part} is in slimpack.json but no index.json entry lists its shards "
                        f"({where})", part=part)
    for part in sorted(p for p in groups if p is not None and p not in listed):
        out.add("part", f"index.json lists shards of part {part}, which slimpack.json does not list",
                part=part)
    for part in sorted(on_disk - set(listed) - {p for p in groups if p}):
        out.add("part", f"parts/{part}/ is on disk but in neither index.json nor slimpack.json "
                        "(an extra or unmerged part)", part=part)
    for part, idx in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if part is None:
            continue
        try:
            pdir = member_path(root, f"{schema.PARTS_DIRNAME}/{part}", where="index.json")
        except UnsafePathError:
            continue  # its shards' names are reported by the shard checks, and nothing is read
        try:
            pindex = json.loads((pdir / schema.INDEX_FILENAME).read_bytes())
            pentries = pindex["shards"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            out.add("part", f"parts/{part}/index.json is missing or malformed ({err!r})", part=part)
            continue
        mine = [entries[i] for i in idx]
        if [_strip_part(m, part) for m in mine] != pentries:
            out.add("index", f"parts/{part}/index.json differs from the merged index.json's entries for "
                             "this part", part=part)
        stats_path = pdir / schema.PART_STATS_FILENAME
        try:
            stats = json.loads(stats_path.read_bytes())
        except (OSError, ValueError) as err:
            out.add("part", f"parts/{part}/stats.json is missing or unreadable ({err!r}): the part is "
                            "incomplete", part=part)
            continue
        got = [results[i] for i in idx]
        if all(r.decoded for r in got):
            tokens = np.concatenate([r.sample_tokens for r in got]) if got else np.zeros(0, np.int64)
            docs = sum(int(r.sample_docs.sum()) for r in got)
            expect = stats.get("sample_tokens")
            if not isinstance(expect, list) or expect != tokens.tolist():
                out.add("part", f"parts/{part}/stats.json sample_tokens differ from the shards "
                                f"({_first_diff(expect, tokens)})", part=part)
            for key, value in (("documents", docs), ("tokens", int(tokens.sum())), ("samples", len(tokens)),
                               ("shards", len(got))):
                if stats.get(key) != value:
                    out.add("part", f"parts/{part}/stats.json says {key} = {stats.get(key)}, the shards "
                                    f"hold {value:,}", part=part)


def _check_inputs(root: Path, manifest: dict[str, Any], out: _Collector) -> None:
    """Every input of the job (the manifest's `inputs`, and `inputs.json` if a later run wrote
    it) has a complete part in the dataset: a merge after a failed part must not read as clean."""
    merged = manifest.get("parts") if isinstance(manifest.get("parts"), dict) else {}
    recorded = manifest.get("inputs") if isinstance(manifest.get("inputs"), dict) else {}
    for part, rec in sorted(recorded.items()):
        if part not in merged and isinstance(rec, dict):
            why = f"{rec.get('state')}: {rec['error']}" if rec.get("error") else rec.get("state")
            out.add("input", f"input {rec.get('path')} has no complete part ({why})", part=part)
    path = root / schema.INPUTS_FILENAME
    if not path.exists():
        return
    try:
        listed = {str(i["part"]): str(i["path"]) for i in json.loads(path.read_bytes())["inputs"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        out.add("input", f"{schema.INPUTS_FILENAME} is unreadable ({err!r})")
        return
    for part, source in sorted(listed.items()):
        if part not in merged and part not in recorded:
            out.add("input", f"input {source} (listed in {schema.INPUTS_FILENAME} by a later tokenize "
                             "run) is not in the merged dataset", part=part)


def _strip_part(entry: dict[str, Any], part: str) -> dict[str, Any]:
    e = json.loads(json.dumps(entry))
    prefix = f"{schema.PARTS_DIRNAME}/{part}/"
    for key in ("raw_data", "zip_data"):
        if isinstance(e.get(key), dict) and e[key].get("basename", "").startswith(prefix):
            e[key]["basename"] = e[key]["basename"][len(prefix):]
    return e


def _first_diff(expect: Any, got: np.ndarray) -> str:
    if not isinstance(expect, list):
        return f"recorded {type(expect).__name__}, not a list"
    if len(expect) != len(got):
        return f"{len(expect)} recorded samples, {len(got)} in the shards"
    k = int(np.argmax(np.asarray(expect, np.int64) != got))
    return f"first at sample {k}: recorded {expect[k]}, counted {int(got[k])}"


def _check_manifest(root: Path, entries: list[dict[str, Any]], manifest: dict[str, Any],
                    results: list[ShardResult], out: _Collector, notes: list[str]) -> None:
    """Totals, per-part, per-split and per-source counts, sample_tokens.npy and the fingerprint."""
    from slimpack.tokenize.merge import fingerprint

    def mismatch(what: str, recorded: Any, counted: Any, **where: Any) -> None:
        if recorded != counted:
            out.add("manifest", f"{what}: slimpack.json says {recorded}, the shards hold {counted}", **where)

    try:
        splits = {p: v["split"] for p, v in manifest["parts"].items()}
        fp = fingerprint(entries, manifest["tokenizer"]["sha256"], splits)
    except (KeyError, TypeError, AttributeError) as err:
        out.add("manifest", f"cannot recompute the fingerprint ({err!r})")
    else:
        mismatch("fingerprint", manifest.get("fingerprint"), fp)
    mismatch("shards", manifest.get("shards"), len(entries))
    mismatch("samples", manifest.get("samples"),
             sum(e["samples"] for e in entries if isinstance(e, dict) and isinstance(e.get("samples"), int)))

    # sample_tokens.npy: the loader trusts it, so it must equal the shards exactly.
    npy_name = str(manifest.get("sample_tokens_file") or schema.SAMPLE_TOKENS_FILENAME)
    complete = all(r.decoded for r in results)
    recorded_tokens = None
    try:
        npy = member_path(root, npy_name, where="slimpack.json sample_tokens_file")
        recorded_tokens = np.load(npy, allow_pickle=False)
    except UnsafePathError as err:
        out.add("path", f"slimpack.json's sample_tokens_file {err.name!r} {err.reason}; not read")
        npy = Path(npy_name)
    except (OSError, ValueError) as err:
        out.add("manifest", f"{npy.name} is missing or unreadable ({err})")
    if not complete:
        notes.append("not every shard decoded: document, token and per-sample counts were not "
                     "compared with slimpack.json (fix the findings above and re-run)")
    empty = np.zeros(0, np.int64)
    counted = np.concatenate([empty] + [r.sample_tokens for r in results if r.sample_tokens is not None])
    if complete and recorded_tokens is not None and (
            recorded_tokens.shape != counted.shape or np.any(recorded_tokens != counted)):
        out.add("manifest", f"{npy.name} differs from the shards' per-sample token counts "
                            f"({_first_diff(recorded_tokens.tolist(), counted)})")
    if not complete:
        return

    mismatch("documents", manifest.get("documents"), sum(int(r.sample_docs.sum()) for r in results))
    mismatch("tokens", manifest.get("tokens"), int(counted.sum()))

    parts = manifest.get("parts") or {}
    split_of = {p: v.get("split") for p, v in parts.items() if isinstance(v, dict)}
    per_part: dict[str, Counter[str]] = {}
    per_split: dict[str, Counter[str]] = {}
    per_source: dict[int, Counter[str]] = {}
    for r in results:
        c = per_part.setdefault(r.part or "", Counter())
        docs, toks = int(r.sample_docs.sum()), int(r.sample_tokens.sum())
        c.update(documents=docs, tokens=toks, samples=len(r.sample_tokens), shards=1)
        if r.part in split_of:
            per_split.setdefault(split_of[r.part], Counter()).update(documents=docs, tokens=toks, parts=0)
        if r.source_ids is not None:
            for sid, d, t in zip(r.source_ids.tolist(), r.source_docs.tolist(),
                                   r.source_tokens.tolist(), strict=True):
                per_source.setdefault(sid, Counter()).update(documents=d, tokens=t)
    for part, rec in sorted(parts.items()):
        got = per_part.get(part)
        if got is None or not isinstance(rec, dict):
            continue  # reported by _check_parts
        for key in ("documents", "tokens", "samples", "shards"):
            mismatch(f"part {part} {key}", rec.get(key), got[key], part=part)
    empty_parts = {p for p, v in parts.items() if isinstance(v, dict) and v.get("shards") == 0}
    for part in set(per_part) | empty_parts:  # a part with no documents still counts in its split
        if part in split_of:
            per_split.setdefault(split_of[part], Counter())["parts"] += 1
    for split, rec in sorted((manifest.get("per_split") or {}).items()):
        got = per_split.get(split, Counter())
        for key in ("documents", "tokens", "parts"):
            mismatch(f"split {split} {key}", rec.get(key), got[key])
    for split in sorted(set(per_split) - set(manifest.get("per_split") or {})):
        out.add("manifest", f"split {split} holds {per_split[split]['documents']:,} documents but "
                            "slimpack.json's per_split does not list it")

    names = {int(k): v for k, v in (manifest.get("sources") or {}).items()}
    per_source_rec = manifest.get("per_source") or {}
    if all(r.sources_complete for r in results):
        for sid in sorted(set(per_source) - set(names)):
            shards = [r.name for r in results if r.source_ids is not None and sid in r.source_ids]
            out.add("sources", f"source id {sid} ({per_source[sid]['documents']:,} documents) is not in "
                               f"slimpack.json's sources (first in {shards[0]})", shard=shards[0])
        for name, rec in sorted(per_source_rec.items()):
            sid = rec.get("id") if isinstance(rec, dict) else None
            got = per_source.get(sid, Counter())
            for key in ("documents", "tokens"):
                mismatch(f"source {name} {key}", rec.get(key) if isinstance(rec, dict) else None, got[key])
