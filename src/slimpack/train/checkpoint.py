"""Checkpoints with torch.distributed.checkpoint: sharded, atomic, newest-K, loadable at any world size.

Layout under `RUN_DIR/checkpoints/`:

    step_00001000/          a complete checkpoint (only complete ones carry this name)
      .metadata, __0_0.distcp, ...   DCP files: {"model": ..., "optim": ...}, each rank its shards
      position_frequency.npy  the position-frequency ledger (train/ledger.py; sha256 in meta.json)
      meta.json             step, tokens, schedule, loader state, wandb id, resolved config,
                            model config, provenance: written last, before the rename
    step_00002000.tmp/      a save in progress, or one that was interrupted: never loaded,
                            removed by the next save
    step_00000500.old/      a pruned checkpoint being deleted (renamed first): never loaded
    step_00003000.abandoned/  newer than the checkpoint a run was rolled back to (set aside by
                            the trainer so --resume auto never returns to it); kept for the user

Atomicity: every rank writes into `step_N.tmp`; after a barrier rank 0 writes `meta.json` and
renames the directory to `step_N` (one rename, atomic on a POSIX file system, shared ones included).
A kill at any moment leaves either the old set of complete checkpoints or the old set plus the new one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

META = "meta.json"
_NAME = re.compile(r"^step_(\d{8})$")


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


def set_aside_newer(root: str | Path, step: int) -> list[Path]:
    """Rename complete checkpoints newer than `step` to `step_N.abandoned[K]`; returns the new paths.

    After a resume from an older checkpoint (a rollback) the newer ones belong to the abandoned
    trajectory, and a later `--resume auto` (a requeued job) would jump back onto it. They are
    kept, out of the `step_N` name space, rather than deleted.
    """
    moved = []
    for newer in list_checkpoints(root):
        if int(_NAME.match(newer.name).group(1)) <= step:
            continue
        aside, n = newer.with_name(f"{newer.name}.abandoned"), 1
        while aside.exists():  # rolled back past this step before
            aside, n = newer.with_name(f"{newer.name}.abandoned{n}"), n + 1
        newer.rename(aside)
        moved.append(aside)
    return moved


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any], *, keep_last: int, extra_files: dict[str, bytes] | None = None) -> Path:
    """Collective: every rank calls it. Returns the final directory. Rank 0 writes `extra_files`
    ({name: bytes}) into it before meta.json."""
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f"{final.name}.tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    _barrier()
    if rank == 0:
        for name, data in (extra_files or {}).items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        text = json.dumps({"step": step, **meta}, indent=1, default=_json_default)
        with open(tmp / META, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a checkpoint of the same step from an earlier, abandoned attempt
            _remove(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        # Keep the one just written whatever its step (a run resumed from an older checkpoint saves
        # steps below ones already there) plus the newest keep_last - 1 others.
        others = [p for p in list_checkpoints(root) if p != final]
        for old in others[:len(others) - (keep_last - 1)] if keep_last > 0 else []:
            _remove(old)
        for stale in [*root.glob("step_*.tmp"), *root.glob("step_*.old")]:
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def _remove(path: Path) -> None:
    """Delete a checkpoint directory. Renamed out of the step_N namespace first (atomic), so a kill
    during the slow delete never leaves a step_N holding meta.json but only part of its data files."""
    trash = path.with_name(f"{path.name}.old")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.name.endswith((".tmp", ".old")):  # a save in progress or interrupted, or a deletion
        raise FileNotFoundError(f"{path} is an unfinished save or a checkpoint being deleted, never "
                                f"loaded; pass a complete step_NNNNNNNN directory under RUN_DIR/checkpoints")
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path} is not a complete slimpack checkpoint (no {META}); "
                                f"pass a step_NNNNNNNN directory under RUN_DIR/checkpoints")
    return json.loads((path / META).read_text())


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Collective: load model and optimiser state in place (any world size); returns meta.json."""
    meta = read_meta(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return meta


def load_model_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full (unsharded) fp32 model weights and meta.json, in one process, no process group.

    Reads only the `model.*` entries, so exporting a 1.5B model needs ~6 GB, not the 24 GB of
    weights plus optimiser state.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = read_meta(path)
    metadata = FileSystemReader(str(path)).read_metadata()
    model_sd = {key.removeprefix("model."): torch.empty(md.size, dtype=md.properties.dtype)
                for key, md in metadata.state_dict_metadata.items()
                if key.startswith("model.") and isinstance(md, TensorStorageMetadata)}
    state = {"model": model_sd}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state["model"], meta
