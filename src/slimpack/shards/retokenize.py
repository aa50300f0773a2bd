"""`validate --retokenize N`: compare N random documents in the shards with a fresh tokenization.

A part's documents are the good records of its input file, in file order (bad records are
skipped and counted at tokenize time). So document j of a part is the j-th good record of the
file recorded in the part's `stats.json` (`input.path`), read with the manifest's config; its ids
must equal `Llama3Tokenizer().encode_document(text)` and its source id `schema.source_id(source)`.
Inputs that are unreachable, or whose sha256 changed since tokenization, are skipped with a note.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from slimpack.shards import mds, schema
from slimpack.shards.findings import Collector, ShardResult
from slimpack.tokenize.readers import BadRecord, InputFile, read_records
from slimpack.tokenize.tokenizer import Llama3Tokenizer


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def check_retokenize(root: Path, manifest: dict[str, Any], entries: list[dict[str, Any]],
                     results: list[ShardResult], n: int, *,
                     seed: int, out: Collector, notes: list[str]) -> int:
    """Adds a `retokenize` finding per mismatch; returns the number of documents compared."""
    usable = [r for r in results if r.decoded and r.part is not None]
    if len(usable) != len(results):
        notes.append("retokenize: only shards that decoded and belong to a part are sampled")
    if not usable:
        return 0
    # Global document order = shard order (index order) then sample then document.
    shard_docs = np.asarray([int(r.sample_docs.sum()) for r in usable], np.int64)
    shard_start = np.concatenate([[0], np.cumsum(shard_docs)])
    total = int(shard_start[-1])
    part_first: dict[str, int] = {}
    for r, s in zip(usable, shard_start[:-1].tolist(), strict=True):
        part_first.setdefault(r.part, s)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(n, total), replace=False))

    # (part, document within the part) -> (shard result, sample, document within the sample)
    wanted: dict[str, dict[int, tuple[ShardResult, int, int]]] = {}
    for g in chosen.tolist():
        si = int(np.searchsorted(shard_start, g, side="right") - 1)
        r = usable[si]
        cum = np.concatenate([[0], np.cumsum(r.sample_docs)])
        local = g - int(shard_start[si])
        k = int(np.searchsorted(cum, local, side="right") - 1)
        wanted.setdefault(r.part, {})[g - part_first[r.part]] = (r, k, local - int(cum[k]))

    cfg = manifest.get("config") or {}
    fields = {key: cfg[key] for key in ("text_field", "source_field", "default_source") if key in cfg}
    tokenizer = Llama3Tokenizer()
    if manifest.get("tokenizer", {}).get("sha256") not in (None, tokenizer.sha256):
        notes.append("retokenize: the installed tokenizer.model differs from the recorded one "
                     "(sha256); mismatches may come from that")
    compared = 0
    shards: dict[int, mds.Shard] = {}
    for part, docs in sorted(wanted.items()):
        stats_path = root / schema.PARTS_DIRNAME / part / schema.PART_STATS_FILENAME
        try:
            inp = json.loads(stats_path.read_bytes())["input"]
            path = Path(inp["path"])
        except (OSError, ValueError, KeyError, TypeError):
            notes.append(f"retokenize: part {part}: no input path in stats.json; skipped")
            continue
        if not path.exists():
            notes.append(f"retokenize: part {part}: source {path} is not reachable; skipped "
                         f"{len(docs)} document(s)")
            continue
        if inp.get("sha256") and path.is_file() and _sha256(path) != inp["sha256"]:
            notes.append(f"retokenize: part {part}: {path} changed since tokenization (sha256); skipped")
            continue
        item = InputFile(str(path), part, "", inp.get("kind", "jsonl"))
        todo = dict(docs)
        j = 0
        for rec in read_records(item, **fields):
            if isinstance(rec, BadRecord):
                continue
            if j in todo:
                r, k, d = todo.pop(j)
                compared += 1
                _compare(root, entries, r, k, d, j, rec, path, tokenizer, shards, out)
                if not todo:
                    break
            j += 1
        for j_missing, (r, k, d) in sorted(todo.items()):
            out.add("retokenize", f"part {part} document {j_missing} (shard sample {k} document {d}) "
                                  f"has no record in {path}: the file holds only {j} good records",
                    shard=r.name, sample=k, part=part)
    return compared


def _compare(root: Path, entries: list[dict[str, Any]], r: ShardResult, k: int, d: int, j: int,
             rec: Any, path: Path, tokenizer: Any, shards: dict[int, mds.Shard], out: Collector) -> None:
    if r.index not in shards:
        info = mds.parse_index({"version": schema.MDS_VERSION, "shards": [entries[r.index]]})[0]
        shards.clear()  # one decoded shard at a time
        shards[r.index] = mds.load_shard(root, info)
    sample = shards[r.index].sample(k)
    cu = sample["cu_seqlens"]
    ids = sample["tokens"][int(cu[d]):int(cu[d + 1])]
    fresh = tokenizer.encode_document(rec.text)
    where = f"part {r.part} document {j} ({path}:{rec.line}), shard sample {k} document {d}"
    if len(ids) != len(fresh) or np.any(ids != fresh):
        m = min(len(ids), len(fresh))
        pos = int(np.argmax(ids[:m] != fresh[:m])) if np.any(ids[:m] != fresh[:m]) else m
        out.add("retokenize", f"{where}: {len(ids):,} ids in the shard, {len(fresh):,} from a fresh "
                              f"tokenization, first difference at token {pos}",
                shard=r.name, sample=k, part=r.part)
    sources = sample.get("doc_sources")
    if sources is not None and int(sources[d]) != schema.source_id(rec.source):
        out.add("retokenize", f"{where}: source id {int(sources[d])} in the shard, the record's "
                              f"source {rec.source!r} has id {schema.source_id(rec.source)}",
                shard=r.name, sample=k, part=r.part)
