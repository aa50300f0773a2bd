"""A checkpoint directory as the model layer reads it: its name, its meta.json, the checksums of its
files, and its model weights. Saving, resuming and pruning are the trainer's
(`slimpack.train.checkpoint`, whose docstring gives the layout); evaluation and export read weights
through this module only.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash

log = logging.getLogger(__name__)

META = "meta.json"
_NAME = re.compile(r"^step_(\d{8})$")
_HASH = "xxh3_128"


class CheckpointCorrupt(ValueError):
    """A checkpoint whose files differ from what its save recorded: truncated, bit-flipped, missing."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given, or a run directory's newest complete checkpoint."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        newest = latest_checkpoint(path / "checkpoints")
        if newest is None:
            raise FileNotFoundError(f"{path}/checkpoints holds no complete checkpoint")
        return newest
    return path



def checkpoint_step(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))



def file_record(path: Path) -> dict[str, Any]:
    h = xxhash.xxh3_128()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, _HASH: h.hexdigest()}


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.name.endswith((".tmp", ".old")):  # a save in progress or interrupted, or a deletion
        raise FileNotFoundError(f"{path} is an unfinished save or a checkpoint being deleted, never "
                                f"loaded; pass a complete step_NNNNNNNN directory under RUN_DIR/checkpoints")
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path} is not a complete slimpack checkpoint (no {META}); "
                                f"pass a step_NNNNNNNN directory under RUN_DIR/checkpoints")
    try:
        meta = json.loads((path / META).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointCorrupt(f"checkpoint {path}: {META} is unreadable ({err}); resume from an "
                                f"older checkpoint") from err
    if not isinstance(meta, dict):
        raise CheckpointCorrupt(f"checkpoint {path}: {META} is not a JSON object; resume from an older "
                                f"checkpoint")
    return meta


def _check_one(path: Path, name: Any, rec: Any) -> str | None:
    if not (isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")
            and isinstance(rec, dict) and isinstance(rec.get("bytes"), int)):
        return f"bad files entry {name!r}: {rec!r}"  # a name with a / could point outside the checkpoint
    file = path / name
    if not file.is_file():
        return f"{name} is missing"
    size = file.stat().st_size
    if size != rec["bytes"]:
        return f"{name} has {size:,} bytes, {rec['bytes']:,} were saved (truncated or overwritten)"
    got = file_record(file)[_HASH]
    if got != rec.get(_HASH):
        return f"{name} has {_HASH} {got}, {rec.get(_HASH)} was saved (the bytes changed on disk)"
    return None


def verify_checkpoint(path: str | Path, meta: dict[str, Any] | None = None) -> None:
    """Collective when a process group exists: check every file's size and xxh3_128 against meta.json
    (each rank a share of the files). Raises CheckpointCorrupt naming the checkpoint and the file,
    on every rank alike. A checkpoint saved before checksums were recorded loads with a warning."""
    path = Path(path)
    meta = read_meta(path) if meta is None else meta
    files = meta.get("files")
    if files is None:
        log.warning(f"checkpoint {path} records no checksums (saved by an older slimpack); loading it "
                    f"unverified")  # rank 0's, by the logging filter
        return
    if not isinstance(files, dict) or ".metadata" not in files:
        raise CheckpointCorrupt(f"checkpoint {path}: {META} has no valid 'files' record; resume from an "
                                f"older checkpoint")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    names = sorted(files)
    mine = [p for name in names[rank::world] if (p := _check_one(path, name, files[name]))]
    problems = [p for part in gather_objects(mine) for p in part]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointCorrupt(f"checkpoint {path} is corrupt: {problems[0]}{more}; resume from an "
                                f"older checkpoint (--resume auto does so itself)")



def load_model_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full (unsharded) fp32 model weights and meta.json, in one process, no process group.

    Reads only the `model.*` entries, so exporting a 1.5B model needs ~6 GB, not the 24 GB of
    weights plus optimiser state.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = read_meta(path)
    verify_checkpoint(path, meta)  # before read_metadata unpickles .metadata
    metadata = FileSystemReader(str(path)).read_metadata()
    model_sd = {key.removeprefix("model."): torch.empty(md.size, dtype=md.properties.dtype)
                for key, md in metadata.state_dict_metadata.items()
                if key.startswith("model.") and isinstance(md, TensorStorageMetadata)}
    state = {"model": model_sd}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state["model"], meta




def gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """`obj` of every rank, in rank order (just `[obj]` without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


