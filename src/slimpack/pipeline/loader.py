"""The packed streaming loader: deterministic, elastic, resumable batches for one rank.

    from slimpack.pipeline import LoaderConfig, PackedLoader
    loader = PackedLoader(LoaderConfig(path, seq_len=2048, global_batch_tokens=4_194_304,
                                       micro_batch_size=8, rank=rank, world_size=world))
    for micro_batches in loader:          # one optimiser step: `loader.grad_accum` micro-batches
        for mb in micro_batches: ...      # input_ids/labels/position_ids (M*L,) int64,
                                          # cu_seqlens (k+1,) int32, max_seqlen int; pinned CPU
    state = loader.state_dict()           # resume: PackedLoader(cfg).load_state_dict(state)

Batches are torch tensors (pinned when CUDA is present). Without torch (the core install, `pip
install slimpack`) they are numpy arrays with the same keys, dtypes and values, and
``num_workers`` must be 0: worker processes are torch's DataLoader.

What each step holds is a pure function of (dataset fingerprint, split, seed, seq_len,
global_batch_tokens, locality_shards): step t reads global sequences ``[t*G, (t+1)*G)``, and
global sequence g is window ``g % S`` of epoch ``g // S``'s stream, S windows per epoch (see
``packing`` for the windows and the rank rule, ``order`` for the permutation). So resume is
arithmetic (no replay), and the tokens of a step do not depend on ``num_workers`` or, with the
global batch fixed, on ``world_size``/``micro_batch_size``: a run may resume on a different
number of GPUs. Each epoch drops only the tail of its stream shorter than a window
(``epoch_report()`` counts it); the next epoch starts a fresh permutation, and a step may hold
the end of one epoch and the start of the next.

Workers: with ``num_workers > 0`` a ``torch.utils.data.DataLoader`` builds micro-batches by index
(a map-style dataset over ``step * grad_accum + micro``, ``prefetch_factor`` ahead per worker);
each worker keeps its own decoded-shard LRU (``decoded_cache_bytes``) and hands back one numpy
buffer per micro-batch (pickled: nothing in /dev/shm). In every mode a feeder thread keeps
``_READY_STEPS`` steps built and pinned (when CUDA is present) ahead of the training loop.
Remote roots: the feeder also downloads the shards of the next ``prefetch_steps`` steps into
``cache_dir`` and evicts behind itself (see ``store``).
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from slimpack.extras import require
from slimpack.pipeline import packing
from slimpack.pipeline.index import DatasetIndex, load_index
from slimpack.pipeline.order import ORDER_VERSION, epoch_order
from slimpack.pipeline.store import ShardStore
from slimpack.storage import RetryPolicy

try:
    import torch
except ModuleNotFoundError:  # the core install: numpy batches (see the module docstring)
    torch = None

# Bumped whenever the order (order.ORDER_VERSION), the windows or the rank rule change: old state
# then refuses to load.
LOADER_VERSION = ORDER_VERSION
_READY_STEPS = 2  # steps built and pinned ahead of the training loop

MicroBatch = dict[str, Any]


def _nearby_multiples(value: int, unit: int) -> list[int]:
    low = value // unit * unit
    return [m for m in (low, low + unit) if m > 0]


def check_layout(*, seq_len: int, global_batch_tokens: int, micro_batch_size: int,
                 world_size: int) -> int:
    """Gradient accumulation steps for a layout, or ValueError proposing valid values."""
    for name, v in (("seq_len", seq_len), ("global_batch_tokens", global_batch_tokens),
                    ("micro_batch_size", micro_batch_size), ("world_size", world_size)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if global_batch_tokens % seq_len:
        raise ValueError(
            f"global_batch_tokens {global_batch_tokens:,} is not a multiple of seq_len {seq_len}; "
            f"use one of {_nearby_multiples(global_batch_tokens, seq_len)}")
    sequences = global_batch_tokens // seq_len
    per_micro = world_size * micro_batch_size
    if sequences % per_micro:
        divisors = [m for m in range(1, sequences // world_size + 1)
                    if sequences % (world_size * m) == 0] if sequences % world_size == 0 else []
        hint = (f"micro_batch_size in {divisors[-6:]} for world_size {world_size}, or "
                if divisors else "")
        raise ValueError(
            f"global_batch_tokens {global_batch_tokens:,} / seq_len {seq_len} = {sequences} sequences "
            f"per step does not divide into world_size {world_size} x micro_batch_size "
            f"{micro_batch_size} = {per_micro} per micro-step; use {hint}global_batch_tokens in "
            f"{_nearby_multiples(global_batch_tokens, per_micro * seq_len)}")
    return sequences // per_micro


@dataclass(frozen=True)
class LoaderConfig:
    """One rank's loader. Units: tokens, sequences (``micro_batch_size`` per rank per micro-step)."""

    path: str
    seq_len: int
    global_batch_tokens: int
    micro_batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    num_workers: int = 0
    split: str = "train"
    epochs: int | None = None  # None: no limit from epochs
    max_tokens: int | None = None  # stop after this many global tokens (whole steps)
    cache_dir: str | None = None  # local shard cache for remote roots (default ~/.cache/slimpack)
    cache_limit_bytes: int = 64 << 30
    locality_shards: int | None = None  # bound on shards in use at once (see order.py)
    prefetch_factor: int = 4  # micro-batches each DataLoader worker builds ahead
    prefetch_steps: int = 2  # steps of shards the loader downloads ahead (remote roots)
    decoded_cache_bytes: int = 1 << 30  # decoded (or memory-mapped) shards kept per process
    # Remote roots: each read is tried fetch_attempts times, waiting up to 0.5 s, 1 s, 2 s... (full
    # jitter, each wait at most fetch_backoff_max_s) in between, an attempt giving up on a silent
    # server after fetch_timeout_s; once one read has used its tries, or the store has failed for
    # the policy's span, every read of it fails naming the URL (storage.RetryPolicy, with_retries).
    fetch_attempts: int = 10
    fetch_backoff_max_s: float = 30.0
    fetch_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        check_layout(seq_len=self.seq_len, global_batch_tokens=self.global_batch_tokens,
                     micro_batch_size=self.micro_batch_size, world_size=self.world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, world_size={self.world_size})")
        if self.num_workers < 0 or self.prefetch_factor < 1 or self.prefetch_steps < 0:
            raise ValueError("num_workers must be >= 0, prefetch_factor >= 1, prefetch_steps >= 0")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None, got {self.epochs}")
        if self.max_tokens is not None and self.max_tokens < self.global_batch_tokens:
            raise ValueError(f"max_tokens {self.max_tokens:,} is less than one step "
                             f"({self.global_batch_tokens:,} tokens)")
        if self.locality_shards is not None and self.locality_shards < 1:
            raise ValueError(f"locality_shards must be >= 1 or None, got {self.locality_shards}")
        if self.fetch_attempts < 1 or self.fetch_backoff_max_s < 0 or self.fetch_timeout_s <= 0:
            raise ValueError(f"fetch_attempts must be >= 1, fetch_backoff_max_s >= 0 and fetch_timeout_s "
                             f"> 0, got {self.fetch_attempts}, {self.fetch_backoff_max_s} and "
                             f"{self.fetch_timeout_s}")

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(attempts=self.fetch_attempts, backoff_max_s=self.fetch_backoff_max_s,
                           timeout_s=self.fetch_timeout_s)

    @property
    def sequences_per_step(self) -> int:
        return self.global_batch_tokens // self.seq_len

    @property
    def grad_accum(self) -> int:
        return check_layout(seq_len=self.seq_len, global_batch_tokens=self.global_batch_tokens,
                            micro_batch_size=self.micro_batch_size, world_size=self.world_size)


