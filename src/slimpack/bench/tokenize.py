"""`slimpack bench tokenize [INPUT]`: end-to-end tokenization against raw tiktoken.

End to end = `slimpack tokenize` (decompress, parse, tokenize, write shards, merge) as a whole,
worker start-up included. Raw = `encode_ordinary_batch` over the same texts, already decoded in
memory, in the same run. Both at 1 and at 2 processes. The input is copied `--repeat` times so
each run lasts long enough to time. Without INPUT the demo corpus (`slimpack demo`'s Python
docs, docstrings and source in SlimPajama's layout) is built into a scratch directory and used.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from llama_models.llama3.tokenizer import Tokenizer

from slimpack.demo.corpus import build_corpus
from slimpack.tokenize.job import TokenizeConfig, run_tokenize
from slimpack.tokenize.readers import Record, discover, read_records
from slimpack.tokenize.tokenizer import Llama3Tokenizer


def _texts(inputs: list[str]) -> list[list[str]]:
    """Texts per input file."""
    return [[r.text for r in read_records(item) if isinstance(r, Record)] for item in discover(inputs)[0]]


def _raw_worker(texts: list[str]) -> tuple[int, float]:
    enc = Llama3Tokenizer().encoding
    t0 = time.perf_counter()
    n = sum(len(ids) for ids in enc.encode_ordinary_batch(texts, num_threads=1))
    return n, time.perf_counter() - t0


def _raw(per_file: list[list[str]], processes: int) -> dict[str, float]:
    """Raw tiktoken: each process encodes its share of the files; wall time of the slowest."""
    shares = [[t for f in per_file[i::processes] for t in f] for i in range(processes)]
    with mp.get_context("spawn").Pool(processes) as pool:
        results = pool.map(_raw_worker, shares)
    per_process = [n / s for n, s in results]
    return {"tokens": sum(n for n, _ in results), "encode_seconds": [s for _, s in results],
            "tokens_per_s_per_process": sum(per_process) / len(per_process)}


def _end_to_end(inputs: list[str], workers: int, scratch: Path) -> dict[str, float]:
    out = scratch / f"out-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    report = run_tokenize(inputs, str(out), TokenizeConfig(), workers=workers, progress=False)
    wall = time.perf_counter() - t0
    return {"tokens": report.tokens, "wall_seconds": wall, "tokens_per_s": report.tokens / wall,
            "tokens_per_s_per_process": report.tokens / wall / workers}


def run_bench(input_dir: str | None, repeat: int, scratch: Path) -> dict[str, Any]:
    if input_dir is None:
        src = scratch / "demo-corpus"
        build_corpus(src)
    else:
        src = Path(input_dir)
    data = scratch / "input"
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name.endswith((".jsonl.zst", ".jsonl", ".jsonl.gz")))
    for r in range(repeat):
        for f in files:
            dst = data / f"copy{r:03d}" / f.relative_to(src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
    inputs = [str(data)]
    per_file = _texts(inputs)
    result: dict[str, Any] = {"input": str(src), "repeat": repeat, "files": len(per_file),
                              "text_bytes": sum(len(t.encode()) for f in per_file for t in f)}
    for procs in (1, 2):
        raw = _raw(per_file, procs)
        e2e = _end_to_end(inputs, procs, scratch)
        result[f"{procs}proc"] = {"raw": raw, "end_to_end": e2e,
                                  "e2e_over_raw": e2e["tokens_per_s_per_process"] / raw["tokens_per_s_per_process"]}
    e2e = {p: result[f"{p}proc"]["end_to_end"]["tokens_per_s"] for p in (1, 2)}
    result["scaling_1_to_2"] = e2e[2] / e2e[1]
    return result


def pathological() -> dict[str, dict[str, float]]:
    """Seconds to encode 1 MB and 2 MB of one repeated character, of spaces and of one line of
    words (no newline), ours and Meta's reference, checking the ids are equal.

    Near-linear means the 2 MB time is about twice the 1 MB time.
    """
    ours, meta = Llama3Tokenizer(), Tokenizer.get_instance()
    out = {}
    for name, unit in (("one_char", "a"), ("spaces", " "), ("one_line_of_words", "lorem ipsum ")):
        for mb in (1, 2):
            text = (unit * (mb * 1_000_000 // len(unit) + 1))[: mb * 1_000_000]
            t0 = time.perf_counter()
            ids = ours.encode_document(text)
            t1 = time.perf_counter()
            ref = meta.encode(text, bos=True, eos=True)
            t2 = time.perf_counter()
            if ids.tolist() != ref:
                raise RuntimeError(f"{name} {mb} MB: ids differ from Meta's")
            out[f"{name}_{mb}MB"] = {"ours_seconds": t1 - t0, "meta_seconds": t2 - t1, "tokens": len(ids)}
    return out


def main(args: argparse.Namespace) -> int:
    if args.input is not None and not Path(args.input).exists():
        raise FileNotFoundError(f"{args.input}: no such input; pass a directory of *.jsonl[.zst] files")
    res: dict[str, Any] = {"pathological": pathological()}
    for name, r in res["pathological"].items():
        print(f"{name:22s} ours {r['ours_seconds']:.3f} s   Meta reference {r['meta_seconds']:.3f} s")
    if args.pathological_only:
        return _write(res, args.json)
    with tempfile.TemporaryDirectory(prefix="slimpack-bench-") as tmp:
        res.update(run_bench(args.input, args.repeat, Path(tmp)))
    for procs in (1, 2):
        r = res[f"{procs}proc"]
        print(f"{procs} process(es): raw tiktoken {r['raw']['tokens_per_s_per_process']:,.0f} tok/s per process "
              f"(encode only), end to end {r['end_to_end']['tokens_per_s_per_process']:,.0f} tok/s per process "
              f"(wall, start-up and merge included): {r['e2e_over_raw']:.2f}x raw")
    print(f"end-to-end scaling 1 -> 2 processes: {res['scaling_1_to_2']:.2f}x")
    return _write(res, args.json)


def _write(res: dict[str, Any], path: str | None) -> int:
    if path:
        Path(path).write_text(json.dumps(res, indent=1))
    return 0
