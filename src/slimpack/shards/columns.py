"""Vectorised column decoding: one column of many samples at once, with numpy, from the offsets.

`Shard.sample(k)` decodes one sample with a dozen small Python and numpy steps; at 8,192-token
samples that costs more than zstd. Here the per-sample headers (column sizes, ndarray header
byte, shape) of all samples are read in a few vectorised gathers (`column_layouts`), and a
column's values for any run of consecutive samples are joined with one copy (`gather`). Callers
gather cache-sized runs of samples (about 1 MB) rather than whole 64 MiB shards: the copy then
stays in cache for the checks that follow. Only ``ndarray:<dtype>`` columns with a dynamic shape
(schema v1's kind) take this path; anything unexpected raises `ShardFormatError` and the caller
falls back to `Shard.sample` to say which sample is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from slimpack.shards.mds import Shard, ShardFormatError

_BYTE = np.arange(8)


@dataclass(frozen=True)
class ColumnLayout:
    """Where one column's values lie in every sample of a raw shard."""

    raw: bytes
    dtype: np.dtype
    first: np.ndarray  # int64 byte position of sample k's first value
    nbytes: np.ndarray  # int64 bytes of sample k's values
    count: np.ndarray  # int64 values in sample k


def column_layouts(shard: Shard, names: Sequence[str]) -> dict[str, ColumnLayout]:
    """Layouts of 1-D ndarray columns, every sample's header checked against its size."""
    info, n = shard.info, len(shard)
    if any(size is not None for size in info.sizes):
        raise ShardFormatError(f"{shard.where}: fixed-size columns take the per-sample path")
    nvar = len(info.names)
    u8 = np.frombuffer(shard.raw, np.uint8)
    starts, ends = shard.offsets[:-1], shard.offsets[1:]
    if np.any(ends - starts < 4 * nvar):
        raise ShardFormatError(f"{shard.where}: a sample is shorter than its column-size header")
    # Sample k begins with uint32 sizes[nvar], then the columns in name order.
    head = u8[starts[:, None] + np.arange(4 * nvar)]
    sizes = np.ascontiguousarray(head).view("<u4").reshape(n, nvar).astype(np.int64)
    col_starts = starts[:, None] + 4 * nvar + np.cumsum(sizes, axis=1) - sizes
    if np.any(col_starts[:, -1] + sizes[:, -1] != ends):
        raise ShardFormatError(f"{shard.where}: column sizes do not add up to the sample sizes")
    out = {}
    for name in names:
        j = info.names.index(name)
        kind, _, rest = info.encodings[j].partition(":")
        if kind != "ndarray" or not rest or ":" in rest:
            raise ShardFormatError(f"{shard.where}: column {name} is not ndarray:<dtype>")
        dtype = np.dtype(rest)
        begin, size = col_starts[:, j], sizes[:, j]
        if np.any(size < 2):
            raise ShardFormatError(f"{shard.where}: column {name} has an empty value")
        byte = u8[begin]
        width = (1 << (byte & 3)).astype(np.int64)  # bytes of the shape value
        nbytes = size - 1 - width
        if np.any(byte >> 2 != 1) or np.any(nbytes < 0) or np.any(nbytes % dtype.itemsize):
            raise ShardFormatError(f"{shard.where}: column {name} is not a 1-D {dtype} array")
        count = nbytes // dtype.itemsize
        # The shape value: `width` little-endian bytes after the header byte, read as 8 bytes
        # with the ones past `width` zeroed (indices clipped at the end of the shard).
        shape_bytes = u8[np.minimum(begin[:, None] + 1 + _BYTE, len(u8) - 1)] * (width[:, None] > _BYTE)
        shape = np.ascontiguousarray(shape_bytes, np.uint8).view("<u8").ravel()
        if np.any(shape != count):
            raise ShardFormatError(f"{shard.where}: column {name}'s shape disagrees with its size")
        out[name] = ColumnLayout(shard.raw, dtype, begin + 1 + width, nbytes, count)
    return out


def gather(layout: ColumnLayout, begin: int, end: int) -> np.ndarray:
    """Values of samples [begin, end) of one column, joined (one copy)."""
    raw = memoryview(layout.raw)
    first = layout.first[begin:end].tolist()
    last = (layout.first[begin:end] + layout.nbytes[begin:end]).tolist()
    return np.frombuffer(b"".join([raw[a:b] for a, b in zip(first, last, strict=True)]), layout.dtype)


def concat_columns(shard: Shard, names: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (values of every sample concatenated, value count per sample)} for 1-D ndarray columns."""
    return {name: (gather(lay, 0, len(shard)), lay.count)
            for name, lay in column_layouts(shard, names).items()}


def global_cu_seqlens(cu: np.ndarray, cu_counts: np.ndarray, token_counts: np.ndarray) -> np.ndarray:
    """Document boundaries over concatenated samples' tokens from their `cu_seqlens`.

    Each sample's entries are shifted by its first token's position and its end (the next
    sample's 0) is dropped; valid when every sample's `cu_seqlens` runs from 0 to its length.
    """
    token_starts = np.cumsum(token_counts) - token_counts
    shifted = cu.astype(np.int64) + np.repeat(token_starts, cu_counts)
    keep = np.ones(len(cu), bool)
    keep[np.cumsum(cu_counts) - 1] = False
    if len(keep):
        keep[-1] = True
    return shifted[keep]


def sample_runs(sample_bytes: np.ndarray, run_bytes: int) -> list[tuple[int, int]]:
    """Consecutive sample ranges [a, b) of about `run_bytes` each (a sample is never split)."""
    ends = np.cumsum(sample_bytes)
    cuts = np.searchsorted(ends, np.arange(run_bytes, int(ends[-1]) if len(ends) else 0, run_bytes),
                           side="right")
    bounds = np.unique(np.concatenate([[0], cuts, [len(sample_bytes)]]))
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
