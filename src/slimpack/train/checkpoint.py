"""Checkpoints with torch.distributed.checkpoint: sharded, atomic, newest-K, loadable at any world size.

Layout under `RUN_DIR/checkpoints/`:

    step_00001000/          a complete checkpoint (only complete ones carry this name)
      .metadata, __0_0.distcp, ...   DCP files: {"model": ..., "optim": ...}, each rank its shards
      position_frequency.npy  the position-frequency ledger (train/ledger.py)
      meta.json             step, tokens, schedule, loader state, wandb id, resolved config,
                            model config, provenance, and the size and xxh3_128 of every other
                            file ("files"): written last, before the rename
    step_00002000.tmp/      a save in progress, or one that was interrupted: never loaded,
                            removed by the next save
    step_00000500.old/      a pruned checkpoint being deleted (renamed first): never loaded
    step_00003000.abandoned/  newer than the checkpoint a run was rolled back to (set aside by
                            the trainer so --resume auto never returns to it); kept for the user
    step_00004000.corrupt/  a checkpoint whose files differ from what its save recorded
                            (truncated, bit-flipped, missing), set aside by --resume auto, which
                            then resumed from the newest one that verifies; kept for the user

Atomicity: every rank writes into `step_N.tmp`; after a barrier rank 0 writes `meta.json` and
renames the directory to `step_N` (one rename, atomic on a POSIX file system, shared ones included).
A kill at any moment leaves either the old set of complete checkpoints or the old set plus the new one.
The trainer saves through `AsyncCheckpointer` (checkpoint.async_save): training waits for a host
copy of the state, and a thread does all of the above, pruning included, while training goes on.

Integrity: each rank hashes the files it wrote (DCP names them `__RANK_*.distcp`), rank 0 gathers
the records into meta.json, and every load checks sizes and hashes before DCP reads a byte, so a
truncated or bit-flipped file is named instead of training on garbage. xxh3_128 costs nothing
measurable beyond reading the bytes (BENCHMARKS.md); at resume each rank checks a share of the files.

Checkpoints are code: DCP unpickles `.metadata` and the non-tensor entries of the `.distcp` files
(`pickle.load`, `torch.load(weights_only=False)`), so loading a crafted checkpoint runs whatever it
carries. The checksums catch corruption, not tampering (whoever can write the files can write
meta.json). Resume and export only checkpoints you or your cluster wrote.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from slimpack.model.checkpoint_files import (  # reading is the model layer's; the trainer's API names it too
    META,
    CheckpointCorrupt,
    checkpoint_name,
    checkpoint_step,
    file_record,
    gather_objects,
    latest_checkpoint,
    list_checkpoints,
    load_model_state_dict,
    read_meta,
    resolve_checkpoint,
    verify_checkpoint,
)

__all__ = ["META", "AsyncCheckpointer", "CheckpointCorrupt", "checkpoint_name", "latest_checkpoint", "list_checkpoints",
           "load_checkpoint", "load_for_resume", "load_model_state_dict", "read_meta", "resolve_checkpoint",
           "save_checkpoint", "set_aside_newer", "verify_checkpoint"]

log = logging.getLogger(__name__)


def set_aside_newer(root: str | Path, step: int) -> list[Path]:
    """Rename complete checkpoints newer than `step` to `step_N.abandoned[K]`; returns the new paths.

    After a resume from an older checkpoint (a rollback) the newer ones belong to the abandoned
    trajectory, and a later `--resume auto` (a requeued job) would jump back onto it. They are
    kept, out of the `step_N` name space, rather than deleted.
    """
    return [_set_aside(newer, "abandoned") for newer in list_checkpoints(root) if checkpoint_step(newer) > step]


def _set_aside(path: Path, suffix: str) -> Path:
    """Rename `step_N` to `step_N.<suffix>`, or `.<suffix>1`, ... if set aside before; returns the new path."""
    aside, n = path.with_name(f"{path.name}.{suffix}"), 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.{suffix}{n}"), n + 1
    path.rename(aside)
    return aside


def _barrier(group: Any = None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any], *, keep_last: int, extra_files: dict[str, bytes] | None = None) -> Path:
    """Collective: every rank calls it. Returns the final directory. Rank 0 writes `extra_files`
    ({name: bytes}) into it before meta.json. Synchronous: returns once the checkpoint is complete
    (`AsyncCheckpointer` saves off the critical path)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return _write(Path(root), step, {"model": model_sd, "optim": optim_sd}, meta, keep_last=keep_last,
                  extra_files=extra_files)


