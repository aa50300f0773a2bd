"""Shard access for the loader: decoded-shard LRU, and for remote roots a verified local cache.

Local datasets are read in place (never copied, never deleted). Uncompressed shards are
memory-mapped; compressed ones are decompressed whole and kept in a small LRU (by bytes), since
a zstd frame cannot be read in the middle. Every shard is checked against its index hash when it
is opened, local or not.

Remote datasets (``s3://...``) are downloaded shard by shard into ``cache_dir`` ahead of use:
the loader knows exactly which samples come next and calls ``prefetch``. Every download is
checked against the index hash (xxh3_64, else sha1, else size) before an atomic rename, and
checked again when opened: a cached file cut short or damaged since is deleted and fetched once
more. Remote reads follow the loader's ``RetryPolicy`` (bounded attempts, capped backoff with full
jitter) on the store's one outage clock, then fail with one line naming the URL
(``storage.StorageError``); the downloads queued behind that one then fail at once. ``evict`` keeps the cache under
``cache_limit_bytes`` by deleting cached files that are not pinned (needed soon), least
recently needed first. It only ever deletes files it finds under ``cache_dir`` that the index
names: a local dataset is never touched.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from slimpack.pipeline.index import DatasetIndex
from slimpack.shards.mds import Shard, ShardFormatError, decode_shard, hash_bytes
from slimpack.storage import RetryPolicy, Root, member_path, write_atomic


def verify_shard_bytes(index: DatasetIndex, i: int, data: bytes | mmap.mmap, where: str) -> None:
    """Raise ShardFormatError unless ``data`` matches the index's size and hash for shard i."""
    expected = int(index.shard_bytes[i])
    if len(data) != expected:
        raise ShardFormatError(f"{where}: {len(data)} bytes, index.json says {expected}: the copy is "
                               "truncated or the index is stale; re-copy the shard or re-run the merge")
    if index.shard_hashes[i] is not None:
        algo, want = index.shard_hashes[i]
        got = hash_bytes(algo, data)
        if got != want:
            raise ShardFormatError(f"{where}: {algo} {got} != {want} in index.json: the shard is corrupt; "
                                   "re-copy it from a good source or re-tokenize its part")


