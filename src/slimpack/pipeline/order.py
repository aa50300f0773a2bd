"""Epoch order: a versioned permutation of samples that is a pure function of (seed, epoch, fingerprint).

Algorithm (version 1). The epoch key is the first 8 bytes (little-endian) of
``sha256("slimpack-order-v1::{seed}:{epoch}:{fingerprint}")``. Sample i gets the 64-bit hash
``h_i = splitmix64(epoch_key + (i + 1) * 0x9E3779B97F4A7C15)`` (Vigna's splitmix64 stream). With
``b = bit_length(n - 1)`` index bits, the sort key is ``(h_i >> b) << b | i``: the top ``64 - b``
bits of the hash, ties broken by the index. Keys are distinct, so the sorted order is unique
(any sort algorithm agrees) and the epoch order is ``key & (2**b - 1)`` after sorting.
Everything is wrapping uint64 arithmetic, identical across numpy versions and machines; numpy's
RNG streams are never used. Packing the index into the key lets numpy sort values (SIMD sort,
~0.1 s for 9.6M samples) instead of argsorting them (~1 s); keys are built in cache-sized chunks.

Locality mode (``locality_shards=K``) trades randomness for fewer shards in use at once, for
remote storage: shards are put in order by this same function (fingerprint + ":shards"), cut
into windows of K shards, and samples are shuffled only within their window: the key becomes
``window << (64 - w) | (h_i >> (w + b)) << b | i`` with w window bits. At most K shards (2K
across a window boundary) are read at any time, and each is read in one pass.
"""

from __future__ import annotations

import hashlib

import numpy as np

ORDER_VERSION = 1

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX = ((np.uint64(30), np.uint64(0xBF58476D1CE4E5B9)), (np.uint64(27), np.uint64(0x94D049BB133111EB)))
_MIN_HASH_BITS = 16  # below this the shuffle within a window would be too coarse


def epoch_key(seed: int, epoch: int, fingerprint: str, salt: str = "") -> int:
    """The 64-bit key of one epoch's order (sha256 of the inputs, so any seed or fingerprint works)."""
    text = f"slimpack-order-v{ORDER_VERSION}:{salt}:{seed}:{epoch}:{fingerprint}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little")


def _mix(z: np.ndarray, tmp: np.ndarray) -> None:
    """splitmix64's finaliser, in place (``tmp``: scratch of the same size)."""
    for shift, mult in _MIX:
        np.right_shift(z, shift, out=tmp)
        z ^= tmp
        z *= mult
    np.right_shift(z, np.uint64(31), out=tmp)
    z ^= tmp


def splitmix64(key: int, n: int, *, chunk: int = 1 << 15) -> np.ndarray:
    """``splitmix64(key + (i + 1) * gamma)`` for i in [0, n): n distinct pseudo-random uint64 values."""
    out = np.empty(n, np.uint64)
    tmp = np.empty(min(chunk, n), np.uint64)
    for begin in range(0, n, chunk):
        end = min(begin + chunk, n)
        z = out[begin:end]
        z[:] = np.arange(begin + 1, end + 1, dtype=np.uint64)
        z *= _GAMMA
        z += np.uint64(key)
        _mix(z, tmp[:end - begin])
    return out


def _sort_keys(key: int, n: int, index_bits: int, window: np.ndarray | None, window_bits: int,
               chunk: int = 1 << 15) -> np.ndarray:
    """``[window | top hash bits | index]`` for every sample, computed chunk by chunk.

    Chunks of 256 KiB stay in cache: a dozen passes over a block instead of over the whole array
    (9.6M samples: ~0.03 s instead of ~0.3 s, and no 77 MB temporaries).
    """
    out = np.empty(n, np.uint64)
    tmp = np.empty(min(chunk, n), np.uint64)
    for begin in range(0, n, chunk):
        end = min(begin + chunk, n)
        z, t = out[begin:end], tmp[:end - begin]
        np.copyto(z, np.arange(begin + 1, end + 1, dtype=np.uint64))
        z *= _GAMMA
        z += np.uint64(key)
        _mix(z, t)
        if window is not None:
            z >>= np.uint64(window_bits)
            np.left_shift(window[begin:end], np.uint64(64 - window_bits), out=t)
            z |= t
        z >>= np.uint64(index_bits)
        z <<= np.uint64(index_bits)
        z |= np.arange(begin, end, dtype=np.uint64)
    return out


def epoch_order(num_samples: int, *, seed: int, epoch: int, fingerprint: str,
                sample_shards: np.ndarray | None = None, locality_shards: int | None = None) -> np.ndarray:
    """Positions [0, num_samples) in epoch order (int64; a view of a fresh buffer the caller owns).

    ``sample_shards`` (shard id of each sample) is needed for locality mode only.
    """
    if num_samples == 0:
        return np.zeros(0, np.int64)
    index_bits = max(1, (num_samples - 1).bit_length())
    window, window_bits = None, 0
    if locality_shards:
        if sample_shards is None or len(sample_shards) != num_samples:
            raise ValueError("locality mode needs the shard id of every sample")
        if locality_shards < 1:
            raise ValueError(f"locality_shards must be >= 1 (or None: full shuffle), got {locality_shards}")
        shards, inverse = np.unique(sample_shards, return_inverse=True)
        shard_rank = np.empty(len(shards), np.int64)
        shard_rank[epoch_order(len(shards), seed=seed, epoch=epoch, fingerprint=fingerprint + ":shards")] = \
            np.arange(len(shards))
        window = (shard_rank[inverse] // locality_shards).astype(np.uint64)
        window_bits = max(1, (int(window.max())).bit_length())
        if 64 - window_bits - index_bits < _MIN_HASH_BITS:
            raise ValueError(f"{num_samples} samples in {int(window.max()) + 1} windows leave fewer than "
                             f"{_MIN_HASH_BITS} hash bits; raise locality_shards")
    keys = _sort_keys(epoch_key(seed, epoch, fingerprint), num_samples, index_bits, window, window_bits)
    keys.sort()
    keys &= np.uint64((1 << index_bits) - 1)
    return keys.view(np.int64)
