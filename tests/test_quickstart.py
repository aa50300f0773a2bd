"""The README's Quickstart runs as written: its one block, from `source .venv/bin/activate` to
`slimpack plot`, in a directory laid out as the demo leaves it, with the venv these tests run in."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = [["tokenize"], ["shards", "validate"], ["shards", "stats"], ["train"], ["eval", "positions"],
          ["eval", "niah"], ["plot"]]


def quickstart_lines() -> list[str]:
    section = (REPO / "README.md").read_text().split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Quickstart is one bash block"
    return blocks[0].splitlines()


def test_the_quickstart_activates_the_venv_then_runs_each_stage_on_one_directory():
    first, *commands = quickstart_lines()
    assert first == "source .venv/bin/activate"
    assert [c.split()[1:1 + len(stage)] for c, stage in zip(commands, STAGES)] == STAGES
    assert all(c.startswith("slimpack ") and "quickstart/" in c for c in commands)
    assert "/quickstart/" in (REPO / ".gitignore").read_text().splitlines()


@pytest.mark.slow
def test_the_quickstart_runs_as_written(tmp_path: Path, demo_corpus: Path) -> None:
    venv = Path(sys.executable).parent.parent  # not resolved: a venv's python is a symlink
    if not (venv / "bin" / "activate").is_file() or not (venv / "bin" / "slimpack").is_file():
        pytest.skip(f"the tests do not run in a venv with slimpack installed ({sys.executable})")
    # What `slimpack demo` leaves beside the repository's files, and the venv of the install line.
    (tmp_path / "slimpack-demo").mkdir()
    (tmp_path / "slimpack-demo" / "corpus").symlink_to(demo_corpus)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / ".venv").symlink_to(venv)
    before = {p.name for p in tmp_path.iterdir()}
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}  # this checkout's code behind `slimpack`
    start = time.monotonic()
    proc = subprocess.run(["bash", "-e", "-c", "\n".join(quickstart_lines())], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"quickstart: {time.monotonic() - start:.0f} s")

    out = tmp_path / "quickstart"
    assert "OK: no findings" in proc.stdout
    assert (out / "shards" / "slimpack.json").is_file() and (out / "stats.json").is_file()
    assert sorted(p.name for p in (out / "run" / "checkpoints").iterdir())[-1] == "step_00000040"
    assert (out / "run" / "eval" / "positions" / "step_00000040.json").is_file()
    niah = sorted(p.name for p in (out / "run" / "eval" / "niah").iterdir())
    assert niah == [f"step_{s:08d}.{x}" for s in (20, 40) for x in ("json", "png")]  # every checkpoint
    report = json.loads((out / "run" / "eval" / "niah" / "step_00000040.json").read_text())
    assert report["config"]["protocol"] == "paper" and sorted(report["accuracy"]) == ["128", "256"]
    plots = {p.name for p in (out / "run" / "plots").iterdir()}
    assert {"summary.json", "position_frequency.png", "loss_by_position.png", "effective_length.png",
            "niah_heatmap.png", "run.png"} <= plots
    # Everything the walk-through creates is under quickstart/ (ignored by git).
    assert {p.name for p in tmp_path.iterdir()} == before | {"quickstart"}


def test_the_readme_and_configs_name_one_production_dataset():
    texts = [REPO / "README.md", *sorted((REPO / "configs").rglob("*"))]
    paths = {m for p in texts if p.is_file() for m in re.findall(r"(?<![\w.])/shards/[\w.-]+", p.read_text())}
    assert paths == {"/shards/slimpajama"}
