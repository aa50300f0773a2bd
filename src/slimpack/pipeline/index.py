"""The global sample index of a dataset: shards, per-sample token counts, split membership.

Built from the three small files that merge writes (``index.json``, ``sample_tokens.npy``,
``slimpack.json``); no shard is opened. Any of them missing, corrupt or inconsistent raises
``UnusableInputError`` (``shards/dataset.py``, every dataset reader's), saying which and how to fix
it. Everything per sample is a numpy array and everything per shard is a compact column (no dict
per shard is kept): a SlimPajama-scale index (9.6M samples, 60K shards, a 42 MB index.json) would
otherwise hold ~200 MB of parsed JSON per process. The shard entries are reduced while
``json.loads`` parses them (``object_hook``), so that tree never exists whole.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from slimpack.shards import schema
from slimpack.shards.dataset import UnusableInputError, check_mds_index
from slimpack.shards.mds import ShardInfo
from slimpack.storage import RetryPolicy, Root, UnsafePathError, check_member

_HASH_PREFERENCE = ("xxh3_64", "sha1")



@dataclass(frozen=True)
class ShardLayout:
    """Column layout shared by many shards (interned: one object per distinct layout)."""

    names: tuple[str, ...]
    encodings: tuple[str, ...]
    sizes: tuple[int | None, ...]
    compression: str | None


@dataclass
class DatasetIndex:
    """Shards and per-sample token counts of one dataset root (local path or remote URL)."""

    url: str
    manifest: dict[str, Any]  # slimpack.json without its per-part table
    shard_names: list[str]  # stored file of each shard (compressed if compressed), root-relative
    shard_bytes: np.ndarray  # int64 size of each stored file
    shard_hashes: list[tuple[str, str] | None]  # (algorithm, hex digest) of each stored file
    shard_layouts: list[ShardLayout]
    shard_starts: np.ndarray  # int64 (num_shards + 1,): first global sample id of each shard
    sample_tokens: np.ndarray  # int32 (num_samples,)
    shard_splits: np.ndarray  # int16 (num_shards,): code into `split_names`
    split_names: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def num_samples(self) -> int:
        return len(self.sample_tokens)

    @property
    def num_shards(self) -> int:
        return len(self.shard_names)

    def shard_info(self, i: int) -> ShardInfo:
        """The codec's view of shard i (built on demand)."""
        lay = self.shard_layouts[i]
        samples = int(self.shard_starts[i + 1] - self.shard_starts[i])
        return ShardInfo(i, samples, self.shard_names[i], lay.compression, lay.names, lay.encodings,
                         lay.sizes, {})

    def split_samples(self, split: str) -> np.ndarray:
        """Global sample ids (ascending) of one split, vectorised over shards."""
        if split not in self.split_names:
            raise UnusableInputError(f"{self.url}: no split {split!r}; this dataset has "
                                     f"{list(self.split_names)}")
        code = self.split_names.index(split)
        mask = np.repeat(self.shard_splits == code, np.diff(self.shard_starts))
        dtype = np.int32 if self.num_samples < 2**31 else np.int64
        return np.flatnonzero(mask).astype(dtype)

    def shard_of(self, samples: np.ndarray) -> np.ndarray:
        """Shard index of each global sample id."""
        return np.searchsorted(self.shard_starts, samples, side="right") - 1


def part_of(basename: str) -> str:
    """``schema.part_of``, refusing a shard outside ``parts/<part>/``."""
    part = schema.part_of(basename)
    if part is None:
        raise UnusableInputError(f"shard {basename!r} is not under {schema.PARTS_DIRNAME}/<part>/: not a "
                                 "slimpack dataset (merge writes one; re-run `slimpack shards merge`)")
    return part


