"""`slimpack plot RUN_DIR`: the paper's context-length figures from a run's own files.

    slimpack plot RUN_DIR [--out DIR] [--distances 1280 ...]

The paper (arXiv 2410.18745, section 3) tracks, against training tokens, the effective context
length (needle in a haystack) and the relative-position frequency f(i) of the trained data; its
finding is that effective length follows f. This draws, from what a run writes:

- `effective_length.png`: effective length against training tokens, from the NIAH results
  `RUN_DIR/eval/niah/step_NNNNNNNN.json` (paper protocol, plain RoPE: the training sweep and
  `slimpack eval niah RUN_DIR --every K`), with STRING beside it where `eval/niah-string/` exists
  (and the keyed protocol's, dashed, where it was run); skipped, with a note, when there are none;
- `position_frequency.png`: f(i) at chosen distances against training tokens, with document
  masking (solid: the ledger arrays `RUN_DIR/position_frequency/step_NNNNNNNN.npy`, one per
  checkpoint, and the per-step values in `metrics.jsonl`) and without it (dotted: the same windows
  as one causal segment each, f = windows (L - i), windows = tokens / L);
- `niah_heatmap.png`: accuracy by length and depth at the newest evaluated checkpoint (plain RoPE,
  and STRING beside it where evaluated);
- `loss_by_position.png`: loss by position at successive steps, from
  `RUN_DIR/eval/positions/step_NNNNNNNN.json` (the training loop's evaluation or
  `slimpack eval positions`);
- `goodput.png`: goodput (the share of wall-clock time in steps that count, over all restarts)
  against wall-clock hours, and where the rest went, from the train records of `metrics.jsonl`;
- `run.png`: the panels above but goodput in one figure, the paper's view of a run;

plus `summary.json` with the numbers behind each figure and what was skipped. Default output:
`RUN_DIR/plots/`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from slimpack.eval.niah import draw_heatmap
from slimpack.shards.stats import unmasked_distance_frequency
from slimpack.train.ledger import read_history

matplotlib.use("Agg")  # files, never a screen
import matplotlib.pyplot as plt

_STEP_FILE = re.compile(r"^step_(\d{8})\.(json|npy)$")
_METRIC_DISTANCES = (("half", 1, 2), ("three_quarters", 3, 4), ("last", None, None))  # metrics pf_* keys
# RUN_DIR/eval/<dir>: label and line style of each NIAH series (eval/niah.results_dir names them).
_NIAH_SERIES = (("niah", "plain RoPE", "-"), ("niah-string", "STRING", "-"),
                ("niah-keyed", "keyed protocol, plain RoPE", "--"),
                ("niah-keyed-string", "keyed protocol, STRING", "--"))


@dataclass
class PlotReport:
    run_dir: str
    out_dir: str
    figures: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    effective_length: list[dict[str, Any]] = field(default_factory=list)
    niah_heatmap: dict[str, Any] = field(default_factory=dict)
    position_frequency: dict[str, Any] = field(default_factory=dict)
    loss_by_position: list[dict[str, Any]] = field(default_factory=list)
    goodput: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"plot {self.run_dir}: {len(self.figures)} figures in {self.out_dir}"]
        lines += [f"  {Path(f).name}" for f in self.figures]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _step_files(directory: Path, suffix: str) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _STEP_FILE.match(p.name)) and m.group(2) == suffix]
    return sorted(found)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable JSON ({err}); delete it or re-run the evaluation that wrote it") from err


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line a kill cut short; the logger drops it on resume too
            continue
    return [r for r in records if r.get("kind") == "train"]


def _seq_len(run_dir: Path, history: list[tuple[int, np.ndarray]]) -> int | None:
    config = run_dir / "config.json"
    if config.is_file():
        return int(_read_json(config)["data"]["seq_len"])
    return len(history[0][1]) if history else None


# ----------------------------------------------------------------------------- figures


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _niah_series(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every NIAH report of the run, by series (eval/ sub-directory), in step order."""
    series = {}
    for name, _, _ in _NIAH_SERIES:
        reports = []
        for step, path in _step_files(run_dir / "eval" / name, "json"):
            r = _read_json(path)
            missing = {"tokens", "effective_length"} - set(r)
            if missing:
                raise ValueError(f"{path}: lacks {sorted(missing)}; re-run the NIAH evaluation for step {step}")
            reports.append({**r, "step": int(r.get("step", step))})
        if reports:
            series[name] = reports
    return series


