"""`slimpack plot` draws goodput from the train records of metrics.jsonl (tests/test_plot.py covers
the context-length figures)."""

from __future__ import annotations

import json

from slimpack.plot import plot_run


def test_plot_draws_goodput_from_metrics(tmp_path):
    lost = {"startup": 30.0, "compile": 20.0, "checkpoint": 5.0, "eval": 0.0, "skipped": 0.0, "recomputed": 45.0,
            "gc": 0.0}
    records = [{"kind": "start", "step": 0, "wall_s": 1.0},
               *({"kind": "train", "step": s, "goodput": 0.1 * s, "wall_s": 100.0 * s, "lost_s": lost}
                 for s in (1, 2, 3)),
               {"kind": "eval", "step": 3, "val_loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report = plot_run(tmp_path)
    assert (tmp_path / "plots" / "goodput.png").stat().st_size > 0
    assert report.goodput == {"step": 3, "goodput": 0.30000000000000004, "wall_s": 300.0, "lost_s": lost}
    assert json.loads((tmp_path / "plots" / "summary.json").read_text())["goodput"]["wall_s"] == 300.0


def test_plot_says_why_there_is_no_goodput_figure(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 2.0}) + "\n")
    report = plot_run(tmp_path)
    assert "goodput.png" not in [p.rsplit("/", 1)[-1] for p in report.figures]
    assert report.skipped["goodput.png"].startswith("no goodput in metrics.jsonl")