def loader_fingerprint(dataset_fingerprint: str, split: str) -> str:
    """What data a loader streams: the dataset's fingerprint and the split."""
    return hashlib.sha256(f"{dataset_fingerprint}\n{split}".encode()).hexdigest()


class PackedStream:
    """The pure part of a loader: index arithmetic plus shard reads, for any rank and step.

    Picklable (DataLoader workers get a copy); each process opens its own ShardStore lazily.
    """

    def __init__(self, cfg: LoaderConfig, index: DatasetIndex) -> None:
        self.cfg = cfg
        self.index = index
        self.fingerprint = loader_fingerprint(index.fingerprint, cfg.split)
        self.samples = index.split_samples(cfg.split)
        self._contiguous = bool(len(self.samples)) and \
            int(self.samples[-1]) - int(self.samples[0]) + 1 == len(self.samples)
        self.stream_tokens = int(index.sample_tokens[self.samples].sum(dtype=np.int64))
        self.sequences_per_step = cfg.sequences_per_step
        self.sequences_per_epoch = packing.sequences_per_epoch(self.stream_tokens, cfg.seq_len)
        self.steps_per_epoch = self.sequences_per_epoch // self.sequences_per_step  # whole steps
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{index.url}: split {cfg.split!r} holds {self.stream_tokens:,} tokens, less than one "
                f"step of global_batch_tokens {cfg.global_batch_tokens:,} (+1); lower "
                "global_batch_tokens or use a larger split")
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._store: ShardStore | None = None
        self._store_pid = -1
        # The feeder thread builds steps while the caller may ask for digests or validation
        # batches: one lock around the epoch plan and the shard LRU.
        self._lock = threading.RLock()

    def epoch_of(self, step: int) -> int:
        """The epoch of a step's first sequence."""
        return step * self.sequences_per_step // self.sequences_per_epoch

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_plans"] = {}
        state["_store"] = None
        state["_store_pid"] = -1
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    @property
    def store(self) -> ShardStore:
        if self._store is None or self._store_pid != os.getpid():
            cfg = self.cfg
            cache_dir = cfg.cache_dir
            if cache_dir is None and self.index.url.count("://"):
                cache_dir = os.path.join(os.path.expanduser("~/.cache/slimpack"), self.index.fingerprint[:16])
            self._store = ShardStore(self.index, cache_dir=cache_dir,
                                     cache_limit_bytes=cfg.cache_limit_bytes,
                                     decoded_cache_bytes=cfg.decoded_cache_bytes, retry=cfg.retry)
            self._store_pid = os.getpid()
        return self._store

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(global sample ids in stream order, stream offsets ``cum`` of length n+1) of an epoch.

        The two most recent epochs are kept: near an epoch boundary the shard prefetch looks into
        the next epoch while batches are still built from the current one.
        """
        plan = self._plans.get(epoch)
        if plan is None:
            if len(self._plans) >= 2:  # free the oldest first: peak memory at scale
                del self._plans[min(self._plans)]
            shards = (self.index.shard_of(self.samples) if self.cfg.locality_shards else None)
            order = epoch_order(len(self.samples), seed=self.cfg.seed, epoch=epoch,
                                fingerprint=self.fingerprint, sample_shards=shards,
                                locality_shards=self.cfg.locality_shards)
            if self._contiguous:  # the usual case (parts sorted by split): no random gather
                ids = np.empty(len(order), self.samples.dtype)
                np.add(order, int(self.samples[0]), out=ids, casting="unsafe")
            else:
                ids = self.samples[order]
            del order
            cum = np.zeros(len(ids) + 1, np.int64)
            np.cumsum(self.index.sample_tokens[ids], dtype=np.int64, out=cum[1:])
            plan = self._plans[epoch] = (ids, cum)
        return plan

    def read(self, epoch: int, begin: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Stream tokens ``[begin, end)`` of an epoch (int64) and the document starts among them."""
        with self._lock:
            return self._read(epoch, begin, end)

    def _read(self, epoch: int, begin: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        ids, cum = self.epoch_plan(epoch)
        k0, k1 = packing.touched(cum, begin, end)
        flat = np.empty(end - begin, np.int64)
        starts = []
        store = self.store
        for k in range(k0, k1):
            tokens, cu = store.sample(int(ids[k]))
            off = int(cum[k])
            lo, hi = max(begin - off, 0), min(end - off, len(tokens))
            flat[off + lo - begin:off + hi - begin] = tokens[lo:hi]
            docs = cu[np.searchsorted(cu, lo):np.searchsorted(cu, hi)]
            starts.append(docs.astype(np.int64) + (off - begin))
        return flat, np.concatenate(starts)

    def sequences(self, first: int, count: int) -> dict[str, Any]:
        """Packed numpy batch of ``count`` global sequences from ``first`` (across epochs if need be)."""
        parts = []
        for epoch, local, n in packing.epoch_runs(first, count, self.sequences_per_epoch):
            begin, end = packing.token_range(local, n, self.cfg.seq_len)
            flat, starts = self.read(epoch, begin, end)
            parts.append(packing.pack_slice(flat, starts, self.cfg.seq_len))
        return packing.concat_packed(parts)

    def first_sequence(self, step: int, micro: int, rank: int, micro_batch_size: int,
                       world_size: int) -> int:
        return packing.sequence_start(step, micro, rank, world_size=world_size,
                                      micro_batch_size=micro_batch_size,
                                      sequences_per_step=self.sequences_per_step)

    def micro_batch(self, step: int, micro: int) -> dict[str, Any]:
        """This rank's micro-batch ``micro`` of optimiser step ``step`` (numpy arrays)."""
        cfg = self.cfg
        first = self.first_sequence(step, micro, cfg.rank, cfg.micro_batch_size, cfg.world_size)
        return self.sequences(first, cfg.micro_batch_size)

    def global_step(self, step: int) -> dict[str, Any]:
        """The whole step, every rank's sequences in order, as one packed batch (numpy)."""
        return self.sequences(step * self.sequences_per_step, self.sequences_per_step)

    def shards_for(self, step: int) -> np.ndarray:
        """Shard ids this rank reads in a step (sorted, unique), without reading anything."""
        cfg = self.cfg
        found = []
        for j in range(cfg.grad_accum):
            first = self.first_sequence(step, j, cfg.rank, cfg.micro_batch_size, cfg.world_size)
            for epoch, local, n in packing.epoch_runs(first, cfg.micro_batch_size, self.sequences_per_epoch):
                with self._lock:
                    ids, cum = self.epoch_plan(epoch)
                k0, k1 = packing.touched(cum, *packing.token_range(local, n, cfg.seq_len))
                found.append(ids[k0:k1])
        return np.unique(self.index.shard_of(np.concatenate(found)))


Transport = tuple[np.ndarray, int, int, int]


def pack_transport(batch: dict[str, Any]) -> Transport:
    """One int64 buffer per micro-batch: inputs | labels | positions | cu_seqlens (as int32 pairs).

    Workers return it as a numpy array, which travels pickled inside the result message: no
    shared-memory segment, no file descriptor. Torch tensors would travel as shared-memory file
    descriptors fetched with a round trip to the worker process each, which measured 3-4 ms of
    data wait per micro-batch on a busy 2-core machine; the pickled copy is ~0.1 ms per 400 KB.
    The parent wraps it (``torch.from_numpy``) and pins it once.
    """
    n, cu = len(batch["input_ids"]), batch["cu_seqlens"]
    buf = np.empty(3 * n + (len(cu) + 1) // 2, np.int64)
    buf[:n] = batch["input_ids"]
    buf[n:2 * n] = batch["labels"]
    buf[2 * n:3 * n] = batch["position_ids"]
    buf[3 * n:].view(np.int32)[:len(cu)] = cu
    return buf, n, len(cu), batch["max_seqlen"]


def unpack_transport(item: Transport, *, pin: bool = False) -> MicroBatch:
    """The micro-batch dict: views into the one (pinned) buffer; tensors, or numpy without torch."""
    array, n, k, max_seqlen = item
    if torch is None:
        buf, int32 = array, np.int32
    else:
        buf, int32 = torch.from_numpy(array), torch.int32
        if pin:
            buf = buf.pin_memory()
    return {"input_ids": buf[:n], "labels": buf[n:2 * n], "position_ids": buf[2 * n:3 * n],
            "cu_seqlens": buf[3 * n:].view(int32)[:k], "max_seqlen": max_seqlen}


def _tensors(batch: dict[str, Any], pin: bool = False) -> MicroBatch:
    return unpack_transport(pack_transport(batch), pin=pin)


def _init_worker(worker_id: int) -> None:
    """A forked worker may inherit the stream's lock held by the parent's feeder thread: renew it."""
    del worker_id
    info = torch.utils.data.get_worker_info()
    info.dataset.stream._lock = threading.RLock()


def _as_is(item: Transport) -> Transport:
    """collate_fn: keep the worker's numpy buffer (the default would turn it into a shared tensor)."""
    return item


def step_digest(micro_batches_by_rank: list[list[MicroBatch]]) -> str:
    """Digest of one step from every rank's micro-batches, put back in global sequence order.

    ``micro_batches_by_rank[r][j]`` is rank r's micro-step j; the rank rule places it at sequence
    block ``r * grad_accum + j``, so the concatenation in (r, j) order is the step's sequences
    ``[t*G, (t+1)*G)`` and the digest equals ``PackedLoader.step_digest``.
    """
    world_size = len(micro_batches_by_rank)
    grad_accum = len(micro_batches_by_rank[0])
    ordered = [micro_batches_by_rank[r][j] for r in range(world_size) for j in range(grad_accum)]
    cat = {k: np.concatenate([np.asarray(mb[k]) for mb in ordered])
           for k in ("input_ids", "labels", "position_ids")}
    return packing.digest_arrays(cat["input_ids"], cat["labels"], cat["position_ids"])


@dataclass(frozen=True)
class _WorkerError:
    """A data error (bad shard, unreachable store...) met in a DataLoader worker, for the parent."""

    error: BaseException


class _MicroBatchDataset:
    """Map-style (DataLoader needs only ``__getitem__``): index ``step * grad_accum + micro`` -> that
    micro-batch of this rank."""

    def __init__(self, stream: PackedStream) -> None:
        self.stream = stream
        self.grad_accum = stream.cfg.grad_accum

    def __getitem__(self, i: int) -> Transport | _WorkerError:
        step, micro = divmod(i, self.grad_accum)
        try:
            return pack_transport(self.stream.micro_batch(step, micro))
        except (OSError, ValueError, RuntimeError) as err:
            # Raised here, torch would re-raise it in the parent with the worker's traceback inside
            # the message; handed back as a value, the parent raises it as it was: one line.
            return _WorkerError(err)


class _IndexRange:
    """Sampler: indices ``[begin, end)``, or from ``begin`` on forever when ``end`` is None."""

    def __init__(self, begin: int, end: int | None) -> None:
        self.begin, self.end = begin, end

    def __iter__(self) -> Iterator[int]:
        i = self.begin
        while self.end is None or i < self.end:
            yield i
            i += 1

    def __len__(self) -> int:
        if self.end is None:
            raise TypeError("unbounded loader (no epochs or max_tokens)")
        return self.end - self.begin


class _Feeder(threading.Thread):
    """Runs ``build(step)`` for consecutive steps ahead of the consumer, into a bounded queue."""

    def __init__(self, build: Any, start: int, end: int | None) -> None:
        super().__init__(name="slimpack-loader-feeder", daemon=True)
        self.build, self.start_step, self.end = build, start, end
        self.queue: queue.Queue = queue.Queue(_READY_STEPS)
        self.halt = threading.Event()

    def run(self) -> None:
        step = self.start_step
        try:
            while (self.end is None or step < self.end) and not self.halt.is_set():
                self._put(("step", self.build(step)))
                step += 1
            self._put(("end", None))
        except BaseException as err:  # handed to the consumer, raised there
            self._put(("error", err))

    def _put(self, item: tuple[str, Any]) -> None:
        while not self.halt.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self) -> tuple[str, Any]:
        return self.queue.get()

    def stop(self) -> None:
        self.halt.set()
        self.join()


class PackedLoader:
    """Iterate optimiser steps of one rank: each a list of ``grad_accum`` micro-batch dicts."""

    def __init__(self, cfg: LoaderConfig, *, index: DatasetIndex | None = None) -> None:
        self.cfg = cfg
        self.index = index if index is not None else load_index(cfg.path, retry=cfg.retry)
        self.stream = PackedStream(cfg, self.index)
        self.grad_accum = cfg.grad_accum
        self.steps_per_epoch = self.stream.steps_per_epoch
        self.fingerprint = self.stream.fingerprint
        self.step = 0  # the next step to yield (global, across epochs)
        limits = []
        if cfg.epochs is not None:  # whole steps within `epochs` epochs
            limits.append(cfg.epochs * self.stream.sequences_per_epoch // self.stream.sequences_per_step)
        if cfg.max_tokens is not None:
            limits.append(cfg.max_tokens // cfg.global_batch_tokens)
        self.total_steps: int | None = min(limits) if limits else None
        self._pin = torch is not None and torch.cuda.is_available()
        if cfg.num_workers > 0:
            require("torch")  # worker processes are torch's DataLoader
        self._last_need: dict[int, int] = {}

    # ------------------------------------------------------------------ sizes

    @property
    def epoch(self) -> int:
        """The epoch of the next step's first sequence."""
        return self.stream.epoch_of(self.step)

    def __len__(self) -> int:
        """Steps left to yield (TypeError when neither epochs nor max_tokens bounds the run)."""
        if self.total_steps is None:
            raise TypeError("unbounded loader: set epochs or max_tokens to give it a length")
        return max(0, self.total_steps - self.step)

    def epoch_report(self) -> dict[str, int]:
        """Per-epoch token accounting: what a full epoch uses and the tail it drops."""
        used = self.stream.sequences_per_epoch * self.cfg.seq_len
        return {"stream_tokens": self.stream.stream_tokens, "samples": len(self.stream.samples),
                "sequences_per_epoch": self.stream.sequences_per_epoch,
                "steps_per_epoch": self.steps_per_epoch, "tokens_per_epoch": used,
                # never an input: the tail shorter than a window (its first token is still a label)
                "dropped_tokens_per_epoch": self.stream.stream_tokens - used}

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"version": LOADER_VERSION, "epoch": self.epoch, "step": self.step, "seed": cfg.seed,
                "seq_len": cfg.seq_len, "global_batch_tokens": cfg.global_batch_tokens,
                "fingerprint": self.fingerprint, "split": cfg.split,
                "locality_shards": cfg.locality_shards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state['step']`` by arithmetic; refuses state from other data or layouts."""
        mine = self.state_dict()
        missing = sorted({"version", "step", "seed", "seq_len", "global_batch_tokens", "fingerprint"}
                         - set(state))
        if missing:
            raise ValueError(f"loader state lacks {missing}: not a PackedLoader.state_dict()")
        if state["version"] != LOADER_VERSION:
            raise ValueError(f"loader state has version {state['version']}, this slimpack writes "
                             f"{LOADER_VERSION}: the order or packing rules changed; resume with the "
                             "slimpack version that wrote the checkpoint")
        if state["fingerprint"] != mine["fingerprint"]:
            raise ValueError(
                f"loader state was saved for different data (fingerprint {state['fingerprint'][:16]}..., "
                f"split {state.get('split')!r}); this loader streams {self.cfg.path} split "
                f"{self.cfg.split!r} (fingerprint {mine['fingerprint'][:16]}...): point at the same "
                "dataset and split")
        for key in ("split", "seed", "seq_len", "global_batch_tokens", "locality_shards"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has "
                                 f"{key}={mine[key]!r}: the data order would differ; set {key} to "
                                 f"{state[key]!r} to resume (world_size, micro_batch_size and "
                                 "num_workers may change)")
        step = int(state["step"])
        if step < 0 or ("epoch" in state and state["epoch"] != self.stream.epoch_of(step)):
            raise ValueError(f"loader state is inconsistent: step {step} starts in epoch "
                             f"{self.stream.epoch_of(max(step, 0))}, state says {state.get('epoch')}")
        self.step = step

    # ------------------------------------------------------------------ batches

    def micro_batches(self, step: int) -> list[MicroBatch]:
        """This rank's micro-batches of a step (no state change)."""
        return [_tensors(self.stream.micro_batch(step, j)) for j in range(self.grad_accum)]

    def first_micro_batches(self, count: int) -> list[MicroBatch]:
        """The first ``count`` micro-batches of this rank from step 0 (e.g. a fixed validation set).

        Fewer when the run (or, unbounded, one epoch) holds fewer; every rank gets distinct
        sequences, so a validation loss is the all-reduced mean over ranks.
        """
        total = self.total_steps if self.total_steps is not None else self.steps_per_epoch
        total = max(total, 1)
        if count > total * self.grad_accum:
            count = total * self.grad_accum
        return [_tensors(self.stream.micro_batch(*divmod(i, self.grad_accum))) for i in range(count)]

    def step_digest(self, step: int) -> str:
        """xxh3_64 over a step's global tokens, labels and positions: independent of ranks/workers."""
        b = self.stream.global_step(step)
        return packing.digest_arrays(b["input_ids"], b["labels"], b["position_ids"])

    def _prefetch(self, step: int) -> None:
        """Remote roots: download the next steps' shards, pin them, evict what is behind us."""
        store = self.stream.store
        if not store.remote:
            return
        ahead = self.cfg.prefetch_steps + math.ceil(
            self.cfg.num_workers * self.cfg.prefetch_factor / self.grad_accum)
        end = step + ahead + 1 if self.total_steps is None else min(step + ahead + 1, self.total_steps)
        pinned: list[int] = []
        for s in range(step, end):
            for i in self.stream.shards_for(s).tolist():
                self._last_need[i] = max(self._last_need.get(i, -1), s)
                pinned.append(i)
        store.prefetch(list(dict.fromkeys(pinned)))
        order = sorted(self._last_need, key=self._last_need.__getitem__)
        store.evict(set(pinned), order)
        for i in [i for i in order if self._last_need[i] < step]:
            del self._last_need[i]

    def __iter__(self) -> Iterator[list[MicroBatch]]:
        """Steps from ``self.step`` on. A feeder thread builds (or, with workers, receives), pins
        and queues the next ``_READY_STEPS`` steps, so the training loop only takes a ready step
        from a queue; ``self.step`` advances as steps are handed out."""
        start, end, grad_accum = self.step, self.total_steps, self.grad_accum
        it = None
        if self.cfg.num_workers > 0:
            loader = require("torch.utils.data").DataLoader(
                _MicroBatchDataset(self.stream), batch_size=None,
                sampler=_IndexRange(start * grad_accum, None if end is None else end * grad_accum),
                num_workers=self.cfg.num_workers, collate_fn=_as_is, worker_init_fn=_init_worker,
                pin_memory=False,
                prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False)
            it = iter(loader)  # forks the workers here, before the feeder thread exists

        def build(step: int) -> list[MicroBatch]:
            self._prefetch(step)
            if it is None:
                return [_tensors(self.stream.micro_batch(step, j), pin=self._pin) for j in range(grad_accum)]
            batches = []
            for _ in range(grad_accum):
                item = next(it)
                if isinstance(item, _WorkerError):
                    raise item.error
                batches.append(unpack_transport(item, pin=self._pin))
            return batches

        feeder = _Feeder(build, start, end)
        feeder.start()
        try:
            while True:
                kind, item = feeder.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise item
                self.step += 1
                yield item
        finally:
            feeder.stop()
            it = None  # the last reference: the DataLoader iterator shuts its workers down

    def close(self) -> None:
        """Stop background downloads (remote roots)."""
        if self.stream._store is not None:
            self.stream._store.close()
