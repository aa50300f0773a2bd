"""storage: write_atomic (whole or nothing, never a stray temporary file), Root.glob, the guard
on paths read from an index or manifest (check_member, member_path), and the retry policy.
Durability (fsync) is in test_durable.py, outages of a real S3 server in pipeline/test_remote.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimpack.storage import UnsafePathError, check_member, member_path, write_atomic


def test_write_atomic_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_bytes(b"old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failed_write_atomic_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    (target / "child").mkdir(parents=True)  # the rename onto a non-empty directory fails
    with pytest.raises(OSError):
        write_atomic(target, b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_glob_takes_the_root_path_literally(tmp_path: Path) -> None:
    from slimpack.storage import Root

    root = tmp_path / "out[v2]*"
    for name in ("parts/a.jsonl/stats.json", "parts/x/b.jsonl/stats.json", "parts/x/b.jsonl/index.json"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("{}")
    (tmp_path / "out2").mkdir()  # would match the root taken as a pattern
    (tmp_path / "out2" / "stats.json").write_text("{}")
    assert Root(str(root)).glob("parts/**/stats.json") == ["parts/a.jsonl/stats.json",
                                                           "parts/x/b.jsonl/stats.json"]
    assert Root(str(root)).glob("parts/*") == ["parts/a.jsonl", "parts/x"]
    assert Root(str(tmp_path / "absent")).glob("parts/**/stats.json") == []


@pytest.mark.parametrize(("name", "reason"), [
    ("/etc/passwd", "is an absolute path"),
    ("parts/../../outside/shard.00000.mds.zstd", "has a '..' step"),
    ("..", "has a '..' step"),
    ("parts/./p/shard.00000.mds", "has a '.' step"),
    ("parts//p/shard.00000.mds", "has a '' step"),
    ("parts/p/", "has a '' step"),
    ("parts\\..\\..\\x", "holds a backslash or a control character"),
    ("parts/p/shard\n.mds", "holds a backslash or a control character"),
    ("", "is not a file name"),
    (None, "is not a file name"),
])
def test_check_member_refuses_names_that_can_leave_the_root(name, reason: str) -> None:
    with pytest.raises(UnsafePathError) as err:
        check_member(name, where="ds/index.json shard 3")
    assert str(err.value).startswith(f"ds/index.json shard 3: {name!r} {reason}: ")
    assert "slimpack shards merge" in str(err.value)  # the fix


def test_check_member_takes_names_slimpack_writes() -> None:
    for name in ("index.json", "parts/train/chunk1/example_train_0.jsonl.zst/shard.00000.mds.zstd",
                 "parts/a b/ü..x/shard.00001.mds", "sample_tokens.npy"):
        assert check_member(name, where="x") == name


def test_member_path_follows_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "parts").mkdir(parents=True)
    (tmp_path / "secret").write_text("no")
    (root / "parts" / "in").write_text("yes")
    (root / "parts" / "link-in").symlink_to(root / "parts" / "in")
    (root / "parts" / "link-out").symlink_to(tmp_path / "secret")
    (root / "parts" / "dir-out").symlink_to(tmp_path)
    assert member_path(root, "parts/in", where="w").read_text() == "yes"
    assert member_path(root, "parts/link-in", where="w").read_text() == "yes"
    assert member_path(root, "parts/not-yet", where="w") == root / "parts/not-yet"  # a cache target
    for name in ("parts/link-out", "parts/dir-out/secret"):
        with pytest.raises(UnsafePathError, match=r"outside .* \(a symlink leads out\)"):
            member_path(root, name, where="w")


def test_with_retries_is_bounded_and_says_where() -> None:
    from slimpack.storage import RetryPolicy, StorageError, with_retries

    calls = []

    def refused() -> bytes:
        calls.append(1)
        raise ConnectionRefusedError(111, "Connection refused")

    policy = RetryPolicy(attempts=4, backoff_max_s=0.02, first_backoff_s=0.01)
    assert [policy.backoff_s(k) for k in range(4)] == [0.01, 0.02, 0.02, 0.02]
    with pytest.raises(StorageError, match=r"^s3://b/x: read failed 4 times over [0-9.]+ s "
                                           r"\(ConnectionRefusedError: \[Errno 111\] Connection refused\)"):
        with_retries(policy, "s3://b/x", refused)
    assert len(calls) == 4

    def missing() -> bytes:
        calls.append(1)
        raise FileNotFoundError("s3://b/y")

    calls.clear()
    with pytest.raises(FileNotFoundError):  # another attempt cannot fix it: no retry
        with_retries(policy, "s3://other/y", missing)  # another store: s3://b is down for a while
    assert len(calls) == 1
    flaky = iter([OSError("reset"), OSError("reset"), b"data"])

    def twice_then_ok() -> bytes:
        item = next(flaky)
        if isinstance(item, Exception):
            raise item
        return item

    assert with_retries(policy, "s3://third/z", twice_then_ok) == b"data"


def test_backoff_has_full_jitter() -> None:
    # A thousand workers that lost the store at the same moment must not retry in lockstep: each
    # wait is drawn from [0, cap], not the cap itself.
    import itertools
    import random
    import time

    from slimpack.storage import RetryPolicy, StorageError, with_retries

    times = []

    def refused() -> bytes:
        times.append(time.monotonic())
        raise ConnectionRefusedError(111, "Connection refused")

    policy = RetryPolicy(attempts=7, first_backoff_s=0.2, backoff_max_s=0.2)
    random.seed(0)  # waits 0.17, 0.15, 0.05, 0.04, 0.08, 0.16 s
    with pytest.raises(StorageError, match="read failed 7 times"):
        with_retries(policy, "s3://jitter/x", refused)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 6 and min(gaps) < 0.12 < max(gaps)
