"""The offline tokenization job: input files -> per-file MDS parts -> merged dataset.

    slimpack tokenize INPUT... --out DIR [--workers N] [--node-rank R --num-nodes N]

Work unit: one input file -> one part directory whose bytes depend only on that file, the
tokenizer and the config. Parts go to nodes round-robin over the sorted part list, and to a
node's worker processes in any order; neither changes a byte. A part is complete only when its
`stats.json` is in place (written last, atomically); a re-run skips complete parts and redoes the
rest. Each part is checked, cleared and written under a lock (`_part_lock`), so two runs on one
`--out` never clear each other's parts. When every part is complete, the job merges (see
`merge.py`); `inputs.json` records every input, so a merge of fewer parts can say what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import queue
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimpack import __version__
from slimpack.extras import require
from slimpack.shards import mds, schema
from slimpack.storage import Root
from slimpack.tokenize.readers import (
    JSONL_SUFFIXES,
    KIND_MODULES,
    BadRecord,
    InputFile,
    discover,
    input_bytes,
    read_records,
)
from slimpack.tokenize.tokenizer import Llama3Tokenizer


@dataclass(frozen=True)
class TokenizeConfig:
    """Everything that decides a part's bytes (plus the bad-record policy)."""

    text_field: str = "text"
    source_field: str = "meta.redpajama_set_name"
    default_source: str = "unknown"
    block_tokens: int = schema.DEFAULT_BLOCK_TOKENS
    shard_size_limit: int = schema.DEFAULT_SHARD_SIZE_LIMIT
    compression: str | None = schema.DEFAULT_COMPRESSION
    hashes: tuple[str, ...] = schema.DEFAULT_HASHES
    on_bad_record: str = "skip"
    bad_examples: int = 5

    def __post_init__(self) -> None:
        if self.on_bad_record not in ("skip", "fail"):
            raise ValueError(f"on_bad_record must be 'skip' or 'fail', not {self.on_bad_record!r}")
        if self.block_tokens < 1:
            raise ValueError(f"block_tokens must be positive, not {self.block_tokens}")
        if self.compression in ("", "none"):
            object.__setattr__(self, "compression", None)
        mds.compress(self.compression, b"")  # refuses unknown compression names early


@dataclass(frozen=True)
class TokenizeSettings:
    """What `--config FILE` and `--set` configure: the file's `[tokenize]` table, whose keys
    `--set tokenize.KEY=VALUE` overrides (configs/tokenize/slimpajama.toml)."""

    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)


class BadRecordError(RuntimeError):
    """A bad record under `--on-bad-record fail`."""


class AllRecordsSkippedError(RuntimeError):
    """Every record of an input was skipped for one reason: a misnamed field or a file that is not
    JSON lines, not bad data to count (merging it would give an empty part that validates clean)."""


# How to fix an input whose every record was skipped for this reason.
_ALL_SKIPPED_FIXES = {
    "missing_text": "the text is in another field: re-run with --set tokenize.text_field=FIELD (one of the "
                    "fields above; a dotted path such as meta.text reaches a nested one)",
    "non_string_text": "the text field holds no strings: re-run with --set tokenize.text_field=FIELD naming "
                       "the field that holds the text",
    "empty_text": "the text field is empty in every record: re-run with --set tokenize.text_field=FIELD naming "
                  "the field that holds the text, or exclude the file",
}
_NOT_JSONL_FIX = "the file is not UTF-8 JSON lines of objects: check or re-create it, or exclude it"


# Text per encode call: big enough to amortise Python overhead, small enough to bound memory.
_ENCODE_BATCH_CHARS = 1 << 22


