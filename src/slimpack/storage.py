"""Local or remote (fsspec: `s3://`, `gs://`...) dataset roots behind one small interface.

Remote S3-compatible endpoints come from the usual `AWS_ENDPOINT_URL` / credentials variables.
Every write of a named file is a single put (atomic on object stores) or a local rename.
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

from slimpack.extras import require


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


def is_remote(url: str | os.PathLike) -> bool:
    text = str(url)
    return "://" in text and not text.startswith("file://")


class Root:
    """A dataset root directory, local or remote."""

    def __init__(self, url: str | os.PathLike) -> None:
        self.url = str(url).rstrip("/")
        self.remote = is_remote(self.url)
        if self.remote:
            if self.url.startswith(("s3://", "s3a://")):
                require("s3fs")  # else fsspec's own ImportError, which names no slimpack extra
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
