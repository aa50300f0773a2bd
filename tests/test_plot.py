"""`slimpack plot RUN_DIR` on a tiny trained run: figures from its own files, NIAH skipped until
its results exist."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from slimpack.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def _copy_run(run: Path, dst: Path) -> Path:
    """The run's small files (not its checkpoints): what plot reads."""
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    return dst


def test_plot_from_a_tiny_run(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _copy_run(tiny_run, tmp_path / "run")
    assert main(["plot", str(run), "--distances", "8", "32", "63"]) == 0
    out = capsys.readouterr().out
    assert "skipped effective_length.png: no NIAH results" in out
    summary = json.loads((run / "plots" / "summary.json").read_text())
    assert [Path(f).name for f in summary["figures"]] == ["position_frequency.png", "loss_by_position.png",
                                                         "goodput.png"]
    for name in ("position_frequency.png", "loss_by_position.png", "goodput.png"):
        assert (run / "plots" / name).read_bytes()[:8] == PNG

    # f at the chosen distances at each checkpoint: the ledger arrays, against the tokens trained.
    pf = summary["position_frequency"]
    assert pf["seq_len"] == 64 and pf["distances"] == [8, 32, 63]
    assert [(p["step"], p["tokens"]) for p in pf["points"]] == [(3, 768), (6, 1536)]
    for p in pf["points"]:
        f = np.load(run / "position_frequency" / f"step_{p['step']:08d}.npy")
        assert p["f"] == {"8": int(f[8]), "32": int(f[32]), "63": int(f[63])}
    late, early = pf["points"][1]["f"], pf["points"][0]["f"]
    assert all(late[d] >= early[d] for d in late)  # a cumulative count
    # The per-step metrics agree with the arrays at the checkpointed steps.
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = next(r for r in train if r["kind"] == "train" and r["step"] == 6)
    assert last["pf_last"] == late["63"] and last["pf_half"] == int(np.load(
        run / "position_frequency" / "step_00000006.npy")[32])
    assert [p["step"] for p in summary["loss_by_position"]] == [3, 6]

    # Once the NIAH evaluation has written its results, the effective-length figure appears.
    niah = run / "eval" / "niah"
    niah.mkdir(parents=True)
    for step, length in ((3, 16), (6, 32)):
        (niah / f"step_{step:08d}.json").write_text(json.dumps(
            {"step": step, "tokens": step * 256, "effective_length": length, "accuracy": {"16": 1.0, "64": 0.2}}))
    assert main(["plot", str(run), "--out", str(tmp_path / "figs")]) == 0
    summary = json.loads((tmp_path / "figs" / "summary.json").read_text())
    assert summary["skipped"] == {} and (tmp_path / "figs" / "effective_length.png").read_bytes()[:8] == PNG
    assert [(p["tokens"], p["effective_length"]) for p in summary["effective_length"]] == [(768, 16), (1536, 32)]
    assert summary["position_frequency"]["distances"] == [16, 32, 48, 63]  # L/4, L/2, 3L/4, L-1


def test_plot_errors(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _copy_run(tiny_run, tmp_path / "run")
    assert main(["plot", str(run), "--distances", "64"]) == 2
    assert "--distances [64] lie outside 0..63 (the run's seq_len is 64)" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err
    (run / "eval" / "positions" / "step_00000003.json").write_text("{torn")
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert "step_00000003.json: unreadable JSON" in err and "Traceback" not in err
