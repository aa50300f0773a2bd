"""One tokenize run at a time per part: an flock(2) on `parts/<part>.lock` while the part is
checked, cleared and written."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from slimpack.storage import Root
from slimpack.tokenize.layout import part_dir_name


def lock_path(root: Root, part: str) -> Path:
    if root.remote:  # no lock on an object store: a local file, so runs on this host exclude each other
        key = hashlib.sha256(root.url.encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / "slimpack-locks" / key / f"{part}.lock"
    return Path(root.join(f"{part_dir_name(part)}.lock"))


def _flock(fd: int, path: Path, part: str) -> None:
    """Take an exclusive flock(2) on `fd`, saying once on stderr whom it waits for."""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace") or "another run"
            print(f"tokenize: part {part} is being written by {holder} (another run on this --out); "
                  "waiting for it", file=sys.stderr, flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as err:
        raise RuntimeError(f"{path}: cannot lock ({err.strerror or err}): this filesystem does not "
                           "support flock(2) (e.g. Lustre without -o flock); use --out on one that "
                           "does") from err


@contextlib.contextmanager
def part_lock(root: Root, part: str) -> Iterator[None]:
    """Hold `part` exclusively while it is checked, cleared and written.

    Two runs on one --out used to clear each other's parts (each part starts by removing its
    directory), even one the other had completed and merged. Under this lock a run re-checks the
    part and skips it when complete, so concurrent runs wait for each other part by part and end
    with the bytes of one run; nodes of one job hold disjoint parts and never wait.

    flock(2) on `parts/<part>.lock`: the kernel drops it when the holder dies, so a killed run
    never leaves a part locked. For a remote --out the lock file is local (`$TMPDIR/slimpack-
    locks/`): runs on one host exclude each other; runs on different hosts are not protected. The
    file is removed on release; a waiter then holds a removed file, notices, and locks afresh.
    """
    path = lock_path(root, part)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock(fd, path, part)
            held = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        with contextlib.suppress(FileNotFoundError):
            now = os.stat(path)
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # before the unlock: a waiter never sees it as current
        os.close(fd)
