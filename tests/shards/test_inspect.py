"""`slimpack shards inspect`: a sample decoded to text, documents and sources marked."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest

from slimpack.cli import main
from slimpack.demo.corpus import iter_corpus
from slimpack.shards import schema
from slimpack.shards.inspection import render_sample


def test_inspect_shows_documents_and_sources(dataset: Path, capsys: pytest.CaptureFixture) -> None:
    text = render_sample(dataset, 0, max_chars=0)
    _, source, first = next(itertools.islice(iter_corpus(), 1))  # first record of the first part
    first = first[:6000]  # as the fixture wrote it
    body = text.split("\n", 2)[2]  # after the sample line and document 0's header
    assert body.startswith(f"<|begin_of_text|>{first}<|end_of_text|>\n=====")
    headers = [line for line in text.splitlines() if line.startswith("===== document")]
    manifest = json.loads((dataset / schema.MANIFEST_FILENAME).read_text())
    assert f"{len(headers)} document(s)" in text.splitlines()[0]
    assert f"| source {source} |" in headers[0]
    assert all(any(f"source {n} " in h for n in manifest["per_source"]) for h in headers)

    short = render_sample(dataset, 0, max_chars=100)
    assert "characters left out" in short and "<|end_of_text|>" in short

    last = manifest["samples"] - 1
    assert main(["shards", "inspect", str(dataset), "--sample", str(last)]) == 0
    assert f"sample {last} = parts/" in capsys.readouterr().out
    assert main(["shards", "inspect", str(dataset), "--sample", str(last + 1)]) == 2
    assert "out of range" in capsys.readouterr().err


def test_inspect_names_a_corrupt_manifest_and_exits_3(dataset: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    """The sources' names come from slimpack.json: a corrupt one is an unusable dataset (status 3),
    named with its fix, not a bare JSON parser message."""
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    for corrupt in ("{", "[]"):
        (copy / schema.MANIFEST_FILENAME).write_text(corrupt)
        assert main(["shards", "inspect", str(copy), "--sample", "0"]) == 3
        err = capsys.readouterr().err
        assert err.startswith("slimpack shards inspect: error: ") and schema.MANIFEST_FILENAME in err
        assert "slimpack shards merge" in err and err.count("\n") == 1
