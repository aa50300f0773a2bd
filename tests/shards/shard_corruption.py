"""Helpers that corrupt a dataset copy the way real accidents and bugs do."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from slimpack.shards import mds, schema
from slimpack.shards.schema import part_of
from slimpack.tokenize.merge import merge_dataset


def entries(root: Path) -> list[dict[str, Any]]:
    return json.loads((root / schema.INDEX_FILENAME).read_text())["shards"]


def stored_path(root: Path, i: int) -> Path:
    e = entries(root)[i]
    return root / (e["zip_data"] or e["raw_data"])["basename"]


def edit_json(path: Path, fn: Callable[[Any], None]) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj, sort_keys=True))


def _reseal(root: Path, i: int, raw: bytes) -> None:
    """Store `raw` as shard i with correct sizes and hashes everywhere, then re-merge.

    So only the corruption inside the bytes remains for the validator to find.
    """
    e = entries(root)[i]
    part = part_of(e["zip_data"]["basename"])
    data = mds.compress(e["compression"], raw)
    stored_path(root, i).write_bytes(data)
    pindex_path = root / schema.PARTS_DIRNAME / part / schema.INDEX_FILENAME
    name = Path(e["zip_data"]["basename"]).name

    def fix(index: dict[str, Any]) -> None:
        for s in index["shards"]:
            if s["zip_data"]["basename"] == name:
                for key, blob in (("raw_data", raw), ("zip_data", data)):
                    s[key]["bytes"] = len(blob)
                    s[key]["hashes"] = {a: mds.hash_bytes(a, blob) for a in s[key]["hashes"]}

    edit_json(pindex_path, fix)
    merge_dataset(str(root))


def edit_raw(root: Path, i: int, fn: Callable[[bytearray], None]) -> None:
    """Edit shard i's raw (decompressed) bytes in place and reseal it."""
    e = entries(root)[i]
    raw = bytearray(mds.decompress(e["compression"], stored_path(root, i).read_bytes()))
    fn(raw)
    _reseal(root, i, bytes(raw))


def edit_sample(root: Path, i: int, k: int, fn: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Re-encode shard i with sample k's arrays changed by `fn` (sizes may not change), resealed."""
    e = entries(root)[i]
    info = mds.parse_index({"version": 2, "shards": [e]})[0]
    shard = mds.load_shard(root, info)
    samples = [{n: np.array(v) for n, v in shard.sample(j).items()} for j in range(len(shard))]
    fn(samples[k])
    with tempfile.TemporaryDirectory() as tmp:
        w = mds.ShardWriter(tmp, columns=schema.COLUMNS, compression=e["compression"],
                            hashes=e["hashes"], size_limit=e["size_limit"])
        for s in samples:
            w.write(s)
        index = w.finish()
        if len(index["shards"]) != 1:
            raise RuntimeError("re-encoded shard split in two")
        written = Path(tmp) / index["shards"][0]["zip_data"]["basename"]
        raw = mds.decompress(e["compression"], written.read_bytes())
    if len(raw) != len(shard.raw):
        raise RuntimeError("the edit changed the shard's size")
    _reseal(root, i, raw)
