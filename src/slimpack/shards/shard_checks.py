"""Validate's checks of one shard, run in a worker process with one shard in memory.

Its name stays inside the dataset root (else nothing is read: `storage.member_path`); file present;
stored size and hash; zstd decodes (a failure names the frame and block); raw size and hash; header
sample count equals the index; offsets monotonic and in bounds; embedded config equals the index
entry; columns are schema v1 (never pickle); every sample decodes; `invariants.sample_problems` on
every sample, vectorised over runs of about 1 MB of consecutive samples, and sample by sample only
when a run fails, so each finding names its sample.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from slimpack.shards import mds, schema
from slimpack.shards.columns import column_layouts, gather, global_cu_seqlens, sample_runs
from slimpack.shards.findings import Collector, ShardResult
from slimpack.shards.invariants import sample_problems
from slimpack.storage import UnsafePathError, member_path

# Fastest first; an algorithm not listed here is tried after these.
# Fastest first; an algorithm not listed here is tried after these.
HASH_PREFERENCE = ("xxh3_64", "xxh3_128", "xxh64", "xxh128", "xxh32", "md5", "sha1", "sha256",
                   "sha384", "sha512")
# Samples checked together on the fast path: enough to amortise a dozen numpy calls, small
# enough that the joined columns stay in cache for the checks (see BENCHMARKS.md).
_RUN_BYTES = 1 << 20


def pick_hashes(recorded: dict[str, str], all_hashes: bool) -> list[str]:
    algos = sorted(recorded, key=lambda a: HASH_PREFERENCE.index(a) if a in HASH_PREFERENCE else 99)
    return algos if all_hashes else algos[:1]


def stored_name(entry: dict[str, Any]) -> str:
    try:
        return (entry.get("zip_data") or entry["raw_data"])["basename"]
    except (KeyError, TypeError, AttributeError):
        return "?"


def _check_columns(entry: dict[str, Any], out: Collector, name: str) -> bool:
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


def _check_file(data: bytes, info: dict[str, Any], what: str, all_hashes: bool, out: Collector,
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


def _parse_header(raw: bytes, entry: dict[str, Any], out: Collector, name: str) -> bool:
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
    name = stored_name(entry)
    start = time.perf_counter()
    res = ShardResult(index, name, schema.part_of(name))
    out = Collector()
    try:
        res.decoded = _check_shard(Path(root), index, entry, res, out, bos_id=bos_id, eos_id=eos_id,
                                   vocab_size=vocab_size, all_hashes=all_hashes)
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # a malformed entry
        out.add("index", f"index entry {index} is malformed ({err!r})", shard=name)
    res.findings, res.suppressed = out.findings, dict(out.suppressed)
    res.seconds = time.perf_counter() - start
    return res


def _check_shard(root: Path, index: int, entry: dict[str, Any], res: ShardResult, out: Collector,
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
    fast = vectorised_checks(shard, bos_id=bos_id, eos_id=eos_id, vocab_size=vocab_size)
    if fast is not None:
        res.sample_tokens, res.sample_docs, lengths, sources = fast
        if sources is not None:
            _count_sources(res, [sources], [lengths])
        res.sources_complete = True
        return True
    return per_sample_checks(shard, res, out, bos_id=bos_id, eos_id=eos_id, vocab_size=vocab_size)


def vectorised_checks(shard: mds.Shard, *, bos_id: int, eos_id: int, vocab_size: int
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


def per_sample_checks(shard: mds.Shard, res: ShardResult, out: Collector, *, bos_id: int, eos_id: int,
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


def check_shard_task(args: tuple) -> ShardResult:
    root, index, entry, kwargs = args
    return check_shard(root, index, entry, **kwargs)
