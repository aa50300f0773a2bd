"""Tokenize one input file into one part directory: documents -> blocks of whole documents -> MDS
shards, and the part's stats (its `stats.json`)."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from slimpack import __version__
from slimpack.shards import mds, schema
from slimpack.tokenize.config import TokenizeConfig, config_dict
from slimpack.tokenize.readers import BadRecord, InputFile, input_bytes, read_records
from slimpack.tokenize.tokenizer import Llama3Tokenizer


class BadRecordError(RuntimeError):
    """A bad record under `--on-bad-record fail`."""


class AllRecordsSkippedError(RuntimeError):
    """Every record of an input was skipped for one reason: a misnamed field or a file that is not
    JSON lines, not bad data to count (merging it would give an empty part that validates clean)."""


# How to fix an input whose every record was skipped for this reason.
_ALL_SKIPPED_FIXES = {
    "missing_text": "the text is in another field: re-run with --set tokenize.text_field=FIELD (one of the "
                    "fields above; a dotted path such as meta.text reaches a nested one)",
    "non_string_text": "the text field holds no strings: re-run with --set tokenize.text_field=FIELD naming "
                       "the field that holds the text",
    "empty_text": "the text field is empty in every record: re-run with --set tokenize.text_field=FIELD naming "
                  "the field that holds the text, or exclude the file",
}
_NOT_JSONL_FIX = "the file is not UTF-8 JSON lines of objects: check or re-create it, or exclude it"


# Text per encode call: big enough to amortise Python overhead, small enough to bound memory.
_ENCODE_BATCH_CHARS = 1 << 22


class _Blocks:
    """Groups documents into samples of whole documents of at least `block_tokens` tokens."""

    def __init__(self, writer: mds.ShardWriter, block_tokens: int) -> None:
        self.writer, self.block_tokens = writer, block_tokens
        self.docs: list[np.ndarray] = []
        self.sources: list[int] = []
        self.size = 0
        self.sample_tokens: list[int] = []

    def add(self, ids: np.ndarray, source: int) -> None:
        if len(ids) >= self.block_tokens and self.docs:
            self.flush()  # a document longer than the target is a block alone
        self.docs.append(ids)
        self.sources.append(source)
        self.size += len(ids)
        if self.size >= self.block_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.docs:
            return
        lengths = np.fromiter((len(d) for d in self.docs), np.int64, len(self.docs))
        cu = np.concatenate([[0], np.cumsum(lengths)])
        if cu[-1] >= 2**31:
            raise ValueError("a sample over 2**31 tokens cannot be indexed by int32 cu_seqlens")
        self.writer.write({
            "tokens": np.concatenate(self.docs),
            "cu_seqlens": cu.astype(np.int32),
            "doc_sources": np.asarray(self.sources, np.uint32),
        })
        self.sample_tokens.append(int(cu[-1]))
        self.docs, self.sources, self.size = [], [], 0


def tokenize_part(
    item: InputFile,
    cfg: TokenizeConfig,
    tokenizer: Llama3Tokenizer,
    part_dir: Path,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Tokenize one input into MDS shards under `part_dir`; returns the part's stats.

    `on_progress(bytes, tokens)` is called with increments. Raises `CorruptInputError`,
    `BadRecordError` or `AllRecordsSkippedError`; the caller owns cleanup.
    """
    writer = mds.ShardWriter(part_dir, columns=schema.COLUMNS, compression=cfg.compression,
                             hashes=cfg.hashes, size_limit=cfg.shard_size_limit)
    blocks = _Blocks(writer, cfg.block_tokens)
    skipped: Counter[str] = Counter()
    first_detail: dict[str, str] = {}
    examples: list[dict[str, Any]] = []
    sources: dict[str, dict[str, int]] = {}
    docs = tokens = surrogates = 0
    sha = hashlib.sha256()
    pending: list[tuple[str, str]] = []
    pending_chars = 0

    def on_bytes(n: int) -> None:
        if on_progress:
            on_progress(n, 0)

    def encode_pending() -> None:
        nonlocal docs, tokens, surrogates, pending, pending_chars
        encoded, replaced = tokenizer.encode_batch([t for t, _ in pending])
        surrogates += replaced
        for (_, source), ids in zip(pending, encoded):
            entry = sources.setdefault(source, {"id": schema.source_id(source), "documents": 0, "tokens": 0})
            entry["documents"] += 1
            entry["tokens"] += len(ids)
            blocks.add(ids, entry["id"])
        n = sum(len(ids) for ids in encoded)
        docs += len(encoded)
        tokens += n
        if on_progress:
            on_progress(0, n)
        pending, pending_chars = [], 0

    for rec in read_records(item, text_field=cfg.text_field, source_field=cfg.source_field,
                            default_source=cfg.default_source, on_bytes=on_bytes):
        if isinstance(rec, BadRecord):
            where = f"{item.path}:{rec.line}"
            if cfg.on_bad_record == "fail":
                raise BadRecordError(
                    f"{where}: {rec.reason} ({rec.detail}); fix the record, or re-run with "
                    "--on-bad-record skip to skip and count such records")
            skipped[rec.reason] += 1
            first_detail.setdefault(rec.reason, rec.detail[:300])
            if len(examples) < cfg.bad_examples:
                examples.append({"reason": rec.reason, "file": item.path, "line": rec.line,
                                 "detail": rec.detail[:200]})
            continue
        pending.append((rec.text, rec.source))
        pending_chars += len(rec.text)
        if pending_chars >= _ENCODE_BATCH_CHARS:
            encode_pending()
    if pending:
        encode_pending()
    if docs == 0 and len(skipped) == 1:
        (reason, n), = skipped.items()
        raise AllRecordsSkippedError(
            f"{item.path}: all {n:,} records were skipped as {reason} ({first_detail[reason]}); "
            + _ALL_SKIPPED_FIXES.get(reason, _NOT_JSONL_FIX))
    blocks.flush()
    index = writer.finish()
    if item.kind != "hf":
        with open(item.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                sha.update(chunk)
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "part": item.part,
        "split": item.split,
        "input": {"path": str(Path(item.path).absolute()), "kind": item.kind,
                  "bytes": input_bytes(item), "sha256": sha.hexdigest() if item.kind != "hf" else None},
        "documents": docs,
        "tokens": tokens,
        "samples": len(blocks.sample_tokens),
        "shards": len(index["shards"]),
        "sample_tokens": blocks.sample_tokens,
        "sources": dict(sorted(sources.items())),
        "skipped": dict(sorted(skipped.items())),
        "bad_examples": examples,
        "surrogates_replaced": surrogates,
        "tokenizer": tokenizer.identity,
        "config": config_dict(cfg),
        "slimpack_version": __version__,
    }
