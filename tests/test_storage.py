"""storage.write_atomic: whole or nothing, and never a stray temporary file."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimpack.storage import write_atomic


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
