"""Local or remote (fsspec: `s3://`, `gs://`...) dataset roots behind one small interface.

Remote S3-compatible endpoints come from the usual `AWS_ENDPOINT_URL` / credentials variables.
Every write of a named file is a single put (atomic on object stores) or a local rename.

Durability (`write_atomic`): on a local file system a write is fsynced before its rename and its
directory after, so a file that a resume or a merge trusts (a part's `stats.json`, `index.json`,
the manifest, `sample_tokens.npy`, the ledgers) is never found empty or short after a power loss
or a node crash: it is either there whole or absent, and absent reads as "not done". Object
stores have no fsync: a put is durable once the server answers it (S3 and GCS are strongly
consistent, so every later read sees the whole object), and no object is ever written in place.

Two guards for data that comes from elsewhere:

- `check_member` / `member_path`: every path read from an index or manifest must name a file
  inside its root. Those files are data, and data is untrusted: a name such as
  `parts/../../outside/shard.00000.mds.zstd` would otherwise make a reader open, or the remote
  loader write, a file outside the dataset or the cache.
- `RetryPolicy`: remote reads retry with capped exponential backoff, with full jitter, for a
  bounded number of attempts, then raise `StorageError`, one line naming the URL and the fix.
  Every read of one store in a process shares one outage clock (`with_retries`), so an outage
  ends a command within the policy's span however many reads are queued.
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import fsspec
from fsspec.utils import glob_translate

from slimpack.exitcodes import TemporaryError
from slimpack.extras import require

log = logging.getLogger(__name__)


def write_atomic(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Write a local file whole or not at all: a temporary file (unique per process and thread),
    then a rename.

    ``durable``: fsync the file before the rename and its directory after, so that once this
    returns the new contents survive a crash of the machine. Without the first fsync a file
    system may persist the rename before the data (an empty file under the final name); without
    the second, the rename itself may be lost. ``durable=False`` only for files checked whole on
    every read (the loader's shard cache, hashed when opened).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a failed rename leaves no stray file
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (a rename, a new file or directory in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str | os.PathLike) -> None:
    """``mkdir -p``, each directory it creates made durable in its parent: a file made durable
    inside a new directory is then reachable after a crash too."""
    path = Path(path)
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        fsync_dir(directory.parent)


class UnsafePathError(ValueError):
    """A path read from an index or manifest that would leave its root."""

    def __init__(self, where: str, name: object, reason: str) -> None:
        super().__init__(f"{where}: {name!r} {reason}: {_UNSAFE_FIX}")
        self.where, self.name, self.reason = where, name, reason

    def __reduce__(self) -> tuple:  # pickled from a DataLoader worker to the parent
        return UnsafePathError, (self.where, self.name, self.reason)


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


class StorageError(TemporaryError):
    """A remote read given up under its RetryPolicy (the store is down); the message names URL and fix.
    Temporary: the CLI exits RESUMABLE (75), and a Slurm script requeues."""


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries of remote reads: ``attempts`` tries; after failed try k a random wait of up
    to ``first_backoff_s * 2**k``, capped at ``backoff_max_s`` (full jitter: many workers on many
    nodes do not retry in lockstep).

    ``span_s`` is the sum of those caps: 0.5 + 1 + 2 + 4 + 8 + 16 + 30 * 3 = 121.5 s with the
    defaults. A store is declared down once one read has failed ``attempts`` times, or once it has
    been failing for ``span_s`` (`with_retries`), whichever comes first; with jitter the first
    comes after half the span on average. For ``s3://`` this is the only retry (botocore's and
    s3fs's own are switched off: they would multiply the attempts), and an attempt gives up on a
    server that accepts but does not answer after ``timeout_s`` (to connect, then per read).
    """

    attempts: int = 10
    backoff_max_s: float = 30.0
    first_backoff_s: float = 0.5
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_max_s < 0 or self.first_backoff_s < 0 or self.timeout_s <= 0:
            raise ValueError(f"fetch_attempts must be >= 1, the backoff >= 0 s and the timeout > 0 s, got "
                             f"attempts={self.attempts}, backoff_max_s={self.backoff_max_s}, "
                             f"timeout_s={self.timeout_s}")

    def backoff_s(self, attempt: int) -> float:
        """The longest wait after failed attempt ``attempt`` (0-based); the wait is drawn from [0, this]."""
        return min(self.first_backoff_s * 2 ** attempt, self.backoff_max_s)

    @property
    def span_s(self) -> float:
        """How long a store may keep failing before every read of it fails at once."""
        return sum(self.backoff_s(k) for k in range(self.attempts - 1))


# Failures that another attempt cannot fix: a missing object, refused credentials, bad input.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError,
              TypeError, AttributeError, KeyError)
T = TypeVar("T")
WARN_EVERY_S = 60.0  # while a store keeps failing: one warning per store per this many seconds