def _effective_length(ax: Any, series: dict[str, list[dict[str, Any]]], report: PlotReport) -> None:
    for name, label, style in _NIAH_SERIES:
        for r in series.get(name, []):
            report.effective_length.append({"series": name, "step": r["step"], "tokens": int(r["tokens"]),
                                            "effective_length": r["effective_length"]})
        if name in series:
            pts = series[name]
            ax.plot([int(p["tokens"]) for p in pts], [p["effective_length"] for p in pts], marker="o",
                    linestyle=style, label=label)
    ax.set(xlabel="training tokens", ylabel="effective context length (tokens)",
           title="Effective context length (needle in a haystack)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _heatmap(ax: Any, name: str, reports: list[dict[str, Any]], fig: Any, report: PlotReport) -> None:
    """Accuracy by length and depth of the series' newest report."""
    newest = reports[-1]
    draw_heatmap(ax, newest["depth_accuracy"], newest["effective_length"], fig=fig)
    label = {n: lab for n, lab, _ in _NIAH_SERIES}[name]
    ax.set_title(f"NIAH at step {newest['step']:,} ({label}): effective length {newest['effective_length']}",
                 fontsize=9)
    report.niah_heatmap[name] = {"step": newest["step"], "effective_length": newest["effective_length"]}


def _frequency_points(run_dir: Path, distances: list[int] | None,
                      train: list[dict[str, Any]]) -> dict[str, Any] | None:
    """f at the chosen distances, masked and unmasked, at each checkpoint (None: no ledger)."""
    history = read_history(run_dir)
    L = _seq_len(run_dir, history)
    if not history and not any("pf_last" in r for r in train):
        return None
    chosen = sorted(set(distances)) if distances else [L // 4, L // 2, 3 * L // 4, L - 1]
    bad = [d for d in chosen if not 0 <= d < L]
    if bad:
        raise ValueError(f"--distances {bad} lie outside 0..{L - 1} (the run's seq_len is {L})")
    tokens_at = {int(r["step"]): int(r["tokens"]) for r in train if "tokens" in r}
    per_step = _global_batch_tokens(run_dir)
    points = []
    for step, f in history:
        if len(f) != L:
            raise ValueError(f"{run_dir}/position_frequency/step_{step:08d}.npy holds {len(f)} distances, "
                             f"the run's seq_len is {L}; it belongs to another run: remove it")
        tokens = tokens_at.get(step, step * per_step if per_step else None)
        u = unmasked_distance_frequency(tokens // L, L) if tokens is not None else None
        points.append({"step": step, "tokens": tokens, "f": {str(d): int(f[d]) for d in chosen},
                       "f_unmasked": {str(d): int(u[d]) for d in chosen} if u is not None else None})
    return {"seq_len": L, "distances": chosen, "points": points,
            "counts": "query-key pairs whose query has a label, with document masking (train/ledger.py)",
            "unmasked": "the same windows without document masking: windows x (L - i), windows = tokens / L"}


def _position_frequency(ax: Any, pf: dict[str, Any], train: list[dict[str, Any]]) -> None:
    L, chosen, points = pf["seq_len"], pf["distances"], pf["points"]
    dense = [r for r in train if "pf_last" in r]
    metric_distances = [(key, L - 1 if num is None else num * L // den) for key, num, den in _METRIC_DISTANCES]
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    every = dict.fromkeys([*chosen, *(d for _, d in metric_distances)])  # one colour per distance
    color = {d: cycle[k % len(cycle)] for k, d in enumerate(every)}
    for d in chosen:
        if points:
            ax.plot([p["tokens"] for p in points], [p["f"][str(d)] for p in points], marker="o", color=color[d],
                    label=f"f({d}) (ledger at checkpoints)")
            if points[0]["f_unmasked"] is not None:
                ax.plot([p["tokens"] for p in points], [p["f_unmasked"][str(d)] for p in points], marker="o",
                        markerfacecolor="none", linestyle=":", color=color[d], label=f"f({d}) without masking")
    for key, d in metric_distances:
        if dense:
            ax.plot([r["tokens"] for r in dense], [r[f"pf_{key}"] for r in dense], linestyle="--", linewidth=1,
                    color=color[d], label=f"f({d}) (metrics.jsonl, every step)")
            if f"pf_unmasked_{key}" in dense[-1]:
                ax.plot([r["tokens"] for r in dense], [r.get(f"pf_unmasked_{key}") for r in dense],
                        linestyle=":", linewidth=1, color=color[d])
    ax.set(xlabel="training tokens", ylabel="query-key pairs trained on", yscale="log",
           title=f"Relative-position frequency f(i), L = {L} (solid: document-masked; dotted: unmasked)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _global_batch_tokens(run_dir: Path) -> int | None:
    config = run_dir / "config.json"
    return int(_read_json(config)["data"]["global_batch_tokens"]) if config.is_file() else None


def _loss_by_position(ax: Any, files: list[tuple[int, Path]], report: PlotReport) -> None:
    cmap = plt.get_cmap("viridis")
    for k, (step, path) in enumerate(files):
        r = _read_json(path)
        if "mean_loss" not in r:
            raise ValueError(f"{path}: lacks mean_loss; re-run `slimpack eval positions` for step {step}")
        y = np.array([np.nan if v is None else v for v in r["mean_loss"]], float)
        ax.plot(np.arange(len(y)), y, linewidth=0.9, color=cmap(k / max(len(files) - 1, 1)),
                label=f"step {step:,} ({r.get('tokens', 0):,} tokens)")
        report.loss_by_position.append({"step": step, "tokens": r.get("tokens"), "source": r.get("source"),
                                        "buckets": r.get("buckets")})
    sources = sorted({str(p["source"]).split(":")[0] for p in report.loss_by_position})
    ax.set(xlabel="position (tokens)", ylabel="mean token loss (nats)",
           title=f"Loss by position at successive steps ({', '.join(sources)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _goodput(out: Path, report: PlotReport, records: list[dict[str, Any]]) -> None:
    points = [r for r in records if r.get("goodput") is not None and "wall_s" in r]
    if not points:
        report.skipped["goodput.png"] = "no goodput in metrics.jsonl (written by slimpack train since issue 19)"
        return
    last = points[-1]
    report.goodput = {"step": last["step"], "goodput": last["goodput"], "wall_s": last["wall_s"],
                      "lost_s": last.get("lost_s", {})}
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    ax.plot([r["wall_s"] / 3600 for r in points], [100 * r["goodput"] for r in points])
    ax.set(xlabel="wall-clock hours (all restarts)", ylabel="goodput (%)", ylim=(0, 100),
           title="Goodput: time in steps that count")
    ax.grid(alpha=0.3)
    lost = {k: v for k, v in report.goodput["lost_s"].items() if v > 0}
    bars.barh(list(lost), [100 * v / last["wall_s"] for v in lost.values()])
    bars.set(xlabel="% of wall-clock time", title=f"Lost by step {last['step']}")
    report.figures.append(_save(fig, out / "goodput.png"))


def plot_run(run_dir: str | Path, *, out_dir: str | Path | None = None,
             distances: list[int] | None = None) -> PlotReport:
    """Every figure the run's files allow, each alone and all in `run.png`; writes `summary.json`."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run} is not a directory; pass a training run directory (train.run_dir)")
    if not (run / "metrics.jsonl").is_file() and not (run / "eval").is_dir():
        raise FileNotFoundError(f"{run} holds neither metrics.jsonl nor eval/: not a training run directory")
    out = Path(out_dir) if out_dir else run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    report = PlotReport(str(run), str(out))
    train = _metrics(run)
    niah = _niah_series(run)
    pf = _frequency_points(run, distances, train)
    if pf is not None:
        report.position_frequency = pf
    losses = _step_files(run / "eval" / "positions", "json")
    heatmaps = [n for n in ("niah", "niah-string") if n in niah]
    # (name, draw(ax, fig)) for each panel that has data; each goes alone and into run.png.
    panels: list[tuple[str, Any]] = []
    if niah:
        panels.append(("effective_length.png", lambda ax, fig, rep: _effective_length(ax, niah, rep)))
    else:
        report.skipped["effective_length.png"] = (f"no NIAH results in {run / 'eval' / 'niah'} (written by the "
                                                  "training sweep or `slimpack eval niah RUN_DIR --every K`)")
    if pf is not None:
        panels.append(("position_frequency.png", lambda ax, fig, rep: _position_frequency(ax, pf, train)))
    else:
        report.skipped["position_frequency.png"] = (f"no ledger in {run} (neither position_frequency/"
                                                    "step_*.npy nor pf_* values in metrics.jsonl)")
    for name in heatmaps:
        panels.append((f"niah_heatmap{'_string' if name == 'niah-string' else ''}.png",
                       lambda ax, fig, rep, name=name: _heatmap(ax, name, niah[name], fig, rep)))
    if losses:
        panels.append(("loss_by_position.png", lambda ax, fig, rep: _loss_by_position(ax, losses, rep)))
    else:
        report.skipped["loss_by_position.png"] = (f"no loss-by-position results in {run / 'eval' / 'positions'} "
                                                  "(eval.position_buckets in training, or `slimpack eval "
                                                  "positions --run-dir`)")
    for name, draw in panels:
        fig, ax = plt.subplots(figsize=(9, 5))
        draw(ax, fig, report)
        report.figures.append(_save(fig, out / name))
    if panels:
        cols = 2 if len(panels) > 1 else 1
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(9 * cols, 5 * rows), squeeze=False)
        scratch = PlotReport(str(run), str(out))  # the panels' numbers are in `report` already
        for ax, (_, draw) in zip(axes.flat, panels, strict=False):
            draw(ax, fig, scratch)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"{run.name}: effective context length, position frequency, retrieval, loss by position")
        report.figures.append(_save(fig, out / "run.png"))
    _goodput(out, report, train)
    (out / "summary.json").write_text(json.dumps(asdict(report), indent=1) + "\n")
    return report
