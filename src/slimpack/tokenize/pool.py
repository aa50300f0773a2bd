"""A node's worker processes: each tokenizes whole parts under the part's lock, and sends its
progress to the parent, which shows one bar for the node."""

from __future__ import annotations

import multiprocessing as mp
import queue
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from slimpack.storage import Root
from slimpack.tokenize.config import TokenizeConfig
from slimpack.tokenize.layout import dumps_json, part_complete, part_dir_name, part_stats_name
from slimpack.tokenize.lock import part_lock
from slimpack.tokenize.part import tokenize_part
from slimpack.tokenize.readers import InputFile
from slimpack.tokenize.tokenizer import Llama3Tokenizer

_worker: dict[str, Any] = {}


def _init_worker(progress_queue: Any) -> None:
    _worker["tokenizer"] = Llama3Tokenizer()
    _worker["queue"] = progress_queue


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
        with part_lock(root, item.part):
            if root.remote:
                root.fs.invalidate_cache()  # listings cached before the wait are stale
            if part_complete(root, item.part):  # another run finished it since this one planned
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


def run_parts(todo: list[InputFile], cfg: TokenizeConfig, root_url: str, workers: int,
               total_bytes: int, progress: bool, staging: str | None) -> list[dict[str, Any]]:
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