class ShardStore:
    """Decoded shards by index, from a local root or a remote root through a local cache."""

    def __init__(self, index: DatasetIndex, *, cache_dir: str | None, cache_limit_bytes: int,
                 decoded_cache_bytes: int, download_threads: int = 4,
                 retry: RetryPolicy | None = None) -> None:
        self.index = index
        self.root = Root(index.url, retry=retry)
        self.remote = self.root.remote
        self.decoded_cache_bytes = decoded_cache_bytes
        self._decoded: OrderedDict[int, tuple[Shard, int]] = OrderedDict()
        self._decoded_bytes = 0
        self.cache_limit_bytes = cache_limit_bytes
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._threads = download_threads
        self._names: dict[str, int] | None = None
        self.downloads = 0
        self.decodes = 0
        self.evicted = 0
        self.refetched = 0
        if self.remote:
            if self.cache_dir is None:
                raise ValueError(f"{index.url} is remote: set cache_dir to a local directory for shards")
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ files

    def _cache_path(self, i: int) -> Path:
        return member_path(self.cache_dir, self.index.shard_names[i], where=f"{self.index.url}: shard {i}")

    def local_path(self, i: int) -> Path:
        """Path of shard i's stored file on local disk, downloading (and verifying) it if needed."""
        if not self.remote:
            return member_path(self.root.path, self.index.shard_names[i],
                               where=f"{self.index.url}: shard {i}")
        path = self._cache_path(i)
        if path.exists():
            return path
        with self._lock:
            fut = self._pending.get(i)
        if fut is not None:
            fut.result()
            return path
        self._download(i)
        return path

    def _download(self, i: int) -> None:
        name = self.index.shard_names[i]
        path = self._cache_path(i)
        if path.exists():
            return
        data = self.root.read_bytes(name)
        verify_shard_bytes(self.index, i, data, f"{self.root.url}/{name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data, durable=False)  # no fsync: every open hashes it, and refetches it
        with self._lock:
            self.downloads += 1

    def prefetch(self, shard_ids: list[int]) -> None:
        """Start downloading shards that are not cached yet (remote only; returns at once)."""
        if not self.remote:
            return
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="slimpack-fetch")
            for i in shard_ids:
                if i in self._pending or self._cache_path(i).exists():
                    continue
                fut = self._pool.submit(self._download, i)
                fut.add_done_callback(lambda _f, i=i: self._done(i))
                self._pending[i] = fut

    def _done(self, i: int) -> None:
        # A failed download is not raised here: local_path retries it when the shard is needed
        # and raises there, with the shard's name, in the thread that builds the batch.
        with self._lock:
            self._pending.pop(i, None)

    def wait(self) -> None:
        """Block until every pending download has finished (raises the first download error)."""
        with self._lock:
            futures = list(self._pending.values())
        for fut in futures:
            fut.result()

    def cached_files(self) -> dict[str, int]:
        """Basename -> size of every index shard present in the cache (a walk of the cache only)."""
        if not self.remote:
            return {}
        if self._names is None:
            self._names = {name: i for i, name in enumerate(self.index.shard_names)}
        out = {}
        for dirpath, _, filenames in os.walk(self.cache_dir):
            rel = os.path.relpath(dirpath, self.cache_dir)
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")
                if key in self._names:
                    try:
                        out[key] = os.stat(os.path.join(dirpath, name)).st_size
                    except FileNotFoundError:
                        continue
        return out

    def evict(self, pinned: set[int], order: list[int] | None = None) -> int:
        """Delete unpinned cached shards until the cache fits ``cache_limit_bytes``; returns bytes freed.

        ``order``: shard ids from least to most recently needed (evicted first to last); cached
        shards not in it go first. Only files under ``cache_dir`` named by the index are deleted.
        """
        if not self.remote:
            return 0
        files = self.cached_files()
        total = sum(files.values())
        if total <= self.cache_limit_bytes:
            return 0
        names = self.index.shard_names
        ranked = {i: r for r, i in enumerate(order or [])}
        candidates = sorted((self._names[n] for n in files if self._names[n] not in pinned),
                            key=lambda i: ranked.get(i, -1))
        freed = 0
        for i in candidates:
            if total - freed <= self.cache_limit_bytes:
                break
            with self._lock:
                if i in self._pending:
                    continue
            try:
                self._cache_path(i).unlink()
            except FileNotFoundError:
                continue
            freed += files[names[i]]
            self.evicted += 1
        return freed

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # ------------------------------------------------------------------ decoded shards

    def _open(self, i: int, *, mapped: bool) -> tuple[bytes | mmap.mmap, Path]:
        """The stored bytes of shard i (read, or memory-mapped) and their local path."""
        path = self.local_path(i)
        try:
            return _read_file(path, mapped), path
        except FileNotFoundError:
            if not self.remote:
                raise
        # Ranks sharing a cache evict each other's unpinned files: one may vanish between
        # local_path's check and the open. Fetch it again, once.
        path = self.local_path(i)
        return _read_file(path, mapped), path

    def shard(self, i: int) -> Shard:
        hit = self._decoded.get(i)
        if hit is not None:
            self._decoded.move_to_end(i)
            return hit[0]
        info = self.index.shard_info(i)
        data, path = self._open(i, mapped=not info.compression)
        # Hash every shard as it is opened, local ones too: a flipped bit in a zstd frame written
        # without a content checksum, or in a raw shard, would otherwise decode into wrong tokens
        # silently. xxh3_64 runs at memory speed, far faster than the decompression that follows.
        try:
            verify_shard_bytes(self.index, i, data, str(path))
        except ShardFormatError:
            if not self.remote:
                raise
            # A cached copy was verified when downloaded, so it was cut short or damaged since
            # (a full disk, a crash of another tool, a hand edit): fetch it again, once. A fresh
            # copy that fails too is the remote's own fault, and raised.
            path.unlink(missing_ok=True)
            self.refetched += 1
            data, path = self._open(i, mapped=not info.compression)
            verify_shard_bytes(self.index, i, data, str(path))
        if info.compression:
            shard = decode_shard(data, info, str(path))
            size = len(shard.raw)
        else:
            # Mapped: page cache rather than our heap, but charged to the same budget all the same,
            # so a long run keeps a bounded number of open mappings (the kernel caps them per
            # process, vm.max_map_count) instead of one per shard ever read. Re-mapping is cheap;
            # an evicted mapping lives on while a batch still holds a view of it.
            shard, size = Shard(data, info, str(path)), len(data)
        self.decodes += 1
        self._decoded[i] = (shard, size)
        self._decoded_bytes += size
        while self._decoded_bytes > self.decoded_cache_bytes and len(self._decoded) > 1:
            _, (_, old) = self._decoded.popitem(last=False)
            self._decoded_bytes -= old
        return shard

    def sample(self, sample_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens uint32, cu_seqlens int32) of a global sample id, checked against the index."""
        i = int(np.searchsorted(self.index.shard_starts, sample_id, side="right")) - 1
        k = sample_id - int(self.index.shard_starts[i])
        shard = self.shard(i)
        cols = shard.columns(k)
        tokens = _ndarray(cols["tokens"], np.uint32)
        cu = _ndarray(cols["cu_seqlens"], np.int32)
        expected = int(self.index.sample_tokens[sample_id])
        if len(tokens) != expected or len(cu) < 2 or cu[0] != 0 or cu[-1] != len(tokens):
            raise ShardFormatError(
                f"{shard.where}: sample {k} (global {sample_id}) has {len(tokens)} tokens and "
                f"cu_seqlens {cu[:3].tolist()}...{cu[-1:].tolist()}, but sample_tokens.npy says "
                f"{expected}: the shard and the index disagree; run `slimpack shards validate`")
        return tokens, cu


def _read_file(path: Path, mapped: bool) -> bytes | mmap.mmap:
    with open(path, "rb") as f:
        if not mapped:
            return f.read()
        size = os.fstat(f.fileno()).st_size
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""


def _ndarray(view: memoryview, dtype: type) -> np.ndarray:
    """Decode an ``ndarray:<dtype>`` column with a dynamic 1-D shape (our schema's columns)."""
    byte = view[0]
    ndim, code = byte >> 2, byte & 3
    if ndim != 1:
        raise ShardFormatError(f"expected a 1-D column, got {ndim}-D")
    width = 1 << code
    n = int.from_bytes(view[1:1 + width], "little")
    return np.frombuffer(view, dtype, n, 1 + width)
