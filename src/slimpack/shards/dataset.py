"""Reading a local dataset's two JSON files, `index.json` and `slimpack.json`, and the one error for
a dataset that cannot be read at all.

Validate, stats and inspect read a local directory through these functions; the loader's index
(`pipeline/index.py`, local or remote bytes) checks the index with `check_mds_index` and raises
`UnusableInputError` as they do. Every failure is exit status 3 (`exitcodes.UNUSABLE`), its message
naming the file and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimpack import exitcodes
from slimpack.shards import schema


class UnusableInputError(exitcodes.UnusableDatasetError):
    """The input cannot be validated, described or loaded at all: exit status 3,
    `exitcodes.UNUSABLE` (the CLI's one error path prints it)."""


def read_dataset_json(path: Path, what: str) -> Any:
    """A dataset's index.json or slimpack.json; `what` says why it is needed and how to fix it."""
    if not path.exists():
        raise UnusableInputError(f"{path} does not exist: {what}")
    try:
        return json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnusableInputError(f"{path} is not readable JSON ({err}): {what}") from err


def check_mds_index(index: Any, where: str) -> list[Any]:
    """The shard entries of a parsed MDS v2 index; `where` names the file in the error."""
    if not isinstance(index, dict) or index.get("version") != schema.MDS_VERSION \
            or not isinstance(index.get("shards"), list):
        raise UnusableInputError(f"{where}: not an MDS v2 index (needs 'version': 2 and a 'shards' list)")
    return index["shards"]


def manifest_token_ids(manifest: Any, where: str) -> tuple[int, int, int]:
    """(bos_id, eos_id, vocab_size) that a manifest records."""
    try:
        return int(manifest["bos_id"]), int(manifest["eos_id"]), int(manifest["vocab_size"])
    except (KeyError, TypeError, ValueError) as err:
        raise UnusableInputError(f"{where}: missing bos_id/eos_id/vocab_size ({err!r}); re-run "
                                 "`slimpack shards merge`") from err


def source_names(root: Path) -> dict[str, str]:
    """Source id (as a string) -> name, from slimpack.json; empty when the dataset has no manifest."""
    path = root / schema.MANIFEST_FILENAME
    if not path.exists():
        return {}
    fix = "the dataset's manifest; re-run `slimpack shards merge`"
    manifest = read_dataset_json(path, fix)
    if not isinstance(manifest, dict):
        raise UnusableInputError(f"{path} is not a JSON object: {fix}")
    return manifest.get("sources", {})
