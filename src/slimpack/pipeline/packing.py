"""Packing and index arithmetic: pure functions over numpy arrays, no I/O.

Each epoch's token stream is the concatenation of its samples in epoch order; ``cum`` holds the
stream offset of each sample (``cum[k]`` = tokens before the k-th sample, ``cum[-1]`` = total).
Epoch-local sequence s covers stream tokens ``[s*L, s*L + L + 1)``: inputs are the first L,
labels the last L, so consecutive windows share one token. An epoch holds
``S = (stream_tokens - 1) // L`` sequences (its tail shorter than a window is dropped), and the
run's global sequences follow each other across epochs: global sequence g is sequence ``g % S``
of epoch ``g // S``. M consecutive sequences therefore cover one
contiguous slice of ``M*L + 1`` tokens, and a micro-batch is built from that slice alone:

    input_ids    = slice[:-1]                      (M*L,)
    labels       = slice[1:], -100 where the next token starts a document (a document's EOS
                   would predict the next BOS)
    cu_seqlens   = sorted union of document starts, window starts (multiples of L) and M*L
    position_ids = offset from the last cu_seqlens boundary (restart at every document and window)
    max_seqlen   = largest gap in cu_seqlens (a Python int: the GPU never syncs for it)

Nothing is padded. Every step is a handful of vectorised numpy calls over the slice; the only
Python loop is over the few samples a slice touches.

Step/rank rule: with G sequences per step, A micro-steps, W ranks and M sequences per
micro-batch (G = A*W*M), micro-step j of rank r in step t takes the M global sequences starting
at ``t*G + (r*A + j)*M``: each rank reads one contiguous block of ``A*M`` sequences per step,
and the ranks' blocks tile the step ``[t*G, (t+1)*G)`` whatever W is. A step (or micro-batch)
that straddles an epoch end takes the last sequences of one epoch and the first of the next;
``epoch_runs`` splits it and each run is packed from its own epoch's slice. Contiguous blocks (rather than
interleaving ranks per micro-step) mean a 65,536-token sample is read whole by one rank, so each
rank decodes a shard once for a whole sample instead of once per micro-batch.
"""

from __future__ import annotations

import numpy as np
import xxhash

IGNORE_INDEX = -100


def sequence_start(step: int, micro: int, rank: int, *, world_size: int,
                   micro_batch_size: int, sequences_per_step: int) -> int:
    """First global sequence of micro-step ``micro`` of ``rank`` in a step (see module doc)."""
    grad_accum = sequences_per_step // (world_size * micro_batch_size)
    return step * sequences_per_step + (rank * grad_accum + micro) * micro_batch_size


def epoch_runs(first: int, count: int, sequences_per_epoch: int) -> list[tuple[int, int, int]]:
    """Global sequences ``[first, first + count)`` as (epoch, first epoch-local sequence, count) runs."""
    runs = []
    while count > 0:
        epoch, local = divmod(first, sequences_per_epoch)
        n = min(count, sequences_per_epoch - local)
        runs.append((epoch, local, n))
        first += n
        count -= n
    return runs


def token_range(first_sequence: int, num_sequences: int, seq_len: int) -> tuple[int, int]:
    """Stream tokens ``[begin, end)`` that ``num_sequences`` sequences from ``first_sequence`` read."""
    return first_sequence * seq_len, (first_sequence + num_sequences) * seq_len + 1


def sequences_per_epoch(stream_tokens: int, seq_len: int) -> int:
    """Whole windows in a stream: sequence g needs tokens up to ``g*L + L`` inclusive."""
    return max(0, (stream_tokens - 1) // seq_len)


def touched(cum: np.ndarray, begin: int, end: int) -> tuple[int, int]:
    """Epoch positions ``[k0, k1)`` of the samples that stream tokens ``[begin, end)`` fall in."""
    k0 = int(np.searchsorted(cum, begin, side="right")) - 1
    k1 = int(np.searchsorted(cum, end - 1, side="right"))
    return k0, k1


def pack_slice(flat: np.ndarray, doc_starts: np.ndarray, seq_len: int) -> dict[str, np.ndarray | int]:
    """Build one flat micro-batch from ``M*L + 1`` stream tokens and the document starts among them.

    ``flat``: int64 tokens of the slice; ``doc_starts``: sorted int64 positions (within the slice)
    where a document begins. Returns numpy arrays (``input_ids``, ``labels``, ``position_ids``
    int64; ``cu_seqlens`` int32) and ``max_seqlen`` (int).
    """
    n = len(flat) - 1
    if n <= 0 or n % seq_len:
        raise ValueError(f"slice of {len(flat)} tokens is not M*{seq_len} + 1")
    input_ids = flat[:-1]
    labels = flat[1:].copy()
    # The label of position i is token i+1; it crosses a document when i+1 starts one.
    crossing = doc_starts[(doc_starts >= 1) & (doc_starts <= n)] - 1
    labels[crossing] = IGNORE_INDEX
    inner = doc_starts[(doc_starts > 0) & (doc_starts < n)]
    bounds = np.union1d(np.arange(0, n + 1, seq_len, dtype=np.int64), inner)
    lengths = np.diff(bounds)
    position_ids = np.arange(n, dtype=np.int64) - np.repeat(bounds[:-1], lengths)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "cu_seqlens": bounds.astype(np.int32), "max_seqlen": int(lengths.max())}


def concat_packed(parts: list[dict[str, np.ndarray | int]]) -> dict[str, np.ndarray | int]:
    """Join packed batches of consecutive sequences (cu_seqlens shifted, boundaries kept)."""
    if len(parts) == 1:
        return parts[0]
    offsets = np.cumsum([0] + [len(p["input_ids"]) for p in parts[:-1]])
    cu = [np.zeros(1, np.int64)] + [p["cu_seqlens"][1:].astype(np.int64) + int(o)
                                    for p, o in zip(parts, offsets, strict=True)]
    out: dict[str, np.ndarray | int] = {
        k: np.concatenate([p[k] for p in parts]) for k in ("input_ids", "labels", "position_ids")}
    out["cu_seqlens"] = np.concatenate(cu).astype(np.int32)
    out["max_seqlen"] = max(int(p["max_seqlen"]) for p in parts)
    return out


def digest_arrays(input_ids: np.ndarray, labels: np.ndarray, position_ids: np.ndarray) -> str:
    """xxh3_64 over the int64 bytes of inputs, labels and positions (these determine cu_seqlens)."""
    h = xxhash.xxh3_64()
    for a in (input_ids, labels, position_ids):
        h.update(np.ascontiguousarray(a, np.int64).tobytes())
    return h.hexdigest()
