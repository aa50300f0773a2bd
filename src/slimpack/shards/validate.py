"""Validate a shard dataset: every byte, every sample, every count, optionally the tokenization.

    slimpack shards validate DIR [--workers N] [--all-hashes] [--retokenize N] [--json FILE]

`validate_dataset` returns a `ValidationReport`; the CLI prints its summary and exits 0 when clean,
1 on any finding, 3 when the input is unusable (no `index.json`, no `slimpack.json`, unreadable
JSON; `slimpack.exitcodes`). Every finding names the check, the shard, the sample (and document)
and a fix.

The checks, per shard in parallel over shards (`shard_checks.py`), then over the dataset
(`dataset_checks.py`); what they find (`findings.py`) goes into the report
(`validation_report.py`). The dataset's files are read by `dataset.py`.

Checks, per shard (in parallel over shards, one shard in memory per process):
  its name stays inside the dataset root (else nothing is read: `storage.member_path`); file
  present; stored size and hash; zstd decodes (a failure names the frame and block); raw size and
  hash; header sample count equals
  the index; offsets monotonic and in bounds; embedded config equals the index entry; columns are
  schema v1 (never pickle); every sample decodes; `invariants.sample_problems` on every sample,
  vectorised over runs of about 1 MB of consecutive samples, and sample by sample only when a
  run fails, so each finding names its sample.
Over the dataset: the index and each part's own index agree; no unlisted shard files; parts
missing or extra; every input of the tokenize job has a complete part; the manifest's totals,
per-part, per-split and per-source counts, per-sample token counts (`sample_tokens.npy`) and
fingerprint equal what the shards hold.
`--retokenize N` re-reads N random documents from the recorded input files and compares their ids
with a fresh tokenization. A report with damaged shards lists their parts and the commands that
repair them (delete the part directories, re-run the same tokenize command).

Hashes: by default each file is checked with the fastest algorithm its index entry records
(xxh3_64 when present, ~20 GB/s, so decompression bounds the speed); `--all-hashes` checks every
recorded algorithm (sha1 runs at ~1-2 GB/s).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from slimpack.shards import schema
from slimpack.shards.dataset import UnusableInputError, check_mds_index, manifest_token_ids, read_dataset_json
from slimpack.shards.dataset_checks import check_dataset
from slimpack.shards.findings import Collector, ShardResult
from slimpack.shards.retokenize import check_retokenize
from slimpack.shards.shard_checks import HASH_PREFERENCE, check_shard_task, pick_hashes
from slimpack.shards.validation_report import ValidationReport


def _run_shards(root: Path, entries: list[dict[str, Any]], kwargs: dict[str, Any], workers: int,
                progress: bool) -> Iterator[ShardResult]:
    tasks = [(str(root), i, e, kwargs) for i, e in enumerate(entries)]
    total = sum(int((e.get("zip_data") or e.get("raw_data") or {}).get("bytes") or 0)
                if isinstance(e, dict) else 0 for e in entries)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="validate", disable=not progress,
               dynamic_ncols=True)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                res = check_shard_task(task)
                bar.update(res.stored_bytes)
                yield res
        else:
            with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
                for res in pool.imap_unordered(check_shard_task, tasks):
                    bar.update(res.stored_bytes)
                    yield res
    finally:
        bar.close()


def validate_dataset(path: str | os.PathLike, *, workers: int = 1, all_hashes: bool = False,
                     retokenize: int = 0, seed: int = 0, progress: bool = False) -> ValidationReport:
    """Validate a local dataset directory; see the module docstring for the checks."""
    start = time.monotonic()
    root = Path(path)
    report = ValidationReport(str(root), all_hashes=all_hashes, workers=max(1, workers))
    try:
        _validate(root, report, workers=workers, all_hashes=all_hashes, retokenize=retokenize,
                  seed=seed, progress=progress)
    except UnusableInputError as err:
        report.unusable = str(err)
    report.seconds = time.monotonic() - start
    return report


def _validate(root: Path, report: ValidationReport, *, workers: int, all_hashes: bool,
              retokenize: int, seed: int, progress: bool) -> None:
    if not root.is_dir():
        raise UnusableInputError(f"{root} is not a local directory: point at a dataset directory "
                                 "(for remote shards, copy or mount them locally first)")
    index = read_dataset_json(root / schema.INDEX_FILENAME,
                              "no MDS index; point at a dataset directory or run `slimpack shards merge`")
    manifest = read_dataset_json(root / schema.MANIFEST_FILENAME,
                                 "no slimpack manifest; run `slimpack shards merge DIR` on a complete dataset")
    entries: list[dict[str, Any]] = check_mds_index(index, str(root / schema.INDEX_FILENAME))
    bos, eos, vocab = manifest_token_ids(manifest, str(root / schema.MANIFEST_FILENAME))
    out = Collector()
    kwargs = {"bos_id": bos, "eos_id": eos, "vocab_size": vocab, "all_hashes": all_hashes}
    results: list[ShardResult] = [None] * len(entries)  # type: ignore[list-item]
    algos: set[str] = set()
    for res in _run_shards(root, entries, kwargs, workers, progress):
        results[res.index] = res
    for res in results:  # index order, whatever order the workers finished in
        report.findings.extend(res.findings)
        for k, v in res.suppressed.items():
            report.suppressed[k] = report.suppressed.get(k, 0) + v
    for e in entries:
        for key in ("zip_data", "raw_data"):
            rec = e.get(key) if isinstance(e, dict) else None
            if isinstance(rec, dict) and rec.get("hashes"):
                algos.update(pick_hashes(rec["hashes"], all_hashes))
    report.hash_algorithms = sorted(algos, key=lambda a: HASH_PREFERENCE.index(a)
                                    if a in HASH_PREFERENCE else 99)
    report.shards = len(entries)
    report.stored_bytes = sum(r.stored_bytes for r in results)
    report.raw_bytes = sum(r.raw_bytes for r in results)
    report.shard_seconds = sum(r.seconds for r in results)
    report.samples = sum(len(r.sample_tokens) for r in results if r.sample_tokens is not None)
    report.documents = sum(int(r.sample_docs.sum()) for r in results if r.sample_docs is not None)
    report.tokens = sum(int(r.sample_tokens.sum()) for r in results if r.sample_tokens is not None)

    check_dataset(root, entries, manifest, results, out, report.notes)
    if retokenize > 0:
        report.retokenized = check_retokenize(root, manifest, entries, results, retokenize, seed=seed,
                                              out=out, notes=report.notes)
    report.findings.extend(out.findings)
    for k, v in out.suppressed.items():
        report.suppressed[k] = report.suppressed.get(k, 0) + v
