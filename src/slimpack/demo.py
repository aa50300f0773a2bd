"""`slimpack demo`: the whole pipeline end to end on text every Python installation ships.

No network and nothing outside the Python installation. Builds a small corpus in SlimPajama's
layout from real human-written text (the pydoc topic help, standard-library docstrings and source,
the Python licence), labelled by what it really is, tokenizes it with 2 workers, checks the shard
invariants, and goes on through the later stages as they exist.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import zstandard

from slimpack import exitcodes
from slimpack.extras import require

# Honest labels: what each document really is (SlimPajama's field, our values).
SOURCE_TOPICS = "PythonDocsTopics"
SOURCE_DOCSTRINGS = "PythonStdlibDocstrings"
SOURCE_CODE = "PythonStdlibSource"
SOURCE_LICENSE = "PythonLicense"

_TRAIN_FILES = 4
_MAX_CODE_DOCS = 300  # keeps the corpus (and the demo) small: about 10 MB of text


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in ("site-packages", "dist-packages", "test", "idlelib", "lib2to3") or "tests" in rel:
            continue
        files.append(path)
    return files


def iter_corpus() -> Iterator[tuple[str, str, str]]:
    """(document id, source label, text) for every demo document, in a fixed order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        if topics[name].strip():
            yield f"topic:{name}", SOURCE_TOPICS, topics[name]
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _stdlib_files()
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = []
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    title = getattr(node, "name", path.relative_to(root).as_posix())
                    docs.append(f"{title}\n\n{doc}")
        if docs:
            yield f"docstrings:{path.relative_to(root)}", SOURCE_DOCSTRINGS, "\n\n".join(dict.fromkeys(docs))
    step = max(1, len(files) // _MAX_CODE_DOCS)
    for path in files[::step]:
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield f"source:{path.relative_to(root)}", SOURCE_CODE, text
    for lic in (root / "LICENSE.txt", Path(sys.base_prefix) / "LICENSE.txt"):
        if lic.exists():
            yield "license", SOURCE_LICENSE, lic.read_text(encoding="utf-8", errors="replace")
            break


def build_corpus(out: Path) -> dict[str, int]:
    """Write the corpus as SlimPajama-style `*.jsonl.zst` files; returns documents per file."""
    files: dict[str, list[bytes]] = {}
    for doc_id, source, text in iter_corpus():
        bucket = int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % 20
        if bucket == 0:
            name = "validation/chunk1/example_holdout_0.jsonl.zst"
        elif bucket == 1:
            name = "test/chunk1/example_holdout_0.jsonl.zst"
        else:
            name = f"train/chunk1/example_train_{bucket % _TRAIN_FILES}.jsonl.zst"
        line = json.dumps({"text": text, "meta": {"redpajama_set_name": source}}, ensure_ascii=False)
        files.setdefault(name, []).append(line.encode("utf-8") + b"\n")
    counts = {}
    for name in sorted(files):
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(zstandard.ZstdCompressor(level=3).compress(b"".join(files[name])))
        counts[name] = len(files[name])
    return counts


# ----------------------------------------------------------------------------- steps


def step_corpus(ctx: dict[str, Any]) -> None:
    counts = build_corpus(ctx["corpus"])
    print(f"corpus: {sum(counts.values())} documents of Python's own docs, docstrings, source and "
          f"licence in {len(counts)} SlimPajama-layout files under {ctx['corpus']}")


def step_tokenize(ctx: dict[str, Any]) -> None:
    from slimpack.tokenize.job import TokenizeConfig, run_tokenize

    # Small blocks and shards so the demo dataset has several of each, as a real one does.
    cfg = TokenizeConfig(block_tokens=8192, shard_size_limit=1 << 20)
    report = run_tokenize([str(ctx["corpus"])], str(ctx["shards"]), cfg, workers=2,
                          progress=ctx["progress"])
    print(report.summary())
    if not report.ok:
        raise RuntimeError("tokenization failed; see above")


def step_pipeline(ctx: dict[str, Any]) -> None:
    from dataclasses import replace

    from slimpack.pipeline import LoaderConfig, PackedLoader
    from slimpack.pipeline.tools import digest_steps, inspect_micro_batch
    from slimpack.tokenize.tokenizer import Llama3Tokenizer

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
    from slimpack.shards.validate import validate_dataset

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
    from slimpack.shards.stats import compute_stats, write_plots

    report = compute_stats(ctx["shards"], seq_lens=(2048, 4096), workers=2, progress=ctx["progress"])
    out = ctx["out"] / "stats"
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    print(report.summary())
    print(f"stats: {out / 'stats.json'}")
    for plot in write_plots(report, out):
        print(f"plot: {plot}")


def step_train(ctx: dict[str, Any]) -> None:
    from slimpack.train.demo import step_train as train_demo

    train_demo(ctx)


def step_positions(ctx: dict[str, Any]) -> None:
    """Loss by position of the demo model at each kept checkpoint."""
    from slimpack.cli import main as slimpack_main
    from slimpack.model.checkpoint_files import list_checkpoints

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
    from slimpack.cli import main as slimpack_main

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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on a corpus built from Python's own text")
    p.add_argument("--out", default="slimpack-demo", help="output directory (default: ./slimpack-demo)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from slimpack.train.demo import DemoStopped

    try:
        run_demo(Path(args.out), progress=not args.no_progress and sys.stderr.isatty())
    except DemoStopped as stop:
        print(f"slimpack demo: stopped by {stop.signal_name} (a run of `slimpack demo` starts over)", file=sys.stderr)
        return exitcodes.INTERRUPTED if stop.signal_name == "SIGINT" else exitcodes.TERMINATED
    return exitcodes.OK
