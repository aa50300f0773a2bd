"""Paths read from an index or manifest stay inside their root, for every reader of a local dataset:
validate, inspect, stats, merge and the loader, on crafted datasets (the remote loader and its
cache are tested against an S3 server in test_remote.py)."""

import json
from pathlib import Path

import pytest
from pipeline_data import escape_part, make_dataset

from slimpack.cli import main
from slimpack.pipeline import LoaderConfig, PackedLoader
from slimpack.shards import schema
from slimpack.shards.inspection import render_sample
from slimpack.shards.stats import compute_stats
from slimpack.shards.validate import validate_dataset
from slimpack.storage import UnsafePathError
from slimpack.tokenize.merge import merge_dataset

PARTS = {"p": ("train", 40), "q": ("train", 30)}


def cfg(path: Path) -> LoaderConfig:
    return LoaderConfig(str(path), seq_len=16, global_batch_tokens=16 * 4, micro_batch_size=4)


@pytest.fixture
def escaped(tmp_path: Path) -> tuple[Path, Path]:
    """(root, directory outside it): part p's shards named ``parts/../../outside/...``."""
    root = make_dataset(tmp_path / "ds", parts=PARTS)
    return root, escape_part(root, "p", "../../outside")


def test_validate_reports_names_that_leave_the_root_and_reads_nothing_there(escaped) -> None:
    root, outside = escaped
    for shard in outside.glob("shard.*"):  # were any of these read, a size finding would name it
        shard.write_bytes(b"not the shard")
    report = validate_dataset(root)
    assert report.exit_status == 1, report.summary()
    paths = [f for f in report.findings if f.check == "path"]
    assert paths and all("'..' step" in f.message and f.shard.startswith("parts/../../outside/")
                         for f in paths)
    assert not [f for f in report.findings if f.check in ("size", "hash", "decompress")]
    assert "[path] parts/../../outside/shard.00000.mds.zstd" in report.summary()


def test_validate_reports_a_symlink_out_of_the_root(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", parts=PARTS)
    shard = root / "parts/q/shard.00000.mds.zstd"
    copy = tmp_path / "elsewhere.mds.zstd"
    copy.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(copy)  # the same bytes, so only the link's target is wrong
    report = validate_dataset(root)
    assert [(f.check, f.shard) for f in report.findings] == [("path", "parts/q/shard.00000.mds.zstd")]
    assert "outside" in report.findings[0].message and str(copy) in report.findings[0].message
    with pytest.raises(UnsafePathError, match="a symlink leads out"):
        list(PackedLoader(cfg(root)))


def test_validate_reports_an_absolute_sample_tokens_file(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", parts=PARTS)
    outside = tmp_path / "tokens.npy"
    outside.write_bytes((root / schema.SAMPLE_TOKENS_FILENAME).read_bytes())
    manifest = json.loads((root / schema.MANIFEST_FILENAME).read_text())
    manifest["sample_tokens_file"] = str(outside)
    (root / schema.MANIFEST_FILENAME).write_text(json.dumps(manifest))
    report = validate_dataset(root)
    assert [f.check for f in report.findings] == ["path"], report.summary()
    assert "is an absolute path" in report.findings[0].message
    with pytest.raises(UnsafePathError, match="sample_tokens_file"):
        compute_stats(root, seq_lens=[16])


def test_loader_inspect_and_stats_refuse_before_reading(escaped) -> None:
    root, _ = escaped
    with pytest.raises(UnsafePathError, match=r"index.json: 'parts/\.\./\.\./outside/shard\.00000\.mds\.zstd'"
                                              r" has a '\.\.' step: a dataset names only relative paths"):
        PackedLoader(cfg(root))
    with pytest.raises(UnsafePathError, match=r"has a '\.\.' step"):
        render_sample(root, 0)
    with pytest.raises(UnsafePathError, match=r"has a '\.\.' step"):
        compute_stats(root, seq_lens=[16])


def test_cli_says_one_error_line(escaped, capsys: pytest.CaptureFixture) -> None:
    root, _ = escaped
    assert main(["pipeline", "digest", str(root), "--seq-len", "16", "--global-batch-tokens", "64",
                 "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimpack pipeline digest: error: ") and err.count("\n") == 1
    assert "'parts/../../outside/shard.00000.mds.zstd' has a '..' step" in err


def test_merge_refuses_a_part_index_naming_files_outside_the_part(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", parts=PARTS)
    for bad, match in (("../../../outside/shard.00000.mds.zstd", "has a '..' step"),
                       ("sub/shard.00000.mds.zstd", "not a file of the part's own directory")):
        path = root / "parts/q/index.json"
        index = json.loads(path.read_text())
        index["shards"][0]["zip_data"]["basename"] = bad
        path.write_text(json.dumps(index))
        with pytest.raises((ValueError, RuntimeError), match=match):
            merge_dataset(str(root))
