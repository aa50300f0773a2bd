"""Validate's checks over the whole dataset, once every shard is checked (`shard_checks.py`).

The index and each part's own index agree; no unlisted shard files; parts missing or extra; every
input of the tokenize job has a complete part; the manifest's totals, per-part, per-split and
per-source counts, per-sample token counts (`sample_tokens.npy`) and fingerprint equal what the
shards hold.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from slimpack.shards import schema
from slimpack.shards.findings import Collector, ShardResult
from slimpack.shards.shard_checks import stored_name
from slimpack.storage import UnsafePathError, member_path
from slimpack.tokenize.merge import fingerprint


def check_dataset(root: Path, entries: list[dict[str, Any]], manifest: dict[str, Any],
                  results: list[ShardResult], out: Collector, notes: list[str]) -> None:
    """Every dataset-level check; `results` are the shards' in index order."""
    _check_files(root, entries, out)
    _check_parts(root, entries, manifest, results, out)
    _check_inputs(root, manifest, out)
    _check_manifest(root, entries, manifest, results, out, notes)


def _check_files(root: Path, entries: list[dict[str, Any]], out: Collector) -> None:
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
        groups.setdefault(schema.part_of(stored_name(e)), []).append(i)
    return groups


def _check_parts(root: Path, entries: list[dict[str, Any]], manifest: dict[str, Any],
                 results: list[ShardResult], out: Collector) -> None:
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


def _check_inputs(root: Path, manifest: dict[str, Any], out: Collector) -> None:
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
                    results: list[ShardResult], out: Collector, notes: list[str]) -> None:
    """Totals, per-part, per-split and per-source counts, sample_tokens.npy and the fingerprint."""
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
