"""`slimpack plot RUN_DIR` on a tiny trained run: figures from its own files (the position frequency
with and without document masking), NIAH skipped until its results exist, then drawn from a real
`slimpack eval niah` checkpoint sweep, plain RoPE beside STRING, all in one figure."""

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
                                                          "run.png", "goodput.png"]
    for name in ("position_frequency.png", "loss_by_position.png", "run.png", "goodput.png"):
        assert (run / "plots" / name).read_bytes()[:8] == PNG

    # f at the chosen distances at each checkpoint: the ledger arrays, against the tokens trained.
    pf = summary["position_frequency"]
    assert pf["seq_len"] == 64 and pf["distances"] == [8, 32, 63]
    assert [(p["step"], p["tokens"]) for p in pf["points"]] == [(3, 768), (6, 1536)]
    for p in pf["points"]:
        f = np.load(run / "position_frequency" / f"step_{p['step']:08d}.npy")
        assert p["f"] == {"8": int(f[8]), "32": int(f[32]), "63": int(f[63])}
    # Without masking: the windows the ledger counted (meta.json of the kept checkpoint), times L - i.
    windows = json.loads((tiny_run / "checkpoints" / "step_00000006" / "meta.json").read_text())[
        "position_frequency"]["windows"]
    assert windows == 6 * 256 // 64
    assert pf["points"][1]["f_unmasked"] == {d: windows * (64 - int(d)) for d in ("8", "32", "63")}
    assert all(p["f_unmasked"][d] > p["f"][d] for p in pf["points"] for d in p["f"])  # masking removes pairs
    late, early = pf["points"][1]["f"], pf["points"][0]["f"]
    assert all(late[d] >= early[d] for d in late)  # a cumulative count
    # The per-step metrics agree with the arrays at the checkpointed steps.
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = next(r for r in train if r["kind"] == "train" and r["step"] == 6)
    assert last["pf_last"] == late["63"] and last["pf_half"] == int(np.load(
        run / "position_frequency" / "step_00000006.npy")[32])
    assert last["pf_unmasked_last"] == pf["points"][1]["f_unmasked"]["63"]
    assert [p["step"] for p in summary["loss_by_position"]] == [3, 6]

    # A checkpoint sweep by the real command, plain RoPE and STRING, fills the NIAH panels.
    hay = tmp_path / "hay.txt"
    hay.write_text(" ".join(f"Line {i} of a long and quiet text about rivers." for i in range(400)))
    sweep = ["eval", "niah", str(tiny_run), "--every", "1", "--haystack", str(hay), "--lengths", "160,224",
             "--max-new-tokens", "16", "--samples", "2", "--device", "cpu", "--no-progress"]
    assert main([*sweep, "--out", str(run / "eval" / "niah")]) == 0
    assert main([*sweep, "--string-shift", "auto", "--out", str(run / "eval" / "niah-string")]) == 0
    assert main(["plot", str(run), "--out", str(tmp_path / "figs")]) == 0
    summary = json.loads((tmp_path / "figs" / "summary.json").read_text())
    assert summary["skipped"] == {}
    assert [Path(f).name for f in summary["figures"]] == [
        "effective_length.png", "position_frequency.png", "niah_heatmap.png", "niah_heatmap_string.png",
        "loss_by_position.png", "run.png", "goodput.png"]
    for f in summary["figures"]:
        assert Path(f).read_bytes()[:8] == PNG
    reports = {d: json.loads((run / "eval" / d / "step_00000006.json").read_text()) for d in ("niah", "niah-string")}
    assert [(p["series"], p["tokens"], p["effective_length"]) for p in summary["effective_length"]] == [
        (d, 1536, reports[d]["effective_length"]) for d in ("niah", "niah-string")]
    assert summary["niah_heatmap"] == {d: {"step": 6, "effective_length": reports[d]["effective_length"]}
                                       for d in ("niah", "niah-string")}
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
