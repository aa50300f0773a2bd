"""Local or remote (fsspec: `s3://`, `gs://`...) dataset roots behind one small interface.

Remote S3-compatible endpoints come from the usual `AWS_ENDPOINT_URL` / credentials variables.
Every write of a named file is a single put (atomic on object stores) or a local rename.

`check_member` / `member_path`: every path read from an index or manifest must name a file
inside its root. Those files are data, and data is untrusted: a name such as
`parts/../../outside/shard.00000.mds.zstd` would otherwise make a reader open, or the remote
loader write, a file outside the dataset or the cache.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
import threading
from pathlib import Path

import fsspec
from fsspec.utils import glob_translate


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write a local file whole or not at all: a temporary file (unique per process and thread),
    then a rename."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a failed rename leaves no stray file
        raise


class UnsafePathError(ValueError):
    """A path read from an index or manifest that would leave its root."""

    def __init__(self, where: str, name: object, reason: str) -> None:
        super().__init__(f"{where}: {name!r} {reason}: {_UNSAFE_FIX}")
        self.name, self.reason = name, reason


# A backslash is a separator on Windows and never in a name slimpack writes; control characters
# make names that print as something else.
_ODD_CHARACTERS = re.compile(r"[\x00-\x1f\x7f\\]")
_UNSAFE_FIX = ("a dataset names only relative paths inside its root, so this index or manifest was "
               "not written by slimpack or was altered; nothing was read or written with it: "
               "rebuild it from trusted parts (`slimpack shards merge DIR`) or discard the dataset")


def check_member(name: str, *, where: str) -> str:
    """``name`` unchanged when it is a relative POSIX path that stays inside its root.

    Refused, before anything is read or written with it: a non-string or empty name, an absolute
    path, a ``.``, ``..`` or empty step, a backslash or a control character. This is the whole
    check for object-store keys (no symlinks there); local paths also go through `member_path`.
    """
    if not isinstance(name, str) or not name:
        reason = "is not a file name"
    elif name.startswith("/"):
        reason = "is an absolute path"
    elif _ODD_CHARACTERS.search(name):
        reason = "holds a backslash or a control character"
    else:
        bad = next((step for step in name.split("/") if step in ("", ".", "..")), None)
        reason = None if bad is None else f"has a {bad!r} step"
    if reason:
        raise UnsafePathError(where, name, reason)
    return name


def member_path(root: str | os.PathLike, name: str, *, where: str) -> Path:
    """``root / name`` on local disk, refusing a name that leaves ``root``, through symlinks too."""
    check_member(name, where=where)
    path = Path(root) / name
    base = Path(root).resolve()
    real = path.resolve()
    if not real.is_relative_to(base):
        raise UnsafePathError(where, name, f"resolves to {real}, outside {base} (a symlink leads out)")
    return path


def is_remote(url: str | os.PathLike) -> bool:
    text = str(url)
    return "://" in text and not text.startswith("file://")


class Root:
    """A dataset root directory, local or remote."""

    def __init__(self, url: str | os.PathLike) -> None:
        self.url = str(url).rstrip("/")
        self.remote = is_remote(self.url)
        if self.remote:
            self.fs, self.path = fsspec.core.url_to_fs(self.url)
        else:
            self.fs, self.path = fsspec.filesystem("file"), str(Path(self.url).absolute())

    def join(self, *names: str) -> str:
        return "/".join([self.path, *names])

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.join(name))

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open(self.join(name), "rb") as f:
            return f.read()

    def write_bytes(self, name: str, data: bytes) -> None:
        path = self.join(name)
        if self.remote:
            self.fs.pipe_file(path, data)
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)

    def upload(self, local: str | os.PathLike, name: str) -> None:
        """Copy a local file to `name` under this root."""
        if self.remote:
            self.fs.put_file(str(local), self.join(name))
        else:
            self.write_bytes(name, Path(local).read_bytes())

    def glob(self, pattern: str) -> list[str]:
        """Names (relative to the root) matching a glob pattern, sorted.

        Only `pattern` is a pattern: the root's own path is literal, though it may hold `[`, `]`,
        `*` or `?` (fsspec's glob of the joined path would read those as wildcards).
        """
        parts = pattern.split("/")
        fixed = list(itertools.takewhile(lambda p: not glob.has_magic(p), parts))
        base = self.join(*fixed)
        depth = None if "**" in pattern else len(parts) - len(fixed)
        match = re.compile(glob_translate(pattern)).match
        prefix = self.path + "/"
        names = (p[len(prefix):] if p.startswith(prefix) else p
                 for p in self.fs.find(base, maxdepth=depth, withdirs=True))
        return sorted(n for n in names if match(n))

    def remove_tree(self, name: str) -> None:
        path = self.join(name)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