def _write(root: Path, step: int, state: dict[str, Any], meta: dict[str, Any], *, keep_last: int,
           extra_files: dict[str, bytes] | None, group: Any = None) -> Path:
    """Write `state` as the checkpoint of `step`: DCP files into step_N.tmp, checksums, meta.json,
    the rename, then the pruning of old checkpoints. Collective on `group` (default: the world)."""
    final = root / checkpoint_name(step)
    tmp = root / f"{final.name}.tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier(group)
    dcp.save(state, checkpoint_id=str(tmp), process_group=group)
    # Each rank hashes its own files while they are still in its page cache; rank 0 adds .metadata
    # and anything not claimed (should DCP ever name files differently). The gather is also the
    # barrier that keeps rank 0 from writing meta.json before every rank's files are complete.
    mine = {p.name: file_record(p) for p in sorted(tmp.glob(f"__{rank}_*"))}
    records = gather_objects(mine, group)
    if rank == 0:
        for name, data in (extra_files or {}).items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        files = {name: rec for part in records for name, rec in part.items()}
        for p in sorted(tmp.iterdir()):  # .metadata and the extra files (the ledger)
            if p.name not in files and p.name != META:
                files[p.name] = file_record(p)
        text = json.dumps({"step": step, **meta, "files": files}, indent=1, default=_json_default)
        with open(tmp / META, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)  # the entries of meta.json and the extra files, before the rename
        if final.exists():  # a checkpoint of the same step from an earlier, abandoned attempt
            _remove(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        # Keep the one just written whatever its step (a run resumed from an older checkpoint saves
        # steps below ones already there) plus the newest keep_last - 1 others. Only now, with the
        # new one complete: the newest complete checkpoint is never the one deleted.
        others = [p for p in list_checkpoints(root) if p != final]
        for old in others[:len(others) - (keep_last - 1)] if keep_last > 0 else []:
            _remove(old)
        for stale in [*root.glob("step_*.tmp"), *root.glob("step_*.old")]:
            shutil.rmtree(stale, ignore_errors=True)
    _barrier(group)
    return final


class AsyncCheckpointer:
    """Checkpoints off the critical path. `save` waits for the previous save, copies this rank's
    shards of the weights and optimiser state to host memory (the only part training waits for:
    a device-to-host copy) and returns; a thread then writes them exactly as `save_checkpoint` does
    (checksums, meta.json, rename, pruning), its collectives on a gloo process group of its own
    (created here: collective, every rank calls it), while training goes on. `wait()` returns the
    last complete checkpoint and raises a failed save's error. Collective calls, like
    `save_checkpoint`."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._staged: dict[str, Any] | None = None  # host buffers, reused by every save
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._last: Path | None = None

    def save(self, root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             meta: dict[str, Any], *, keep_last: int, extra_files: dict[str, bytes] | None = None) -> Path:
        """Returns the directory the checkpoint will have once complete."""
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

        self.wait()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if self._staged is None:
            pin = any(t.is_cuda for t in _local_tensors(state))
            self._staged = _create_cpu_state_dict(state, pin_memory=pin)
        _copy_state_dict(state, self._staged, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the host copy is complete before training changes the weights
        self._thread = threading.Thread(target=self._run, name="slimpack-checkpoint", daemon=True,
                                        args=(Path(root), step, self._staged, meta, keep_last, extra_files))
        self._thread.start()
        return Path(root) / checkpoint_name(step)

    def _run(self, *args: Any) -> None:
        try:
            self._last = _write(*args[:4], keep_last=args[4], extra_files=args[5], group=self.group)
        except BaseException as err:  # raised in the training thread by wait()
            self._error = err

    def wait(self) -> Path | None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return self._last


def _local_tensors(state: Any) -> list[torch.Tensor]:
    if isinstance(state, dict):
        return [t for v in state.values() for t in _local_tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _local_tensors(v)]
    if isinstance(state, torch.Tensor):
        return [state.to_local() if hasattr(state, "to_local") else state]
    return []


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


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Collective: verify, then load model and optimiser state in place (any world size); returns
    meta.json. Raises CheckpointCorrupt (before touching the model) if a file is not as saved."""
    meta = read_meta(path)
    verify_checkpoint(path, meta)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return meta


def load_for_resume(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, fall_back: bool,
                    check: Callable[[Path, dict[str, Any]], None] | None = None) -> tuple[Path, dict[str, Any]]:
    """Collective: load `path` (verified), or with `fall_back` (--resume auto) the newest checkpoint
    at or below its step that verifies. Corrupt newer ones are renamed `step_N.corrupt` (rank 0), so a
    requeued job does not trip over them again; with none good nothing is moved and it raises.
    `check(path, meta)` vets meta.json first (e.g. the model shape); its errors are not corruption."""
    path = Path(path)
    candidates = [path]
    if fall_back:
        candidates = [p for p in reversed(list_checkpoints(path.parent)) if checkpoint_step(p) <= checkpoint_step(path)]
    bad: list[Path] = []
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    for candidate in candidates:
        try:
            if check is not None:
                check(candidate, read_meta(candidate))
            meta = load_checkpoint(candidate, model, optimizer)
        except CheckpointCorrupt as err:
            if not fall_back:
                raise
            if is_main:
                log.warning(f"{err}")
            bad.append(candidate)
            continue
        if is_main:
            for corrupt in bad:
                log.warning(f"set aside corrupt {corrupt} as {_set_aside(corrupt, 'corrupt')}")
        _barrier()
        return candidate, meta
    raise CheckpointCorrupt(f"no checkpoint under {path.parent} verifies ({len(bad)} tried, see above); "
                            f"nothing was moved: move them away to start over, or restore them from a copy")
