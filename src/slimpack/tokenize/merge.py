"""Merge complete parts into one dataset: `index.json`, `sample_tokens.npy`, `slimpack.json`.

    slimpack shards merge DIR

Idempotent (same parts, same bytes: nothing time- or machine-dependent is written) and atomic
(each file is replaced whole; the manifest, written last, marks the dataset complete; a merge that
fails to write after replacing a file removes the older manifest). The manifest records every
input of the job (`inputs.json`) with its state, so a merge after a failed part names what is
missing and validate reports it.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from slimpack import __version__
from slimpack.exitcodes import UnusableDatasetError
from slimpack.provenance import git_sha
from slimpack.shards import schema
from slimpack.shards.dataset import check_mds_index
from slimpack.storage import Root, check_member
from slimpack.tokenize.layout import dumps_json, part_dir_name, part_stats_name


class MergeError(RuntimeError):
    pass


class MergeWriteError(MergeError):
    """The merge could not write its files (a full disk, permissions); the parts are untouched."""


class NoPartsError(MergeError, UnusableDatasetError):
    """Nothing to merge: the directory holds no complete part (exit status 3, as for any unusable dataset)."""


# Config keys that decide what happens to bad records, not the bytes of a completed part.
_POLICY_KEYS = ("on_bad_record", "bad_examples")


def fingerprint(shards: list[dict[str, Any]], tokenizer_sha256: str, part_splits: dict[str, str]) -> str:
    """sha256 over the schema version, tokenizer, each part's split and every shard's name, samples
    and hashes. The splits count because the loader streams one split: moving a part between
    splits changes the data a run sees even when no shard byte changes."""
    h = hashlib.sha256()
    h.update(f"slimpack-schema-{schema.SCHEMA_VERSION}\n{tokenizer_sha256}\n".encode())
    h.update(json.dumps(sorted(part_splits.items())).encode())
    for s in shards:
        stored = s["zip_data"] or s["raw_data"]
        h.update(json.dumps([stored["basename"], s["samples"], stored["hashes"],
                             s["raw_data"]["hashes"]], sort_keys=True).encode())
    return h.hexdigest()


def find_parts(root: Root) -> tuple[list[str], list[str]]:
    """(complete part names, incomplete part names) under `root/parts`."""
    prefix = schema.PARTS_DIRNAME + "/"
    complete = [n[len(prefix):-len("/" + schema.PART_STATS_FILENAME)]
                for n in root.glob(f"{schema.PARTS_DIRNAME}/**/{schema.PART_STATS_FILENAME}")]
    started = [n[len(prefix):-len("/" + schema.INDEX_FILENAME)]
               for n in root.glob(f"{schema.PARTS_DIRNAME}/**/{schema.INDEX_FILENAME}")]
    return sorted(complete), sorted(set(started) - set(complete))


def _recorded_failures(root: Root) -> dict[str, str]:
    """part -> error, from the tokenize reports of every node (reports/tokenize.node-*.json)."""
    failed: dict[str, str] = {}
    for name in root.glob("reports/tokenize.node-*.json"):
        try:
            failed.update(json.loads(root.read_bytes(name)).get("parts_failed") or {})
        except (OSError, ValueError, AttributeError):
            continue  # a report is a diagnostic: an unreadable one only loses the error text
    return failed


def job_inputs(root: Root, complete: Sequence[str], stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every input of the job (`inputs.json`, plus any other complete part) and its state:
    `complete`, `failed` (with the error a node reported) or `incomplete` (not run, or stopped)."""
    listed: list[dict[str, Any]] = []
    if root.exists(schema.INPUTS_FILENAME):
        try:
            listed = json.loads(root.read_bytes(schema.INPUTS_FILENAME))["inputs"]
            listed = [{"part": str(i["part"]), "path": str(i["path"]), "split": str(i["split"])}
                      for i in listed]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise MergeError(f"{root.url}/{schema.INPUTS_FILENAME} is unreadable ({err!r}): re-run "
                             "`slimpack tokenize` with the job's inputs to rewrite it") from err
    failures = _recorded_failures(root) if set(i["part"] for i in listed) - set(complete) else {}
    inputs: dict[str, Any] = {}
    for item in listed:
        part = item["part"]
        if part in complete:
            inputs[part] = {"path": item["path"], "split": item["split"], "state": "complete"}
        elif part in failures:
            inputs[part] = {"path": item["path"], "split": item["split"], "state": "failed",
                            "error": failures[part]}
        else:
            inputs[part] = {"path": item["path"], "split": item["split"], "state": "incomplete"}
    for part in complete:
        if part not in inputs:  # a complete part the last job was not given: merged all the same
            inputs[part] = {"path": stats[part]["input"]["path"], "split": stats[part]["split"],
                            "state": "complete"}
    return dict(sorted(inputs.items()))


