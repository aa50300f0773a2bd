"""Remote datasets against a real S3 API server on loopback (moto's server mode, not mocks)."""

import logging
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_data import PARTS, escape_part, make_dataset

from slimpack import exitcodes
from slimpack.cli import main
from slimpack.pipeline import LoaderConfig, PackedLoader
from slimpack.shards.mds import ShardFormatError
from slimpack.storage import RetryPolicy, Root, StorageError, UnsafePathError

L, G_SEQS = 16, 8
_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in [*_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(_ENV, AWS_ENDPOINT_URL=f"http://{host}:{port}")
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("data")
    yield fs
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def _upload(fs, local: Path, prefix: str) -> str:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"data/{prefix}/{path.relative_to(local).as_posix()}")
    return f"s3://data/{prefix}"


def cfg(path, **kw):
    return LoaderConfig(str(path), seq_len=L, global_batch_tokens=L * G_SEQS, micro_batch_size=2, **kw)


def _cache_bytes(cache: Path) -> int:
    """Bytes under the cache (files may vanish mid-walk: the loader evicts in the background)."""
    total = 0
    for p in cache.rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except FileNotFoundError:
            continue
    return total


def test_remote_equals_local_with_a_bounded_cache(s3, dataset, tmp_path):
    url = _upload(s3, dataset, "ds")
    local = PackedLoader(cfg(dataset, epochs=2))
    shard_bytes = sorted(p.stat().st_size for p in dataset.rglob("shard.*"))
    limit = 4 * shard_bytes[-1]
    cache = tmp_path / "cache"
    cache.mkdir()
    keep = cache / "notes.txt"  # not a shard of the index: never evicted
    keep.write_text("mine")
    before = {p: p.stat().st_mtime_ns for p in dataset.rglob("*") if p.is_file()}
    remote = PackedLoader(cfg(url, epochs=2, cache_dir=str(cache), cache_limit_bytes=limit,
                              prefetch_steps=1))
    assert remote.fingerprint == local.fingerprint
    peak = 0
    for a, b in zip(local, remote, strict=True):
        for ma, mb in zip(a, b, strict=True):
            for k in ("input_ids", "labels", "position_ids", "cu_seqlens"):
                assert torch.equal(ma[k], mb[k])
            assert ma["max_seqlen"] == mb["max_seqlen"]
        peak = max(peak, _cache_bytes(cache))
    store = remote.stream.store
    # Bounded: the limit, plus at most the shards pinned for the next steps while they download.
    assert peak <= limit + 6 * shard_bytes[-1]
    assert store.evicted > 0 and store.downloads > store.evicted
    assert keep.read_text() == "mine"
    assert {p: p.stat().st_mtime_ns for p in dataset.rglob("*") if p.is_file()} == before
    remote.close()


def test_prefetch_downloads_ahead(s3, dataset, tmp_path):
    url = _upload(s3, dataset, "ahead")
    loader = PackedLoader(cfg(url, cache_dir=str(tmp_path / "c"), prefetch_steps=3))
    it = iter(loader)
    next(it)
    loader.stream.store.wait()
    for step in range(1, 4):
        for i in loader.stream.shards_for(step).tolist():
            assert (tmp_path / "c" / loader.index.shard_names[i]).exists()
    loader.close()


def test_remote_workers_agree(s3, dataset, tmp_path):
    url = _upload(s3, dataset, "workers")
    local = PackedLoader(cfg(dataset, max_tokens=L * G_SEQS * 6))
    remote = PackedLoader(cfg(url, max_tokens=L * G_SEQS * 6, num_workers=2, cache_dir=str(tmp_path / "c")))
    got = [torch.cat([mb["input_ids"] for mb in step]) for step in remote]
    want = [torch.cat([mb["input_ids"] for mb in step]) for step in local]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)) and len(got) == 6
    remote.close()


def test_corrupt_remote_shard_is_refused_and_not_cached(s3, tmp_path):
    local = make_dataset(tmp_path / "ds", parts=PARTS, seed=3)
    url = _upload(s3, local, "corrupt")
    loader = PackedLoader(cfg(url, epochs=1, cache_dir=str(tmp_path / "c")))
    shard = loader.index.shard_names[int(loader.stream.shards_for(0)[0])]
    data = bytearray((local / shard).read_bytes())
    data[-3] ^= 0x01
    s3.pipe_file(f"data/corrupt/{shard}", bytes(data))
    with pytest.raises(ShardFormatError, match=rf"{shard}: xxh3_64 [0-9a-f]+ != [0-9a-f]+ in index.json"):
        list(loader)
    assert not (tmp_path / "c" / shard).exists()
    assert np.array_equal(np.frombuffer((local / shard).read_bytes(), np.uint8)[:-3], np.asarray(data[:-3]))
    loader.close()


