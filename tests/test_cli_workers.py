"""`--workers` below 1 is a usage error on every command that takes it, not a silent single process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimpack import exitcodes
from slimpack.cli import main


@pytest.mark.parametrize("workers", ["0", "-3"])
@pytest.mark.parametrize("command", [["tokenize", "IN", "--out", "OUT"], ["shards", "validate", "OUT"],
                                     ["shards", "stats", "OUT"]])
def test_workers_below_one_is_a_usage_error(command: list[str], workers: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    argv = [str(inp) if a == "IN" else str(tmp_path / "out") if a == "OUT" else a for a in command]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--workers", workers, "--no-progress"])
    assert exc.value.code == exitcodes.USAGE
    assert f"argument --workers: must be at least 1, not {workers}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_run_tokenize_refuses_workers_below_one(tmp_path: Path) -> None:
    from slimpack.tokenize.job import TokenizeConfig, run_tokenize

    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ValueError, match="workers must be at least 1"):
        run_tokenize([str(tmp_path / "a.jsonl")], str(tmp_path / "out"), TokenizeConfig(), workers=0,
                     progress=False)
    assert not (tmp_path / "out").exists()