def missing_inputs(manifest: dict[str, Any]) -> list[str]:
    """One line per input of the manifest with no complete part, naming it and the fix."""
    lines = []
    for part, rec in (manifest.get("inputs") or {}).items():
        if rec.get("state") != "complete":
            why = f"{rec.get('state')}: {rec['error']}" if rec.get("error") else rec.get("state")
            lines.append(f"input {rec.get('path')} has no complete part ({why}); its documents are "
                         "not in the dataset: re-run `slimpack tokenize` with the job's inputs and "
                         f"--out (it redoes part {part} only, then merges)")
    return lines


def merge_dataset(url: str, *, expected_parts: Sequence[str] | None = None) -> dict[str, Any]:
    """Write the merged index, per-sample token counts and manifest; returns the manifest.

    `expected_parts` (the job's inputs): refuse unless exactly these parts are complete. Without
    it every complete part is merged, and the manifest's `inputs` records each input of the job
    (`inputs.json`) with its state, so one left out is named (`missing_inputs`, validate).
    """
    root = Root(url)
    complete, incomplete = find_parts(root)
    if incomplete:
        raise MergeError(f"{root.url}: part(s) {incomplete[:5]} have shards but no stats.json "
                         "(interrupted); re-run `slimpack tokenize` to finish them, then merge")
    if expected_parts is not None:
        missing = sorted(set(expected_parts) - set(complete))
        if missing:
            raise MergeError(f"{root.url}: part(s) {missing[:5]} are not complete; re-run tokenize")
        extra = sorted(set(complete) - set(expected_parts))
        if extra:
            raise MergeError(
                f"{root.url}: part(s) {extra[:5]} are complete under {schema.PARTS_DIRNAME}/ but "
                "not among the inputs (an input removed or renamed since an earlier run?); delete "
                f"{schema.PARTS_DIRNAME}/<part> to drop one, or run `slimpack shards merge "
                f"{root.url}` to merge every part present")
    if not complete:
        raise NoPartsError(f"{root.url}: no complete parts under {schema.PARTS_DIRNAME}/; point at the --out "
                           "of `slimpack tokenize`")

    shards: list[dict[str, Any]] = []
    sample_tokens: list[int] = []
    parts: dict[str, Any] = {}
    per_source: dict[str, dict[str, int]] = {}
    per_split: dict[str, dict[str, int]] = {}
    source_names: dict[int, str] = {}
    skipped: Counter[str] = Counter()
    first: dict[str, Any] | None = None
    all_stats: dict[str, dict[str, Any]] = {}
    for part in complete:
        stats = all_stats[part] = json.loads(root.read_bytes(part_stats_name(part)))
        index_name = f"{part_dir_name(part)}/{schema.INDEX_FILENAME}"
        part_shards = check_mds_index(json.loads(root.read_bytes(index_name)), f"{root.url}/{index_name}")
        first = first or stats
        for key in ("tokenizer", "config", "schema_version"):
            mine, theirs = stats[key], first[key]
            if key == "config":  # the bad-record policy does not change a completed part's bytes
                mine, theirs = ({k: v for k, v in c.items() if k not in _POLICY_KEYS} for c in (mine, theirs))
            if mine != theirs:
                what = ""
                if isinstance(mine, dict) and isinstance(theirs, dict):
                    what = " (" + "; ".join(
                        f"{k}: {theirs.get(k)!r} in part {first['part']}, {mine.get(k)!r} in part {part}"
                        for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)) + ")"
                raise MergeError(f"part {part} has a different {key} from part {first['part']}{what}: "
                                 "re-tokenize it with the same tokenizer and config")
        if sum(s["samples"] for s in part_shards) != len(stats["sample_tokens"]):
            raise MergeError(f"part {part}: index.json and stats.json disagree on the sample "
                             "count; delete the part and re-run tokenize")
        for s in part_shards:
            entry = json.loads(json.dumps(s))
            for key in ("raw_data", "zip_data"):
                if entry[key]:
                    name = f"{part_dir_name(part)}/{entry[key]['basename']}"
                    # A part's index names files in its own directory; the merged index is what
                    # every reader trusts, so a name that leaves it never gets there.
                    check_member(name, where=f"{part_dir_name(part)}/{schema.INDEX_FILENAME}")
                    if schema.part_of(name) != part:
                        raise MergeError(f"{part_dir_name(part)}/{schema.INDEX_FILENAME} names shard "
                                         f"{entry[key]['basename']!r}, not a file of the part's own "
                                         "directory: delete the part and re-run tokenize")
                    entry[key]["basename"] = name
            shards.append(entry)
        sample_tokens.extend(stats["sample_tokens"])
        split = per_split.setdefault(stats["split"], {"parts": 0, "documents": 0, "tokens": 0})
        split["parts"] += 1
        split["documents"] += stats["documents"]
        split["tokens"] += stats["tokens"]
        for name, src in stats["sources"].items():
            if source_names.setdefault(src["id"], name) != name:
                raise MergeError(f"sources {name!r} and {source_names[src['id']]!r} share id "
                                 f"{src['id']}; rename one with --default-source or the data")
            agg = per_source.setdefault(name, {"id": src["id"], "documents": 0, "tokens": 0})
            agg["documents"] += src["documents"]
            agg["tokens"] += src["tokens"]
        skipped.update(stats["skipped"])
        parts[part] = {k: stats[k] for k in ("split", "documents", "tokens", "samples", "shards",
                                             "skipped", "surrogates_replaced", "input")}

    tokens = np.asarray(sample_tokens, np.int64)
    buf = io.BytesIO()
    np.save(buf, tokens, allow_pickle=False)
    index_obj = {"shards": shards, "version": schema.MDS_VERSION}
    tok = first["tokenizer"]
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "slimpack_version": __version__,
        "git_sha": git_sha(),
        "tokenizer": tok,
        "bos_id": tok["bos_id"],
        "eos_id": tok["eos_id"],
        "vocab_size": tok["vocab_size"],
        "fingerprint": fingerprint(shards, tok["sha256"], {p: v["split"] for p, v in parts.items()}),
        "documents": sum(p["documents"] for p in parts.values()),
        "tokens": int(tokens.sum()),
        "samples": len(tokens),
        "shards": len(shards),
        "skipped": dict(sorted(skipped.items())),
        "per_source": dict(sorted(per_source.items())),
        "per_split": dict(sorted(per_split.items())),
        "sources": {str(k): v for k, v in sorted(source_names.items())},
        "parts": parts,
        "inputs": job_inputs(root, complete, all_stats),
        "config": first["config"],
        "sample_tokens_file": schema.SAMPLE_TOKENS_FILENAME,
    }
    _write_merged(root, [(schema.SAMPLE_TOKENS_FILENAME, buf.getvalue()),
                         (schema.INDEX_FILENAME, json.dumps(index_obj, sort_keys=True).encode()),
                         (schema.MANIFEST_FILENAME, dumps_json(manifest))])
    return manifest


def _write_merged(root: Root, files: list[tuple[str, bytes]]) -> None:
    """Write each file whole, the manifest last; on a failed write raise `MergeWriteError`.

    Each write is atomic, so a failure leaves that file as it was. Once an earlier file has been
    replaced, an older manifest no longer describes the files beside it: it is removed, so the
    dataset reads as unmerged (validate and the loader say so) until a merge completes.
    """
    for k, (name, data) in enumerate(files):
        try:
            root.write_bytes(name, data)
        except OSError as err:
            note = ""
            if k > 0 and root.exists(schema.MANIFEST_FILENAME):
                try:
                    root.fs.rm(root.join(schema.MANIFEST_FILENAME))
                    note = f"; the older {schema.MANIFEST_FILENAME} was removed (it no longer matched)"
                except OSError:
                    note = f"; the older {schema.MANIFEST_FILENAME} may not match: do not use the dataset"
            raise MergeWriteError(
                f"{root.url}: could not write {name} ({err.strerror or err}){note}; every part is "
                f"complete and untouched: free space (or fix permissions), then run `slimpack shards "
                f"merge {root.url}`") from err
