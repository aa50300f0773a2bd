"""The demo's stages, in order, on one output directory: corpus, tokenize (2 workers), validate,
stats, the loader, train (pre-empted and resumed), loss by position, a needle sweep and the plots.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from slimpack.cli import main as slimpack_main
from slimpack.demo.corpus import build_corpus
from slimpack.extras import require
from slimpack.model.checkpoint_files import list_checkpoints
from slimpack.pipeline import LoaderConfig, PackedLoader
from slimpack.pipeline.tools import digest_steps, inspect_micro_batch
from slimpack.shards.stats import compute_stats, write_plots
from slimpack.shards.validate import validate_dataset
from slimpack.tokenize.config import TokenizeConfig
from slimpack.tokenize.job import run_tokenize
from slimpack.tokenize.tokenizer import Llama3Tokenizer
from slimpack.train.demo import step_train as train_demo

# ----------------------------------------------------------------------------- steps


def step_corpus(ctx: dict[str, Any]) -> None:
    counts = build_corpus(ctx["corpus"])
    print(f"corpus: {sum(counts.values())} documents of Python's own docs, docstrings, source and "
          f"licence in {len(counts)} SlimPajama-layout files under {ctx['corpus']}")


def step_tokenize(ctx: dict[str, Any]) -> None:
    # Small blocks and shards so the demo dataset has several of each, as a real one does.
    cfg = TokenizeConfig(block_tokens=8192, shard_size_limit=1 << 20)
    report = run_tokenize([str(ctx["corpus"])], str(ctx["shards"]), cfg, workers=2,
                          progress=ctx["progress"])
    print(report.summary())
    if not report.ok:
        raise RuntimeError("tokenization failed; see above")


def step_pipeline(ctx: dict[str, Any]) -> None:
    cfg = LoaderConfig(str(ctx["shards"]), seq_len=512, global_batch_tokens=512 * 8, micro_batch_size=4)
    loader = PackedLoader(cfg)
    report = loader.epoch_report()
    print(f"loader: {report['samples']} train samples, {report['stream_tokens']:,} tokens -> "
          f"{loader.steps_per_epoch} steps of {cfg.global_batch_tokens:,} tokens per epoch "
          f"(grad_accum {loader.grad_accum}, {report['dropped_tokens_per_epoch']:,} tail tokens dropped)")
    # Show the first micro-batch in which a document ends and another starts.
    step = next((s for s in range(min(loader.steps_per_epoch, 200))
                 if (loader.stream.micro_batch(s, 0)["labels"] == -100).any()), 0)
    view = inspect_micro_batch(loader, step, 0, decode=Llama3Tokenizer().decode)
    print("\n".join(view.lines(max_chars=120)))
    one = digest_steps(cfg, start_step=0, steps=4)
    two = digest_steps(replace(cfg, world_size=2, micro_batch_size=2), start_step=0, steps=4)
    if one.digests != two.digests:
        raise RuntimeError(f"step digests differ between 1 and 2 ranks: {one.digests} {two.digests}")
    print("per-step digests (1 rank x 4 sequences x 2 micro-steps == 2 ranks x 2 sequences x 2):")
    print("\n".join("  " + line for line in one.lines()))


def step_validate(ctx: dict[str, Any]) -> None:
    report = validate_dataset(ctx["shards"], workers=2, all_hashes=True, retokenize=50,
                              progress=ctx["progress"])
    path = ctx["out"] / "reports" / "validate.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    print(report.summary())
    print(f"validation report: {path}")
    if not report.ok:
        raise RuntimeError("the demo shards do not validate; see above")


def step_stats(ctx: dict[str, Any]) -> None:
    report = compute_stats(ctx["shards"], seq_lens=(2048, 4096), workers=2, progress=ctx["progress"])
    out = ctx["out"] / "stats"
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    print(report.summary())
    print(f"stats: {out / 'stats.json'}")
    for plot in write_plots(report, out):
        print(f"plot: {plot}")


def step_train(ctx: dict[str, Any]) -> None:
    train_demo(ctx)


def step_positions(ctx: dict[str, Any]) -> None:
    """Loss by position of the demo model at each kept checkpoint."""
    run_dir = ctx["out"] / "train"
    for ckpt in list_checkpoints(run_dir / "checkpoints"):
        if slimpack_main(["eval", "positions", str(ckpt), "--data", str(ctx["shards"]), "--max-documents", "8",
                          "--buckets", "8", "--device", "cpu"]) != 0:
            raise RuntimeError(f"eval positions failed on {ckpt}")


def step_niah(ctx: dict[str, Any]) -> None:
    """A short needle sweep (the paper protocol, two lengths, a few samples, a 32-token answer
    budget) over every kept checkpoint of the demo's run, haystack from its validation split, then
    the run's figures. A 24-step model retrieves nothing; the numbers that matter come from
    `slimpack eval niah` on a trained checkpoint."""
    run_dir = ctx["out"] / "train"
    argv = ["eval", "niah", str(run_dir), "--every", "1", "--data", str(ctx["shards"]), "--lengths", "128,256",
            "--max-new-tokens", "32", "--samples", "4", "--device", "cpu"]
    if not ctx["progress"]:
        argv.append("--no-progress")
    if slimpack_main(argv) != 0:
        raise RuntimeError("eval niah failed; see above")
    if slimpack_main(["plot", str(run_dir)]) != 0:
        raise RuntimeError("plot failed")


STEPS: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("corpus", step_corpus),
    ("tokenize", step_tokenize),
    ("validate", step_validate),
    ("stats", step_stats),
    ("pipeline", step_pipeline),
    ("train", step_train),
    ("positions", step_positions),
    ("niah", step_niah),
]


def run_demo(out: Path, *, progress: bool = True) -> dict[str, Any]:
    for module in ("torch", "matplotlib"):  # the train step and the stats plots: say so before any work
        require(module)
    ctx: dict[str, Any] = {"out": out, "corpus": out / "corpus", "shards": out / "shards",
                           "progress": progress}
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    for name, step in STEPS:
        t0 = time.monotonic()
        print(f"== {name}")
        step(ctx)
        print(f"   ({time.monotonic() - t0:.1f} s)")
    print(f"demo done in {time.monotonic() - start:.1f} s; everything is under {out}")
    return ctx