class _Blocks:
    """Groups documents into samples of whole documents of at least `block_tokens` tokens."""

    def __init__(self, writer: mds.ShardWriter, block_tokens: int) -> None:
        self.writer, self.block_tokens = writer, block_tokens
        self.docs: list[np.ndarray] = []
        self.sources: list[int] = []
        self.size = 0
        self.sample_tokens: list[int] = []

    def add(self, ids: np.ndarray, source: int) -> None:
        if len(ids) >= self.block_tokens and self.docs:
            self.flush()  # a document longer than the target is a block alone
        self.docs.append(ids)
        self.sources.append(source)
        self.size += len(ids)
        if self.size >= self.block_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.docs:
            return
        lengths = np.fromiter((len(d) for d in self.docs), np.int64, len(self.docs))
        cu = np.concatenate([[0], np.cumsum(lengths)])
        if cu[-1] >= 2**31:
            raise ValueError("a sample over 2**31 tokens cannot be indexed by int32 cu_seqlens")
        self.writer.write({
            "tokens": np.concatenate(self.docs),
            "cu_seqlens": cu.astype(np.int32),
            "doc_sources": np.asarray(self.sources, np.uint32),
        })
        self.sample_tokens.append(int(cu[-1]))
        self.docs, self.sources, self.size = [], [], 0


