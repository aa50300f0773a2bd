"""A small real dataset (Python's own docs, through the real tokenize job) shared by shard tests."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import zstandard

from slimpack.demo.corpus import iter_corpus

# One bad record in the first file: the validator's --retokenize must skip it as tokenize did.
BAD_LINE = b"{not json\n"


def write_corpus(out: Path, docs: int = 160) -> list[Path]:
    """SlimPajama-layout files: two train files and a validation file, real text."""
    names = ["train/chunk1/example_train_0.jsonl.zst", "train/chunk1/example_train_1.jsonl.zst",
             "validation/chunk1/example_holdout_0.jsonl.zst"]
    lines: dict[str, list[bytes]] = {n: [] for n in names}
    for i, (_, source, text) in enumerate(itertools.islice(iter_corpus(), docs)):
        rec = {"text": text[:6000], "meta": {"redpajama_set_name": source}}
        lines[names[i % 3]].append(json.dumps(rec).encode() + b"\n")
    lines[names[0]].insert(3, BAD_LINE)
    paths = []
    for name, body in lines.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(zstandard.ZstdCompressor(level=3).compress(b"".join(body)))
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A merged dataset: 3 parts, several shards per part, several samples per shard."""
    from slimpack.tokenize.job import TokenizeConfig, run_tokenize

    base = tmp_path_factory.mktemp("shards")
    write_corpus(base / "corpus")
    cfg = TokenizeConfig(block_tokens=2048, shard_size_limit=1 << 15)
    report = run_tokenize([str(base / "corpus")], str(base / "ds"), cfg, workers=1, progress=False)
    assert report.ok and report.merged, report.summary()
    return base / "ds"


@pytest.fixture
def copy(dataset: Path, tmp_path: Path) -> Path:
    """A fresh copy of the dataset to corrupt."""
    dst = tmp_path / "ds"
    shutil.copytree(dataset, dst)
    return dst
