"""The global sample index of a dataset: shards, per-sample token counts, split membership.

Built from the three small files that merge writes (``index.json``, ``sample_tokens.npy``,
``slimpack.json``); no shard is opened. Everything per sample is a numpy array (no Python object
per sample), so a SlimPajama-scale index (9.6M samples, ~40K shards) loads in seconds and holds a
few hundred MB at most.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from slimpack.shards import schema
from slimpack.shards.mds import ShardFormatError, ShardInfo, parse_index
from slimpack.storage import Root


class DatasetError(ValueError):
    """Index files missing, corrupt or inconsistent; the message says which and how to fix."""


@dataclass
class DatasetIndex:
    """Shards and per-sample token counts of one dataset root (local path or remote URL)."""

    url: str
    manifest: dict[str, Any]
    shards: list[ShardInfo]
    shard_starts: np.ndarray  # int64 (num_shards + 1,): first global sample id of each shard
    sample_tokens: np.ndarray  # int64 (num_samples,)
    shard_splits: np.ndarray  # int16 (num_shards,): code into `split_names`
    split_names: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def num_samples(self) -> int:
        return len(self.sample_tokens)

    def split_samples(self, split: str) -> np.ndarray:
        """Global sample ids (int64, ascending) of one split, vectorised over shards."""
        if split not in self.split_names:
            raise DatasetError(f"{self.url}: no split {split!r}; this dataset has "
                               f"{list(self.split_names)}")
        code = self.split_names.index(split)
        counts = np.diff(self.shard_starts)
        mask = np.repeat(self.shard_splits == code, counts)
        return np.flatnonzero(mask).astype(np.int64, copy=False)

    def shard_of(self, samples: np.ndarray) -> np.ndarray:
        """Shard index of each global sample id."""
        return np.searchsorted(self.shard_starts, samples, side="right") - 1


def part_of(basename: str) -> str:
    """``parts/<part>/shard.00000.mds.zstd`` -> ``<part>``."""
    prefix = schema.PARTS_DIRNAME + "/"
    if not basename.startswith(prefix) or "/" not in basename[len(prefix):]:
        raise DatasetError(f"shard {basename!r} is not under {prefix}<part>/: not a slimpack dataset "
                           "(merge writes one; re-run `slimpack shards merge`)")
    return basename[len(prefix):basename.rindex("/")]


def build_index(url: str, manifest: dict[str, Any], index: dict[str, Any],
                sample_tokens: np.ndarray) -> DatasetIndex:
    """Check the three files against each other and build the index (no I/O)."""
    where = f"{url}/{schema.INDEX_FILENAME}"
    try:
        shards = parse_index(index, where)
    except ShardFormatError as err:
        raise DatasetError(str(err)) from err
    for key in ("fingerprint", "parts"):
        if key not in manifest:
            raise DatasetError(f"{url}/{schema.MANIFEST_FILENAME}: no {key!r}; re-run the merge")
    counts = np.fromiter((s.samples for s in shards), np.int64, len(shards))
    shard_starts = np.zeros(len(shards) + 1, np.int64)
    np.cumsum(counts, out=shard_starts[1:])
    sample_tokens = np.asarray(sample_tokens)
    if sample_tokens.ndim != 1 or sample_tokens.dtype.kind not in "iu":
        raise DatasetError(f"{url}/{schema.SAMPLE_TOKENS_FILENAME}: expected a 1-D integer array, "
                           f"got {sample_tokens.dtype} {sample_tokens.shape}; re-run the merge")
    if len(sample_tokens) != shard_starts[-1]:
        raise DatasetError(
            f"{url}: {schema.SAMPLE_TOKENS_FILENAME} has {len(sample_tokens)} counts but "
            f"{schema.INDEX_FILENAME} lists {int(shard_starts[-1])} samples: the files come from "
            "different merges; re-run `slimpack shards merge`")
    if manifest.get("samples", len(sample_tokens)) != len(sample_tokens):
        raise DatasetError(f"{url}: manifest says {manifest['samples']} samples, the index "
                           f"{len(sample_tokens)}; re-run `slimpack shards merge`")
    if len(sample_tokens) and int(sample_tokens.min()) <= 0:
        k = int(np.argmin(sample_tokens))
        raise DatasetError(f"{url}: sample {k} has {int(sample_tokens[k])} tokens; "
                           f"{schema.SAMPLE_TOKENS_FILENAME} is corrupt; re-run the merge")
    parts = manifest["parts"]
    split_of_part = {p: info["split"] for p, info in parts.items()}
    split_names = tuple(sorted(set(split_of_part.values())))
    codes = {s: i for i, s in enumerate(split_names)}
    shard_splits = np.empty(len(shards), np.int16)
    for i, s in enumerate(shards):
        part = part_of(s.basename)
        if part not in split_of_part:
            raise DatasetError(f"{url}: shard {s.basename} belongs to part {part!r}, which the manifest "
                               "does not list; re-run `slimpack shards merge`")
        shard_splits[i] = codes[split_of_part[part]]
    return DatasetIndex(url=url, manifest=manifest, shards=shards, shard_starts=shard_starts,
                        sample_tokens=sample_tokens.astype(np.int64, copy=False),
                        shard_splits=shard_splits, split_names=split_names)


def load_index(url: str) -> DatasetIndex:
    """Read ``slimpack.json``, ``index.json`` and ``sample_tokens.npy`` from a dataset root."""
    root = Root(url)
    files = {}
    for name in (schema.MANIFEST_FILENAME, schema.INDEX_FILENAME, schema.SAMPLE_TOKENS_FILENAME):
        try:
            files[name] = root.read_bytes(name)
        except FileNotFoundError as err:
            raise DatasetError(f"{root.url}/{name}: missing; point at a merged slimpack dataset "
                               "(`slimpack tokenize ... --out DIR` writes one)") from err
    try:
        manifest = json.loads(files[schema.MANIFEST_FILENAME])
        index = json.loads(files[schema.INDEX_FILENAME])
    except json.JSONDecodeError as err:
        raise DatasetError(f"{root.url}: corrupt JSON ({err}); re-run `slimpack shards merge`") from err
    try:
        tokens = np.load(io.BytesIO(files[schema.SAMPLE_TOKENS_FILENAME]), allow_pickle=False)
    except ValueError as err:
        raise DatasetError(f"{root.url}/{schema.SAMPLE_TOKENS_FILENAME}: unreadable ({err}); "
                           "re-run `slimpack shards merge`") from err
    return build_index(root.url, manifest, index, tokens)
