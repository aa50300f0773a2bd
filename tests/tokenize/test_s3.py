"""Tokenize straight to S3-compatible storage (a real S3 API server on loopback), read back, compare."""

from __future__ import annotations

from pathlib import Path

import fsspec

from slimpack.tokenize.job import TokenizeConfig, run_tokenize
from slimpack.tokenize.merge import merge_dataset

CFG = TokenizeConfig(block_tokens=4096, shard_size_limit=1 << 17)


def test_tokenize_to_s3_equals_local(demo_corpus: Path, tmp_path: Path, s3_bucket: str, tree_digest):
    local = run_tokenize([str(demo_corpus)], str(tmp_path / "local"), CFG, workers=2, progress=False)
    assert local.ok
    url = f"s3://{s3_bucket}/datasets/demo"
    remote = run_tokenize([str(demo_corpus)], url, CFG, workers=2, progress=False,
                          staging_dir=str(tmp_path))
    assert remote.ok and remote.merged
    fsspec.filesystem("s3").get(f"{s3_bucket}/datasets/demo/", str(tmp_path / "back"), recursive=True)
    assert tree_digest(tmp_path / "back") == tree_digest(tmp_path / "local")
    # Re-running skips every complete part; merging again rewrites identical bytes.
    again = run_tokenize([str(demo_corpus)], url, CFG, workers=1, progress=False)
    assert again.parts_done == [] and len(again.parts_skipped_complete) == len(local.parts_done)
    manifest = merge_dataset(url)
    assert manifest["tokens"] == local.tokens
    # staging directories are cleaned up
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tmp")]