def tokenize_part(
    item: InputFile,
    cfg: TokenizeConfig,
    tokenizer: Llama3Tokenizer,
    part_dir: Path,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Tokenize one input into MDS shards under `part_dir`; returns the part's stats.

    `on_progress(bytes, tokens)` is called with increments. Raises `CorruptInputError`,
    `BadRecordError` or `AllRecordsSkippedError`; the caller owns cleanup.
    """
    writer = mds.ShardWriter(part_dir, columns=schema.COLUMNS, compression=cfg.compression,
                             hashes=cfg.hashes, size_limit=cfg.shard_size_limit)
    blocks = _Blocks(writer, cfg.block_tokens)
    skipped: Counter[str] = Counter()
    first_detail: dict[str, str] = {}
    examples: list[dict[str, Any]] = []
    sources: dict[str, dict[str, int]] = {}
    docs = tokens = surrogates = 0
    sha = hashlib.sha256()
    pending: list[tuple[str, str]] = []
    pending_chars = 0

    def on_bytes(n: int) -> None:
        if on_progress:
            on_progress(n, 0)

    def encode_pending() -> None:
        nonlocal docs, tokens, surrogates, pending, pending_chars
        encoded, replaced = tokenizer.encode_batch([t for t, _ in pending])
        surrogates += replaced
        for (_, source), ids in zip(pending, encoded):
            entry = sources.setdefault(source, {"id": schema.source_id(source), "documents": 0, "tokens": 0})
            entry["documents"] += 1
            entry["tokens"] += len(ids)
            blocks.add(ids, entry["id"])
        n = sum(len(ids) for ids in encoded)
        docs += len(encoded)
        tokens += n
        if on_progress:
            on_progress(0, n)
        pending, pending_chars = [], 0

    for rec in read_records(item, text_field=cfg.text_field, source_field=cfg.source_field,
                            default_source=cfg.default_source, on_bytes=on_bytes):
        if isinstance(rec, BadRecord):
            where = f"{item.path}:{rec.line}"
            if cfg.on_bad_record == "fail":
                raise BadRecordError(
                    f"{where}: {rec.reason} ({rec.detail}); fix the record, or re-run with "
                    "--on-bad-record skip to skip and count such records")
            skipped[rec.reason] += 1
            first_detail.setdefault(rec.reason, rec.detail[:300])
            if len(examples) < cfg.bad_examples:
                examples.append({"reason": rec.reason, "file": item.path, "line": rec.line,
                                 "detail": rec.detail[:200]})
            continue
        pending.append((rec.text, rec.source))
        pending_chars += len(rec.text)
        if pending_chars >= _ENCODE_BATCH_CHARS:
            encode_pending()
    if pending:
        encode_pending()
    if docs == 0 and len(skipped) == 1:
        (reason, n), = skipped.items()
        raise AllRecordsSkippedError(
            f"{item.path}: all {n:,} records were skipped as {reason} ({first_detail[reason]}); "
            + _ALL_SKIPPED_FIXES.get(reason, _NOT_JSONL_FIX))
    blocks.flush()
    index = writer.finish()
    if item.kind != "hf":
        with open(item.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                sha.update(chunk)
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "part": item.part,
        "split": item.split,
        "input": {"path": str(Path(item.path).absolute()), "kind": item.kind,
                  "bytes": input_bytes(item), "sha256": sha.hexdigest() if item.kind != "hf" else None},
        "documents": docs,
        "tokens": tokens,
        "samples": len(blocks.sample_tokens),
        "shards": len(index["shards"]),
        "sample_tokens": blocks.sample_tokens,
        "sources": dict(sorted(sources.items())),
        "skipped": dict(sorted(skipped.items())),
        "bad_examples": examples,
        "surrogates_replaced": surrogates,
        "tokenizer": tokenizer.identity,
        "config": _config_dict(cfg),
        "slimpack_version": __version__,
    }


def _config_dict(cfg: TokenizeConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["hashes"] = list(cfg.hashes)
    return d


def dumps_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8")


def part_dir_name(part: str) -> str:
    return f"{schema.PARTS_DIRNAME}/{part}"


def part_stats_name(part: str) -> str:
    return f"{part_dir_name(part)}/{schema.PART_STATS_FILENAME}"


# ----------------------------------------------------------------------------- workers

_worker: dict[str, Any] = {}


def _init_worker(progress_queue: Any) -> None:
    _worker["tokenizer"] = Llama3Tokenizer()
    _worker["queue"] = progress_queue


def _lock_path(root: Root, part: str) -> Path:
    if root.remote:  # no lock on an object store: a local file, so runs on this host exclude each other
        key = hashlib.sha256(root.url.encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / "slimpack-locks" / key / f"{part}.lock"
    return Path(root.join(f"{part_dir_name(part)}.lock"))


def _flock(fd: int, path: Path, part: str) -> None:
    """Take an exclusive flock(2) on `fd`, saying once on stderr whom it waits for."""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace") or "another run"
            print(f"tokenize: part {part} is being written by {holder} (another run on this --out); "
                  "waiting for it", file=sys.stderr, flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as err:
        raise RuntimeError(f"{path}: cannot lock ({err.strerror or err}): this filesystem does not "
                           "support flock(2) (e.g. Lustre without -o flock); use --out on one that "
                           "does") from err


@contextlib.contextmanager
def _part_lock(root: Root, part: str) -> Iterator[None]:
    """Hold `part` exclusively while it is checked, cleared and written.

    Two runs on one --out used to clear each other's parts (each part starts by removing its
    directory), even one the other had completed and merged. Under this lock a run re-checks the
    part and skips it when complete, so concurrent runs wait for each other part by part and end
    with the bytes of one run; nodes of one job hold disjoint parts and never wait.

    flock(2) on `parts/<part>.lock`: the kernel drops it when the holder dies, so a killed run
    never leaves a part locked. For a remote --out the lock file is local (`$TMPDIR/slimpack-
    locks/`): runs on one host exclude each other; runs on different hosts are not protected. The
    file is removed on release; a waiter then holds a removed file, notices, and locks afresh.
    """
    path = _lock_path(root, part)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock(fd, path, part)
            held = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        with contextlib.suppress(FileNotFoundError):
            now = os.stat(path)
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # before the unlock: a waiter never sees it as current
        os.close(fd)


def _run_part(item: InputFile, cfg: TokenizeConfig, root_url: str, staging: str | None) -> dict[str, Any]:
    """Produce one part (in a worker). Returns its stats; {'part', 'complete': True} when another
    run completed it first; {'part', 'error'} for a failed part."""
    root = Root(root_url)
    progress_queue = _worker.get("queue")
    sent = [0, 0, time.monotonic()]

    def on_progress(nbytes: int, ntokens: int) -> None:
        sent[0] += nbytes
        sent[1] += ntokens
        if progress_queue is not None and time.monotonic() - sent[2] > 0.2:
            progress_queue.put((sent[0], sent[1]))
            sent[0] = sent[1] = 0
            sent[2] = time.monotonic()

    name = part_dir_name(item.part)
    local = Path(tempfile.mkdtemp(dir=staging)) if root.remote else Path(root.join(name))
    try:
        with _part_lock(root, item.part):
            if root.remote:
                root.fs.invalidate_cache()  # listings cached before the wait are stale
            if _part_complete(root, item.part):  # another run finished it since this one planned
                return {"part": item.part, "complete": True}
            root.remove_tree(name)  # anything here is an incomplete earlier attempt
            try:
                stats = tokenize_part(item, cfg, _worker["tokenizer"], local, on_progress=on_progress)
                if root.remote:
                    for file in sorted(local.iterdir()):
                        root.upload(file, f"{name}/{file.name}")
                root.write_bytes(part_stats_name(item.part), dumps_json(stats))  # last: marks complete
                return stats
            except Exception:
                root.remove_tree(name)  # still under the lock: only this run's own attempt
                raise
    except Exception as err:
        # Any failure inside one part, a reader library's own exception included, fails that part
        # only: it is reported by name, the exit status is non-zero, and the other parts go on.
        return {"part": item.part, "error": f"{type(err).__name__}: {err}"}
    finally:
        if progress_queue is not None:
            progress_queue.put((sent[0], sent[1]))
        if root.remote:
            shutil.rmtree(local, ignore_errors=True)


# ----------------------------------------------------------------------------- the job


def node_from_env(node_rank: int | None, num_nodes: int | None) -> tuple[int, int]:
    """Flags win; else Slurm array, Slurm tasks, then torchrun-style RANK/WORLD_SIZE; else 0 of 1.

    A flag given alone is paired with the environment's other value; `--num-nodes N > 1` with
    no rank anywhere is refused (every node would take rank 0's parts and write the same parts).
    """
    env = os.environ
    pairs = [("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"), ("SLURM_PROCID", "SLURM_NTASKS"),
             ("RANK", "WORLD_SIZE")]
    env_rank, env_count = None, None
    for r, c in pairs:
        if r in env and c in env:
            env_rank, env_count = int(env[r]), int(env[c])
            break
    rank = node_rank if node_rank is not None else env_rank
    count = num_nodes if num_nodes is not None else env_count
    if rank is None and count is not None and count > 1:
        raise ValueError(f"--num-nodes {count} needs this node's rank: pass --node-rank (no Slurm or "
                         "RANK/WORLD_SIZE variables give one)")
    rank, count = rank or 0, count or 1
    if not 0 <= rank < count:
        raise ValueError(f"node rank {rank} is outside [0, {count}): check --node-rank/--num-nodes")
    return rank, count


@dataclass
class TokenizeReport:
    out: str
    node_rank: int
    num_nodes: int
    parts_total: int
    parts_assigned: int
    ignored_files: list[str] = field(default_factory=list)
    parts_done: list[str] = field(default_factory=list)
    parts_skipped_complete: list[str] = field(default_factory=list)
    parts_failed: dict[str, str] = field(default_factory=dict)
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    skipped_records: dict[str, int] = field(default_factory=dict)
    bad_examples: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    merged: bool = False
    merge_note: str = ""
    merge_error: str = ""  # the merge ran and could not write its files (a full disk)
    report_error: str = ""  # this report could not be written under reports/

    @property
    def ok(self) -> bool:
        return not self.parts_failed and not self.merge_error

    def summary(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        lines = [
            f"tokenize: node {self.node_rank}/{self.num_nodes}: {len(self.parts_done)} parts done, "
            f"{len(self.parts_skipped_complete)} already complete, {len(self.parts_failed)} failed "
            f"(of {self.parts_assigned} assigned, {self.parts_total} in all)",
            f"  {self.documents:,} documents, {self.tokens:,} tokens from {self.input_bytes:,} input "
            f"bytes in {self.seconds:.1f} s ({rate:,.0f} tokens/s)",
        ]
        if self.skipped_records:
            reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(self.skipped_records.items()))
            lines.append(f"  skipped records: {reasons}")
            lines += [f"    e.g. {e['file']}:{e['line']}: {e['reason']} ({e['detail']})"
                      for e in self.bad_examples[:5]]
        if self.ignored_files:
            lines.append(f"  ignored {len(self.ignored_files)} file(s) (not a supported input, or "
                         "outside train/validation/test): "
                         + ", ".join(Path(f).name for f in self.ignored_files[:3]))
        for part, err in sorted(self.parts_failed.items()):
            lines.append(f"  FAILED part {part}: {err}")
        if self.merge_error:
            lines.append(f"  merge FAILED: {self.merge_error}")
        else:
            lines.append(f"  merged: {self.out}" if self.merged else f"  not merged: {self.merge_note}")
        if self.report_error:
            lines.append(f"  report not written: {self.report_error}")
        return "\n".join(lines)


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
    from slimpack.tokenize.merge import MergeWriteError, merge_dataset

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
        if _part_complete(root, item.part):
            report.parts_skipped_complete.append(item.part)
        else:
            todo.append(item)
    # Largest first: the last part to finish is a small one, so workers finish together.
    sizes = {i.part: input_bytes(i) for i in todo}
    todo.sort(key=lambda i: (-sizes[i.part], i.part))
    total_bytes = sum(sizes.values())
    results = _run_parts(todo, cfg, root.url, workers, total_bytes, progress, staging_dir)
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


def _part_complete(root: Root, part: str) -> bool:
    """stats.json is in place and every shard its index.json lists is present at its full size.

    A shard deleted or cut short after the part completed makes the part incomplete, so a
    re-run redoes it instead of merging a dataset with a hole in it.
    """
    if not root.exists(part_stats_name(part)):
        return False
    try:
        index = json.loads(root.read_bytes(f"{part_dir_name(part)}/{schema.INDEX_FILENAME}"))
        sizes = {Path(e["name"]).name: e["size"]
                 for e in root.fs.ls(root.join(part_dir_name(part)), detail=True)}
        for shard in index["shards"]:
            stored = shard["zip_data"] or shard["raw_data"]
            if sizes.get(stored["basename"]) != stored["bytes"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _run_parts(todo: list[InputFile], cfg: TokenizeConfig, root_url: str, workers: int,
               total_bytes: int, progress: bool, staging: str | None) -> list[dict[str, Any]]:
    from tqdm import tqdm

    if not todo:
        return []
    ctx = mp.get_context("spawn")
    progress_queue = ctx.Queue()
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=not progress,
               dynamic_ncols=True)
    tokens = 0
    start = time.monotonic()

    def drain() -> None:
        nonlocal tokens
        while True:
            try:
                nbytes, ntokens = progress_queue.get_nowait()
            except queue.Empty:
                return
            tokens += ntokens
            bar.update(nbytes)
            bar.set_postfix_str(f"{tokens / max(time.monotonic() - start, 1e-9):,.0f} tok/s")

    results: list[dict[str, Any]] = []
    with ctx.Pool(max(1, min(workers, len(todo))), initializer=_init_worker,
                  initargs=(progress_queue,), maxtasksperchild=None) as pool:
        pending = [pool.apply_async(_run_part, (item, cfg, root_url, staging)) for item in todo]
        for job in pending:
            while not job.ready():
                job.wait(0.2)
                drain()
            results.append(job.get())
        # Let the workers exit on their own: leaving the block terminates them, which can drop
        # progress counts their queue's feeder thread has not flushed yet (the result pipe is faster).
        pool.close()
        pool.join()
    drain()
    bar.close()
    return results