def test_ranks_sharing_one_small_cache(s3, dataset, tmp_path):
    url = _upload(s3, dataset, "shared")
    limit = 3 * max(p.stat().st_size for p in dataset.rglob("shard.*"))
    ranks = [PackedLoader(LoaderConfig(url, seq_len=L, global_batch_tokens=L * G_SEQS, micro_batch_size=2,
                                       rank=r, world_size=2, epochs=1, cache_dir=str(tmp_path / "c"),
                                       cache_limit_bytes=limit, prefetch_steps=1)) for r in range(2)]
    local = [PackedLoader(LoaderConfig(str(dataset), seq_len=L, global_batch_tokens=L * G_SEQS,
                                       micro_batch_size=2, rank=r, world_size=2, epochs=1)) for r in range(2)]
    for steps in zip(*ranks, *local, strict=True):
        for got, want in zip(steps[:2], steps[2:], strict=True):
            assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(got, want, strict=True))
    assert sum(r.stream.store.evicted for r in ranks) > 0
    for r in ranks:
        r.close()


def test_a_bucket_naming_keys_outside_the_dataset_gets_nothing_written(s3, tmp_path):
    # Whoever controls the bucket picks the names and bytes: `parts/../../outside/...` would land
    # in <cache>/../outside/ (a path and content of their choosing) if the loader trusted it.
    local = make_dataset(tmp_path / "ds", parts={"p": ("train", 60), "q": ("train", 40)})
    outside = escape_part(local, "p", "../../outside")
    url = _upload(s3, local, "hostile")
    for path in outside.iterdir():
        s3.put_file(str(path), f"data/hostile/parts/../../outside/{path.name}")
    cache = tmp_path / "run" / "cache"
    with pytest.raises(UnsafePathError, match=r"'parts/\.\./\.\./outside/shard\.00000\.mds\.zstd' has a "
                                              r"'\.\.' step"):
        list(PackedLoader(cfg(url, epochs=1, cache_dir=str(cache))))
    assert not (tmp_path / "run" / "outside").exists()
    assert not cache.exists() or not any(cache.rglob("*"))