class _ShardEntries:
    """``json.loads`` object_hook that turns each MDS shard entry into a tuple as it is parsed."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.layouts: dict[tuple, ShardLayout] = {}

    def __call__(self, d: dict[str, Any]) -> Any:
        if "column_encodings" not in d:
            return d
        try:
            stored = d["zip_data"] or d["raw_data"]
            check_member(stored["basename"], where=self.where)  # before anything reads or writes it
            if d["format"] != "mds":
                raise UnusableInputError(f"{self.where}: shard {stored['basename']} has format "
                                         f"{d['format']!r}, not 'mds'")
            key = (tuple(d["column_names"]), tuple(d["column_encodings"]), tuple(d["column_sizes"]),
                   d.get("compression") or None)
            layout = self.layouts.get(key)
            if layout is None:
                layout = self.layouts[key] = self._check(ShardLayout(*key), stored["basename"])
            hashes = stored.get("hashes") or {}
            algo = next((a for a in _HASH_PREFERENCE if a in hashes), next(iter(hashes), None))
            return (stored["basename"], int(stored["bytes"]), (algo, hashes[algo]) if algo else None,
                    int(d["samples"]), layout)
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, (UnusableInputError, UnsafePathError)):
                raise
            raise UnusableInputError(f"{self.where}: malformed shard entry ({err!r}); re-run the merge") from err

    def _check(self, layout: ShardLayout, basename: str) -> ShardLayout:
        cols = dict(zip(layout.names, layout.encodings, strict=True))
        for name in ("tokens", "cu_seqlens"):
            if cols.get(name) != schema.COLUMNS[name]:
                raise UnusableInputError(
                    f"{self.where}: shard {basename} has columns {cols}, not schema v1's tokens "
                    f"{schema.COLUMNS['tokens']} and cu_seqlens {schema.COLUMNS['cu_seqlens']}; "
                    "tokenize the data with `slimpack tokenize`")
        if not all(schema.is_safe_encoding(e) for e in layout.encodings):
            raise UnusableInputError(f"{self.where}: shard {basename} uses an unsafe encoding "
                                     f"({layout.encodings}); slimpack never unpickles")
        return layout


def build_index(url: str, manifest_bytes: bytes, index_bytes: bytes,
                sample_tokens: np.ndarray) -> DatasetIndex:
    """Parse and cross-check the three files (no I/O)."""
    where = f"{url}/{schema.INDEX_FILENAME}"
    try:
        manifest = json.loads(manifest_bytes)
        index = json.loads(index_bytes, object_hook=_ShardEntries(where))
    except json.JSONDecodeError as err:
        raise UnusableInputError(f"{url}: corrupt JSON ({err}); re-run `slimpack shards merge`") from err
    entries = check_mds_index(index, where)
    for key in ("fingerprint", "parts"):
        if key not in manifest:
            raise UnusableInputError(f"{url}/{schema.MANIFEST_FILENAME}: no {key!r}; re-run the merge")
    names = [e[0] for e in entries]
    shard_starts = np.zeros(len(entries) + 1, np.int64)
    np.cumsum(np.fromiter((e[3] for e in entries), np.int64, len(entries)), out=shard_starts[1:])
    if sample_tokens.ndim != 1 or sample_tokens.dtype.kind not in "iu":
        raise UnusableInputError(f"{url}/{schema.SAMPLE_TOKENS_FILENAME}: expected a 1-D integer array, "
                                 f"got {sample_tokens.dtype} {sample_tokens.shape}; re-run the merge")
    if len(sample_tokens) != shard_starts[-1]:
        raise UnusableInputError(
            f"{url}: {schema.SAMPLE_TOKENS_FILENAME} has {len(sample_tokens)} counts but "
            f"{schema.INDEX_FILENAME} lists {int(shard_starts[-1])} samples: the files come from "
            "different merges; re-run `slimpack shards merge`")
    if manifest.get("samples", len(sample_tokens)) != len(sample_tokens):
        raise UnusableInputError(f"{url}: manifest says {manifest['samples']} samples, the index "
                                 f"{len(sample_tokens)}; re-run `slimpack shards merge`")
    if len(sample_tokens) and (int(sample_tokens.min()) <= 0 or int(sample_tokens.max()) >= 2**31):
        k = int(np.argmin(sample_tokens)) if int(sample_tokens.min()) <= 0 else int(np.argmax(sample_tokens))
        raise UnusableInputError(f"{url}: sample {k} has {int(sample_tokens[k])} tokens; "
                                 f"{schema.SAMPLE_TOKENS_FILENAME} is corrupt; re-run the merge")
    parts = manifest.pop("parts")
    split_of_part = {p: info["split"] for p, info in parts.items()}
    split_names = tuple(sorted(set(split_of_part.values())))
    codes = {s: i for i, s in enumerate(split_names)}
    shard_splits = np.empty(len(entries), np.int16)
    for i, name in enumerate(names):
        part = part_of(name)
        if part not in split_of_part:
            raise UnusableInputError(f"{url}: shard {name} belongs to part {part!r}, which the manifest "
                                     "does not list; re-run `slimpack shards merge`")
        shard_splits[i] = codes[split_of_part[part]]
    return DatasetIndex(url=url, manifest=manifest, shard_names=names,
                        shard_bytes=np.fromiter((e[1] for e in entries), np.int64, len(entries)),
                        shard_hashes=[e[2] for e in entries], shard_layouts=[e[4] for e in entries],
                        shard_starts=shard_starts, sample_tokens=sample_tokens.astype(np.int32),
                        shard_splits=shard_splits, split_names=split_names)


def load_index(url: str, *, retry: RetryPolicy | None = None) -> DatasetIndex:
    """Read ``slimpack.json``, ``index.json`` and ``sample_tokens.npy`` from a dataset root
    (remote reads retried under ``retry``)."""
    root = Root(url, retry=retry)
    files = {}
    for name in (schema.MANIFEST_FILENAME, schema.INDEX_FILENAME, schema.SAMPLE_TOKENS_FILENAME):
        try:
            files[name] = root.read_bytes(name)
        except FileNotFoundError as err:
            raise UnusableInputError(f"{root.url}/{name}: missing; point at a merged slimpack dataset "
                                     "(`slimpack tokenize ... --out DIR` writes one)") from err
    try:
        tokens = np.load(io.BytesIO(files.pop(schema.SAMPLE_TOKENS_FILENAME)), allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise UnusableInputError(f"{root.url}/{schema.SAMPLE_TOKENS_FILENAME}: unreadable ({err}); "
                                 "re-run `slimpack shards merge`") from err
    return build_index(root.url, files[schema.MANIFEST_FILENAME], files[schema.INDEX_FILENAME], tokens)
