"""Where a tokenize job's files go under `--out`, how they are written, and when a part is complete.

Shared by the job, its workers and the merge: a part `P` is the directory `parts/P/` with its
shards, `index.json` and, written last, `stats.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimpack.shards import schema
from slimpack.storage import Root


def dumps_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8")


def part_dir_name(part: str) -> str:
    return f"{schema.PARTS_DIRNAME}/{part}"


def part_stats_name(part: str) -> str:
    return f"{part_dir_name(part)}/{schema.PART_STATS_FILENAME}"


def part_complete(root: Root, part: str) -> bool:
    """stats.json is in place and every shard its index.json lists is present at its full size.

    A shard deleted or cut short after the part completed makes the part incomplete, so a
    re-run redoes it instead of merging a dataset with a hole in it.
    """
    if not root.exists(part_stats_name(part)):
        return False
    try:
        index = json.loads(root.read_bytes(f"{part_dir_name(part)}/{schema.INDEX_FILENAME}"))
        sizes = {Path(e["name"]).name: e["size"]
                 for e in root.fs.ls(root.join(part_dir_name(part)), detail=True)}
        for shard in index["shards"]:
            stored = shard["zip_data"] or shard["raw_data"]
            if sizes.get(stored["basename"]) != stored["bytes"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True