class _Endpoint:
    """A second S3 server on loopback over moto's in-process store (what the `s3` fixture
    uploaded is there too), on a fixed port, for a test to stop and start again."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._make = lambda port: ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server = self._make(0)
        self.server.start()
        self.host, self.port = self.server.get_host_and_port()
        self.up = True

    def stop(self) -> None:
        if self.up:
            self.server.stop()
            self.up = False

    def start(self) -> None:
        self.server = self._make(self.port)
        self.server.start()
        self.up = True


@pytest.fixture
def endpoint(s3, monkeypatch):
    s3fs = pytest.importorskip("s3fs")
    ep = _Endpoint()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{ep.host}:{ep.port}")
    s3fs.S3FileSystem.clear_instance_cache()
    yield ep
    ep.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_truncated_file_in_the_cache_is_fetched_again(s3, dataset, tmp_path):
    url = _upload(s3, dataset, "refetch")
    cache = tmp_path / "c"
    loader = PackedLoader(cfg(url, max_tokens=L * G_SEQS * 3, cache_dir=str(cache), prefetch_steps=0))
    name = loader.index.shard_names[int(loader.stream.shards_for(0)[0])]
    (cache / name).parent.mkdir(parents=True)
    (cache / name).write_bytes((dataset / name).read_bytes()[:1000])  # a copy cut short
    local = PackedLoader(cfg(dataset, max_tokens=L * G_SEQS * 3))
    for a, b in zip(local, loader, strict=True):
        assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    assert loader.stream.store.refetched == 1
    assert (cache / name).read_bytes() == (dataset / name).read_bytes()
    loader.close()


def test_a_short_outage_is_ridden_out(endpoint, dataset, s3, tmp_path):
    url = _upload(s3, dataset, "outage")
    loader = PackedLoader(cfg(url, max_tokens=L * G_SEQS * 4, cache_dir=str(tmp_path / "c"),
                              prefetch_steps=0, fetch_attempts=20, fetch_backoff_max_s=0.5))
    endpoint.stop()
    # Back well within the policy: 9.5 s of span, and 19 jittered waits of up to 0.5 s (4.75 s on
    # average) before one read has used up its attempts.
    threading.Timer(1.0, endpoint.start).start()
    steps = list(loader)
    assert len(steps) == 4
    loader.close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_store_that_stays_away_fails_with_one_line(endpoint, dataset, s3, tmp_path, capsys, num_workers):
    # With workers, the stopped server's listening socket lives on in the forked workers: connections
    # are accepted by the kernel and never answered, the hanging server that fetch_timeout_s bounds.
    url = _upload(s3, dataset, f"gone{num_workers}")
    loader = PackedLoader(cfg(url, cache_dir=str(tmp_path / "c"), prefetch_steps=0, fetch_attempts=3,
                              fetch_backoff_max_s=0.2, fetch_timeout_s=1.0, num_workers=num_workers))
    it = iter(loader)
    next(it)
    endpoint.stop()
    start = time.monotonic()
    with pytest.raises(StorageError, match=rf"^{url}/parts/\S+\.mds\.zstd: read failed [1-3] times? over "
                                           r"[0-9.]+ s \((EndpointConnectionError|ReadTimeoutError): .*\); "
                                           "check that the object store is reachable"):
        for _ in range(20):  # the first step's shards are cached; later ones are not
            next(it)
    loader.close()  # as train does on its way out: the downloads under way end too
    # Bounded by the policy's span (0.4 s) plus the attempt in flight (1 s timeouts, no library
    # retries), with room for a busy machine; each worker process keeps its own clock.
    assert time.monotonic() - start < 0.4 + 1.0 + 5.0


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_queued_reads_share_one_outage_clock(endpoint):
    # 40 reads on 4 threads of a store that is gone: each read on its own clock would take
    # 10 x the policy's span; on one clock the first read that gives up fails them all.
    endpoint.stop()
    policy = RetryPolicy(attempts=5, backoff_max_s=1.0, timeout_s=1.0)
    span = 0.5 + 1.0 + 1.0 + 1.0  # the longest waits between the 5 tries
    root = Root("s3://data/clock", retry=policy)
    records = _Records()
    logging.getLogger("slimpack.storage").addHandler(records)
    start = time.monotonic()
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(root.read_bytes, f"parts/p/shard.{i:05d}.mds.zstd") for i in range(40)]
            errors = [f.exception() for f in futures]
    finally:
        logging.getLogger("slimpack.storage").removeHandler(records)
    took = time.monotonic() - start
    assert all(isinstance(e, StorageError) for e in errors), errors
    assert len({str(e) for e in errors}) == 1  # the same one line for every read
    assert "\n" not in str(errors[0]) and str(errors[0]).startswith("s3://data/clock/parts/p/shard.")
    assert took < span + policy.timeout_s + 3.0  # (3 s for a busy machine; 35 s on one clock per read)
    # One warning while retrying (one per store per minute): the store, what failed, for how long.
    assert len(records.records) == 1, [r.getMessage() for r in records.records]
    message = records.records[0].getMessage()
    assert message.startswith(f"s3://data at http://{endpoint.host}:{endpoint.port}: reads failing for ")
    assert "EndpointConnectionError" in message


_DIGEST_DRIVER = """
import os, sys, time
from pathlib import Path

import logging

import s3fs
from moto.server import ThreadedMotoServer

logging.getLogger("werkzeug").disabled = True  # the server's request log is not the command's

server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
fs = s3fs.S3FileSystem()
fs.mkdir("data")
local = Path(sys.argv[1])
for path in sorted(local.rglob("*")):
    if path.is_file():
        fs.put_file(str(path), f"data/ds/{path.relative_to(local).as_posix()}")

import slimpack.pipeline.tools as tools
from slimpack.cli import main

load_index = tools.load_index


def load_then_close(*args, **kwargs):  # the store goes away for good once the index is read
    index = load_index(*args, **kwargs)
    server.stop()
    print(f"closed at {time.monotonic()}", file=sys.stderr, flush=True)
    return index


