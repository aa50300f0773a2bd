"""The offline tokenization job: input files -> per-file MDS parts -> merged dataset.

    slimpack tokenize INPUT... --out DIR [--workers N] [--node-rank R --num-nodes N]

Work unit: one input file -> one part directory whose bytes depend only on that file, the
tokenizer and the config. Parts go to nodes round-robin over the sorted part list, and to a
node's worker processes in any order; neither changes a byte. A part is complete only when its
`stats.json` is in place (written last, atomically); a re-run skips complete parts and redoes the
rest. Each part is checked, cleared and written under a lock (`lock.py`), so two runs on one
`--out` never clear each other's parts. When every part is complete, the job merges (see
`merge.py`); `inputs.json` records every input, so a merge of fewer parts can say what is missing.

The pieces: `config.py` (what decides a part's bytes), `part.py` (one input -> one part),
`lock.py`, `pool.py` (the worker processes and progress), `nodes.py` (this node's rank),
`layout.py` (the files under `--out`), `report.py`, `merge.py`. This module is the driver.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from slimpack.extras import require
from slimpack.shards import schema
from slimpack.storage import Root
from slimpack.tokenize.config import TokenizeConfig
from slimpack.tokenize.layout import dumps_json, part_complete, part_stats_name
from slimpack.tokenize.merge import MergeWriteError, merge_dataset
from slimpack.tokenize.nodes import node_from_env
from slimpack.tokenize.pool import run_parts
from slimpack.tokenize.readers import JSONL_SUFFIXES, KIND_MODULES, InputFile, discover, input_bytes
from slimpack.tokenize.report import TokenizeReport


def run_tokenize(
    inputs: Sequence[str],
    out: str,
    cfg: TokenizeConfig,
    *,
    workers: int = 1,
    node_rank: int | None = None,
    num_nodes: int | None = None,
    progress: bool = False,
    staging_dir: str | None = None,
) -> TokenizeReport:
    """Tokenize this node's share of the inputs into `out`, then merge if every part is done."""
    start = time.monotonic()
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers} (--workers)")
    rank, count = node_from_env(node_rank, num_nodes)
    items, ignored = discover(inputs)
    if not items:
        seen = f" ({len(ignored)} other file(s), e.g. {ignored[0]})" if ignored else ""
        raise ValueError(f"no input files found in {list(inputs)}{seen}; inputs are "
                         f"{', '.join(JSONL_SUFFIXES)}, .parquet or save_to_disk directories")
    for module in sorted({KIND_MODULES[i.kind] for i in items if i.kind in KIND_MODULES}):
        require(module)  # a missing extra: one line now, not one failed part per input later
    root = Root(out)
    if not root.remote and Path(root.path).exists() and not Path(root.path).is_dir():
        raise ValueError(f"--out {out} is an existing file, not a directory; pass a directory path "
                         "(a new one, or the output of an earlier run to resume it)")
    _record_inputs(root, items)
    mine = items[rank::count]
    report = TokenizeReport(out=root.url, node_rank=rank, num_nodes=count,
                            parts_total=len(items), parts_assigned=len(mine), ignored_files=ignored)
    todo = []
    for item in mine:
        if part_complete(root, item.part):
            report.parts_skipped_complete.append(item.part)
        else:
            todo.append(item)
    # Largest first: the last part to finish is a small one, so workers finish together.
    sizes = {i.part: input_bytes(i) for i in todo}
    todo.sort(key=lambda i: (-sizes[i.part], i.part))
    total_bytes = sum(sizes.values())
    results = run_parts(todo, cfg, root.url, workers, total_bytes, progress, staging_dir)
    skipped: Counter[str] = Counter()
    for res in results:
        if "error" in res:
            report.parts_failed[res["part"]] = res["error"]
            continue
        if res.get("complete"):
            report.parts_skipped_complete.append(res["part"])
            continue
        report.parts_done.append(res["part"])
        report.documents += res["documents"]
        report.tokens += res["tokens"]
        report.input_bytes += res["input"]["bytes"]
        skipped.update(res["skipped"])
        report.bad_examples.extend(res["bad_examples"])
    report.skipped_records = dict(sorted(skipped.items()))
    missing = [i.part for i in items if not root.exists(part_stats_name(i.part))]
    if missing:
        report.merge_note = (f"{len(missing)} part(s) not complete yet (e.g. {missing[0]}); "
                             "merge runs when the last one finishes, or run `slimpack shards merge`")
    else:
        try:
            merge_dataset(root.url, expected_parts=[i.part for i in items])
            report.merged = True
        except MergeWriteError as err:  # reported like a failed part: the parts stay complete
            report.merge_error = str(err)
    report.seconds = time.monotonic() - start
    try:
        root.write_bytes(f"reports/tokenize.node-{rank:05d}-of-{count:05d}.json",
                         dumps_json(dataclasses.asdict(report)))
    except OSError as err:  # the disk that failed the merge fails this too: the summary still prints
        report.report_error = f"reports/: {err.strerror or err}"
    return report


def _record_inputs(root: Root, items: list[InputFile]) -> None:
    """Write `inputs.json`: every input of the job, so that a merge of fewer parts (`slimpack
    shards merge` after a failed part) records, and validate reports, the inputs left out.

    Every node writes the same list; it is rewritten only when it changes, so a re-run on a full
    disk still reaches the merge and its clear error.
    """
    data = dumps_json({"inputs": [{"part": i.part, "path": str(Path(i.path).absolute()),
                                   "split": i.split, "kind": i.kind} for i in items]})
    try:
        if root.exists(schema.INPUTS_FILENAME) and root.read_bytes(schema.INPUTS_FILENAME) == data:
            return
        root.write_bytes(schema.INPUTS_FILENAME, data)
    except OSError as err:
        raise RuntimeError(f"{root.url}: could not write {schema.INPUTS_FILENAME} "
                           f"({err.strerror or err}): free space or fix permissions on --out") from err