class _Outage:
    """One store's outage clock, shared by every read of that store in this process.

    It starts when the first failed attempt began and stops at the next success. When one read has
    used up its attempts, or the clock reaches the policy's span, the store is down: every waiting,
    queued and later read raises the same StorageError at once, for one more span (then a read may
    try again, on a fresh clock). So a command ends within the span plus the attempt in flight,
    however many reads were queued.
    """

    def __init__(self, store: str) -> None:
        self.store = store
        self.changed = threading.Condition()
        self.since: float | None = None  # when the first failed attempt of this outage began
        self.warned = 0.0
        self.error: str | None = None  # while down: the message every read raises
        self.down_until = 0.0

    def check(self) -> None:
        """Raise the store's error while it is down."""
        with self.changed:
            if self.error is not None and time.monotonic() >= self.down_until:
                self.error = None
            if self.error is not None:
                raise StorageError(self.error)

    def succeeded(self) -> None:
        with self.changed:
            self.since = None

    def failed(self, policy: RetryPolicy, url: str, err: Exception, failed: int, start: float,
               attempt_start: float) -> float:
        """Account a failed attempt (begun at ``attempt_start``, of a read begun at ``start``):
        raise StorageError if the store is now down, else return how long to wait before the next
        attempt."""
        detail = " ".join(f"{type(err).__name__}: {err}".split())
        with self.changed:
            self.check()  # declared down by another read meanwhile
            now = time.monotonic()
            if self.since is None:  # from the start of the attempt: a timeout counts in full
                self.since, self.warned = attempt_start, 0.0
            out = now - self.since
            if failed >= policy.attempts or out >= policy.span_s:
                self.error = (
                    f"{url}: read failed {failed} time{'s' if failed > 1 else ''} over {now - start:.1f} s "
                    f"({detail}); check "
                    "that the object store is reachable (endpoint, AWS_ENDPOINT_URL, credentials, "
                    "network) and re-run (training resumes from its last checkpoint); fetch_attempts, "
                    "fetch_backoff_max_s and fetch_timeout_s set how long to keep trying")
                self.down_until, self.since = now + policy.span_s, None
                self.changed.notify_all()  # wake the reads waiting to retry: they fail now
                raise StorageError(self.error) from err
            if not self.warned or now - self.warned >= WARN_EVERY_S:
                self.warned = now
                log.warning(f"{self.store}: reads failing for {out:.0f} s ({detail}, reading {url}); "
                            f"retrying for up to {policy.span_s:.0f} s")
            return min(random.uniform(0, policy.backoff_s(failed - 1)), self.since + policy.span_s - now)

    def wait(self, seconds: float) -> None:
        """Sleep before the next attempt, waking early if the store is declared down meanwhile."""
        with self.changed:
            self.changed.wait_for(lambda: self.error is not None, timeout=seconds)


_OUTAGES: dict[str, _Outage] = {}
_OUTAGES_LOCK = threading.Lock()


def _outage(store: str) -> _Outage:
    with _OUTAGES_LOCK:
        return _OUTAGES.setdefault(store, _Outage(store))


def _forget_outages() -> None:
    # A forked DataLoader worker keeps its own clocks: its copies of the locks may be held by a
    # thread of the parent that does not exist in the child.
    global _OUTAGES_LOCK
    _OUTAGES.clear()
    _OUTAGES_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_outages)


def store_of(url: str) -> str:
    """The store a URL is read from, the key of its outage clock: scheme and bucket, and for
    ``s3://`` the endpoint (``AWS_ENDPOINT_URL``)."""
    scheme, _, rest = str(url).partition("://")
    store = f"{scheme}://{rest.split('/', 1)[0]}"
    if scheme in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            store += f" at {endpoint}"
    return store


def with_retries(policy: RetryPolicy, url: str, call: Callable[[], T], *, store: str | None = None) -> T:
    """``call()``, retried under ``policy`` and the outage clock of ``store`` (default: the URL's);
    StorageError (one line, URL and fix) once the store is declared down."""
    outage = _outage(store or store_of(url))
    start, failed = time.monotonic(), 0
    while True:
        outage.check()
        attempt_start = time.monotonic()
        try:
            result = call()
        except _PERMANENT:
            raise
        except Exception as err:  # connection refused, timeouts, 5xx: whatever the library raises
            failed += 1
            outage.wait(outage.failed(policy, url, err, failed, start, attempt_start))
            continue
        outage.succeeded()
        return result


def is_remote(url: str | os.PathLike) -> bool:
    text = str(url)
    return "://" in text and not text.startswith("file://")


class Root:
    """A dataset root directory, local or remote."""

    def __init__(self, url: str | os.PathLike, *, retry: RetryPolicy | None = None) -> None:
        """``retry``: remote reads (``read_bytes``) follow this policy instead of the library's."""
        self.url = str(url).rstrip("/")
        self.remote = is_remote(self.url)
        self.retry = retry if self.remote else None
        self.store = store_of(self.url)
        if self.remote:
            if self.url.startswith(("s3://", "s3a://")):
                require("s3fs")  # else fsspec's own ImportError, which names no slimpack extra
            s3 = retry is not None and self.url.startswith(("s3://", "s3a://"))
            options = {}
            if s3:
                # One botocore request per attempt of ours: the policy is then the whole story. On
                # an instance of our own, not fsspec's cached one that other roots and callers with
                # the same options share: s3fs's loop around each request (5 tries of timeouts and
                # SlowDown, an attribute) is switched off below for this instance alone.
                options["config_kwargs"] = {"retries": {"max_attempts": 1, "mode": "standard"},
                                            "connect_timeout": retry.timeout_s,
                                            "read_timeout": retry.timeout_s}
                options["skip_instance_cache"] = True
            self.fs, self.path = fsspec.core.url_to_fs(self.url, **options)
            if s3:
                self.fs.retries = 1
        else:
            self.fs, self.path = fsspec.filesystem("file"), str(Path(self.url).absolute())

    def join(self, *names: str) -> str:
        return "/".join([self.path, *names])

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.join(name))

    def read_bytes(self, name: str) -> bytes:
        if self.retry is None:
            return self._read(name)
        return with_retries(self.retry, f"{self.url}/{name}", lambda: self._read(name), store=self.store)

    def _read(self, name: str) -> bytes:
        # One GET (open() would first ask for the size): half the requests a silent server can hang.
        return self.fs.cat_file(self.join(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        path = self.join(name)
        if self.remote:
            self.fs.pipe_file(path, data)
            return
        make_dirs(Path(path).parent)
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