tools.load_index = load_then_close
sys.exit(main(sys.argv[2:]))
"""


def test_digest_with_many_queued_shards_ends_within_the_policy(tmp_path):
    # The case: the port closed for good once the index is read, dozens of shards queued
    # for download. Each on its own clock kept the process alive for shards / threads x span (its
    # exit waits for the download threads); one clock ends it within the span plus a timeout.
    pytest.importorskip("moto.server")
    local = make_dataset(tmp_path / "ds", parts={"a": ("train", 250)}, shard_size_limit=2048)
    shards = len(list(local.rglob("shard.*")))
    assert shards >= 50
    policy = RetryPolicy(attempts=4, backoff_max_s=1.0, timeout_s=1.0)
    span = 0.5 + 1.0 + 1.0  # the longest waits between the 4 tries
    env = {**os.environ, **_ENV, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", _DIGEST_DRIVER, str(local), "pipeline", "digest", "s3://data/ds",
         "--seq-len", "16", "--global-batch-tokens", str(16 * 1024), "--steps", "3",
         "--cache-dir", str(tmp_path / "cache"), "--fetch-attempts", str(policy.attempts),
         "--fetch-backoff-max", str(policy.backoff_max_s), "--fetch-timeout", str(policy.timeout_s)],
        env=env, capture_output=True, text=True, timeout=120)
    ended = time.monotonic()
    lines = proc.stderr.splitlines()
    closed = float(next(line for line in lines if line.startswith("closed at "))[len("closed at "):])
    assert proc.returncode == exitcodes.RESUMABLE, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("slimpack pipeline digest: error: s3://data/ds/parts/a/shard.")
    assert "read failed" in errors[0] and "fetch_attempts" in errors[0]
    assert sum("reads failing for" in line for line in lines) == 1
    # The span, one timeout, and 5 s for the loaders' start and the interpreter's exit on a busy
    # machine (measured: 5.0 s for 133 shards; 99.6 s with one clock per read).
    assert ended - closed < span + policy.timeout_s + 5.0, proc.stderr


@pytest.mark.parametrize("command", ["digest", "inspect"])
def test_pipeline_commands_end_with_status_75_naming_the_url(endpoint, command, capsys):
    endpoint.stop()
    url = "s3://data/gone-for-good"
    extra = ["--steps", "1"] if command == "digest" else ["--step", "0", "--no-decode"]
    assert main(["pipeline", command, url, "--seq-len", "16", "--global-batch-tokens", "128",
                 "--fetch-attempts", "2", "--fetch-backoff-max", "0.1", *extra]) == exitcodes.RESUMABLE
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if "error:" in line]
    assert errors == [line for line in err if line.startswith(f"slimpack pipeline {command}: error: ")]
    # (a try or two: the clock runs from the start of the first try, which creates the client)
    assert len(errors) == 1 and re.match(rf"slimpack pipeline {command}: error: {url}/slimpack.json: read failed "
                                         r"[12] times? over [0-9.]+ s \(EndpointConnectionError", errors[0])
    assert "fetch_attempts" in errors[0] and not any("Traceback" in line for line in err)


CONFIG = Path(__file__).parents[2] / "configs" / "train" / "debug-cpu.toml"


def test_train_ends_with_status_75_when_the_store_stays_away(endpoint, tmp_path):
    endpoint.stop()
    url = "s3://data/train-gone"
    env = {**os.environ, **_ENV, "PYTHONPATH": os.pathsep.join(sys.path),
           "AWS_ENDPOINT_URL": f"http://{endpoint.host}:{endpoint.port}"}
    proc = subprocess.run(
        [sys.executable, "-m", "slimpack", "train", "--config", str(CONFIG), "--set", f"data.path={url}",
         "--set", f"run_dir={tmp_path / 'run'}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
         "--set", "data.fetch_attempts=2", "--set", "data.fetch_backoff_max_s=0.1"],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == exitcodes.RESUMABLE, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.match(rf"slimpack train: error: {url}/slimpack.json: read failed "
                                         r"[12] times? over [0-9.]+ s \(EndpointConnectionError", errors[0])
    assert "Traceback" not in proc.stderr


def test_train_config_fetch_settings_reach_the_loader(s3, dataset, tmp_path):
    from types import SimpleNamespace

    from slimpack.train.config import load_train_config
    from slimpack.train.loop import build_loader

    url = _upload(s3, dataset, "train-config")
    cfg = load_train_config(str(CONFIG), [f"data.path={url}", f"data.cache_dir={tmp_path}", "data.seq_len=16",
                                          "data.global_batch_tokens=128", "data.micro_batch_size=2",
                                          "data.fetch_attempts=3", "data.fetch_backoff_max_s=0.25",
                                          "data.fetch_timeout_s=2.5"])
    loader = build_loader(cfg, SimpleNamespace(rank=0, world_size=1))
    want = RetryPolicy(attempts=3, backoff_max_s=0.25, timeout_s=2.5)
    assert loader.cfg.retry == want
    root = loader.stream.store.root  # the shard reads
    assert root.retry == want
    assert root.fs.config_kwargs["connect_timeout"] == 2.5 == root.fs.config_kwargs["read_timeout"]
    assert root.fs.config_kwargs["retries"]["max_attempts"] == 1
    loader.close()


def test_a_root_leaves_the_shared_filesystem_instance_alone(s3):
    # s3fs caches instances by their options: a Root that switched off the retries of the cached
    # one would switch them off for every other user of the same options.
    import fsspec

    root = Root("s3://data/x", retry=RetryPolicy(timeout_s=7.0))
    assert root.fs.retries == 1
    shared = fsspec.filesystem("s3", config_kwargs=root.fs.config_kwargs)
    assert shared is not root.fs
    assert shared.retries == type(shared).retries > 1
