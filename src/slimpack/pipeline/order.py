"""Epoch order: a versioned permutation of samples that is a pure function of (seed, epoch, fingerprint).

Algorithm (version 1): a 64-bit epoch key is the first 8 bytes of
``sha256("slimpack-order-v1:{seed}:{epoch}:{fingerprint}")``; sample i gets the sort key
``splitmix64(epoch_key + (i + 1) * 0x9E3779B97F4A7C15)`` and the epoch order is the samples sorted
by key. splitmix64's finaliser is a bijection of uint64 and i -> key_base + (i + 1) * odd is one
too, so keys are distinct, the sort has no ties and any sort algorithm gives the same order.
Everything is integer arithmetic on uint64 (wrapping), so the order is identical across numpy
versions, platforms and machines; numpy's RNG streams are never used.

Locality mode (``locality_shards=K``) trades randomness for fewer shards in use at once, for
remote storage: shards are ordered by their own splitmix64 key, cut into windows of K shards, and
samples are shuffled only within a window. At most K shards (2K across a window boundary) are
read at any time, and each is read in one pass.

Cost at SlimPajama scale (9.6M samples): hashing ~0.1 s, argsort ~0.5 s on one core.
"""

from __future__ import annotations

import hashlib

import numpy as np

ORDER_VERSION = 1

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX = ((np.uint64(30), np.uint64(0xBF58476D1CE4E5B9)), (np.uint64(27), np.uint64(0x94D049BB133111EB)))


def epoch_key(seed: int, epoch: int, fingerprint: str, salt: str = "") -> int:
    """The 64-bit key of one epoch's order (sha256 of the inputs, so any seed or fingerprint works)."""
    text = f"slimpack-order-v{ORDER_VERSION}:{salt}:{seed}:{epoch}:{fingerprint}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little")


def splitmix64(key: int, n: int) -> np.ndarray:
    """``splitmix64(key + (i + 1) * gamma)`` for i in [0, n): n distinct pseudo-random uint64 values."""
    z = np.arange(1, n + 1, dtype=np.uint64)
    z *= _GAMMA
    z += np.uint64(key)
    tmp = np.empty_like(z)
    for shift, mult in _MIX:
        np.right_shift(z, shift, out=tmp)
        z ^= tmp
        z *= mult
    np.right_shift(z, np.uint64(31), out=tmp)
    z ^= tmp
    return z


def epoch_order(num_samples: int, *, seed: int, epoch: int, fingerprint: str,
                sample_shards: np.ndarray | None = None, locality_shards: int | None = None) -> np.ndarray:
    """Positions [0, num_samples) in epoch order (int64).

    ``sample_shards`` (shard id of each sample, non-decreasing) is needed for locality mode only.
    """
    if num_samples == 0:
        return np.zeros(0, np.int64)
    keys = splitmix64(epoch_key(seed, epoch, fingerprint), num_samples)
    if not locality_shards:
        return np.argsort(keys).astype(np.int64, copy=False)
    if sample_shards is None or len(sample_shards) != num_samples:
        raise ValueError("locality mode needs the shard id of every sample")
    if locality_shards < 1:
        raise ValueError(f"locality_shards must be >= 1 (or None for a full shuffle), got {locality_shards}")
    shards, first = np.unique(sample_shards, return_inverse=True)
    shard_keys = splitmix64(epoch_key(seed, epoch, fingerprint, salt="shards"), len(shards))
    shard_rank = np.empty(len(shards), np.int64)
    shard_rank[np.argsort(shard_keys)] = np.arange(len(shards))
    window = shard_rank[first] // locality_shards
    # lexsort: last key is primary. Sample keys are distinct, so there are no ties.
    return np.lexsort((keys, window)).astype(np.int64, copy=False)
