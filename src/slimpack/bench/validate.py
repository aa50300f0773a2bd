"""`slimpack bench validate [INPUT]`: structural validation throughput, MB/s of shard data per process.

Builds a dataset with the default shard format (65,536-token samples, 64 MiB shards, zstd:3,
sha1 + xxh3_64) by tokenizing INPUT with every file repeated `--repeat` times (zstd frames
concatenate, so a repeated file is a valid, bigger file of real text), then times
`validate_dataset` on it. Baseline in the same run: reading and zstd-decompressing the same shard
files and nothing else, the floor any validator pays. Files are in the page cache (just written,
then read once before timing), so this measures the validator, not the disk. Without INPUT the
demo corpus (`slimpack demo`'s text in SlimPajama's layout) is built into a scratch directory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import zstandard

from slimpack.demo.corpus import build_corpus
from slimpack.shards import mds, schema
from slimpack.shards.findings import Collector, ShardResult
from slimpack.shards.shard_checks import per_sample_checks, vectorised_checks
from slimpack.shards.validate import validate_dataset
from slimpack.tokenize.job import TokenizeConfig, run_tokenize
from slimpack.tokenize.readers import Record, discover, read_records


def _shift(text: str, r: int) -> str:
    """Copy r of a text: ASCII letters rotated by r (26 distinct copies of the same shape)."""
    lower, upper = "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    table = str.maketrans(lower + upper, lower[r:] + lower[:r] + upper[r:] + upper[:r])
    return text.translate(table)


def _replicate(src: Path, dst: Path, repeat: int) -> int:
    """Each input file, `repeat` times over with distinct text per copy.

    Verbatim copies would let zstd match one copy against the previous one (about 20x smaller
    shards that decompress unrealistically fast); rotated letters keep each copy's statistics and
    compressibility close to the original's while no two copies share bytes.
    """
    items = discover([str(src)])[0]
    for item in items:
        texts = [(r.text, r.source) for r in read_records(item) if isinstance(r, Record)]
        lines = [json.dumps({"text": _shift(t, r % 26), "meta": {"redpajama_set_name": s}}) + "\n"
                 for r in range(repeat) for t, s in texts]
        out = dst / f"{item.part}.jsonl.zst"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(zstandard.ZstdCompressor(level=3).compress("".join(lines).encode()))
    return len(items)


def _decompress_only(root: Path) -> dict[str, float]:
    entries = mds.read_json(root / schema.INDEX_FILENAME)["shards"]
    t0 = time.perf_counter()
    raw = 0
    for e in entries:
        data = (root / e["zip_data"]["basename"]).read_bytes()
        raw += len(mds.decompress(e["compression"], data))
    seconds = time.perf_counter() - t0
    return {"raw_bytes": raw, "seconds": seconds, "raw_mb_per_s": raw / 1e6 / seconds}


def _check_paths(root: Path, runs: int) -> dict[str, float]:
    """The two equivalent sample-check paths on decompressed shards (decompression and hashing
    excluded, one shard in memory at a time): MB/s of raw shard data, best of `runs`."""
    manifest = mds.read_json(root / schema.MANIFEST_FILENAME)
    ids = {"bos_id": manifest["bos_id"], "eos_id": manifest["eos_id"], "vocab_size": manifest["vocab_size"]}
    paths = {
        "per_sample": lambda s: per_sample_checks(s, ShardResult(0, "", None), Collector(), **ids),
        "vectorised": lambda s: vectorised_checks(s, **ids),
    }
    best = dict.fromkeys(paths, float("inf"))
    raw = 0
    for _ in range(runs):
        seconds = dict.fromkeys(paths, 0.0)
        raw = 0
        for info in mds.parse_index(mds.read_json(root / schema.INDEX_FILENAME)):
            shard = mds.load_shard(root, info)
            raw += len(shard.raw)
            for name, check in paths.items():
                t0 = time.perf_counter()
                if not check(shard):
                    raise RuntimeError(f"{info.basename} fails the {name} checks")
                seconds[name] += time.perf_counter() - t0
        best = {name: min(best[name], seconds[name]) for name in paths}
    return {f"{name}_raw_mb_per_s": raw / 1e6 / best[name] for name in paths}


def _validate(root: Path, **kwargs: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    report = validate_dataset(root, **kwargs)
    wall = time.perf_counter() - t0
    if not report.ok:
        raise RuntimeError(f"the benchmark dataset does not validate:\n{report.summary()}")
    return {"workers": report.workers, "hashes": report.hash_algorithms, "wall_seconds": wall,
            "shard_seconds": report.shard_seconds, "raw_bytes": report.raw_bytes,
            "stored_bytes": report.stored_bytes,
            "raw_mb_per_s_per_process": report.raw_bytes / 1e6 / report.shard_seconds,
            "stored_mb_per_s_per_process": report.stored_bytes / 1e6 / report.shard_seconds,
            "raw_mb_per_s_wall": report.raw_bytes / 1e6 / wall}


def run_bench(input_dir: Path | None, repeat: int, scratch: Path, runs: int = 5,
              block_tokens: int = 65_536) -> dict[str, Any]:
    src = input_dir
    if src is None:
        src = scratch / "demo-corpus"
        build_corpus(src)
    files = _replicate(src, scratch / "input", repeat)
    t0 = time.perf_counter()
    tok = run_tokenize([str(scratch / "input")], str(scratch / "ds"),
                       TokenizeConfig(block_tokens=block_tokens), workers=2, progress=False)
    if not tok.ok:
        raise RuntimeError(tok.summary())
    root = scratch / "ds"
    result: dict[str, Any] = {"input": str(src), "repeat": repeat, "files": files, "tokens": tok.tokens,
                              "block_tokens": block_tokens,
                              "build_seconds": time.perf_counter() - t0}
    _decompress_only(root)  # warm the page cache
    # Interleaved, so the baseline and each variant see the same load on a shared machine; the
    # best run of each is reported.
    runs_of: dict[str, list[dict[str, Any]]] = {"base": [], "one": [], "all": []}
    for _ in range(runs):
        runs_of["base"].append(_decompress_only(root))
        runs_of["one"].append(_validate(root, workers=1))
        runs_of["all"].append(_validate(root, workers=1, all_hashes=True))
    best = lambda rs: max(rs, key=lambda r: r["raw_mb_per_s_per_process"])  # noqa: E731
    result["baseline_decompress_only"] = max(runs_of["base"], key=lambda r: r["raw_mb_per_s"])
    result["validate_1proc"] = best(runs_of["one"])
    result["validate_1proc_all_hashes"] = best(runs_of["all"])
    result["validate_2proc"] = _validate(root, workers=2)
    result["sample_checks_only"] = _check_paths(root, runs)
    base = result["baseline_decompress_only"]["raw_mb_per_s"]
    result["validate_over_decompress_only"] = result["validate_1proc"]["raw_mb_per_s_per_process"] / base
    result["shards"] = len(json.loads((root / "index.json").read_text())["shards"])
    return result


def main(args: argparse.Namespace) -> int:
    if args.input is not None and not Path(args.input).exists():
        raise FileNotFoundError(f"{args.input}: no such input; pass a directory of *.jsonl[.zst] files")
    with tempfile.TemporaryDirectory(prefix="slimpack-bench-validate-") as tmp:
        res = run_bench(Path(args.input) if args.input else None, args.repeat, Path(tmp), args.runs,
                        block_tokens=args.block_tokens)
    base = res["baseline_decompress_only"]
    v1 = res["validate_1proc"]
    print(f"dataset: {res['tokens']:,} tokens from {res['input']} x{res['repeat']} in {res['shards']} "
          f"shards of {res['block_tokens']:,}-token samples, {v1['raw_bytes'] / 1e6:,.0f} MB raw, "
          f"{v1['stored_bytes'] / 1e6:,.0f} MB stored "
          f"(built in {res['build_seconds']:.0f} s)")
    print(f"baseline, read + zstd decompress only: {base['raw_mb_per_s']:,.0f} MB/s raw, 1 process")
    for key, label in (("validate_1proc", "validate, 1 process"),
                       ("validate_1proc_all_hashes", "validate --all-hashes, 1 process"),
                       ("validate_2proc", "validate, 2 processes")):
        r = res[key]
        print(f"{label}: {r['raw_mb_per_s_per_process']:,.0f} MB/s raw "
              f"({r['stored_mb_per_s_per_process']:,.0f} MB/s stored) per process in the shard checks; "
              f"{r['raw_mb_per_s_wall']:,.0f} MB/s raw wall "
              f"clock, everything included; hashes {', '.join(r['hashes'])}")
    print(f"validate / decompress-only: {res['validate_over_decompress_only']:.2f}")
    c = res["sample_checks_only"]
    print(f"sample checks alone (decompressed shards in memory): per-sample path "
          f"{c['per_sample_raw_mb_per_s']:,.0f} MB/s raw, vectorised path "
          f"{c['vectorised_raw_mb_per_s']:,.0f} MB/s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0
