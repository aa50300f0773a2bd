"""Whole-shard column decoding: one column of every sample at once, with numpy, from the offsets.

`Shard.sample(k)` decodes one sample with a dozen small Python and numpy steps; at 8,192-token
samples that costs more than zstd. Here the per-sample headers (column sizes, ndarray header
byte, shape) are read for all samples in a few vectorised gathers, and each column's values are
joined with one copy. Only ``ndarray:<dtype>`` columns with a dynamic shape (schema v1's kind)
take this path; anything unexpected raises `ShardFormatError` and the caller falls back to
`Shard.sample` to say which sample is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from slimpack.shards.mds import Shard, ShardFormatError

_BYTE = np.arange(8)


def concat_columns(shard: Shard, names: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (values of every sample concatenated, value count per sample)} for 1-D ndarray columns."""
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
    raw = memoryview(shard.raw)
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
        first = begin + 1 + width
        joined = b"".join([raw[a:b] for a, b in zip(first.tolist(), (first + nbytes).tolist(), strict=True)])
        out[name] = (np.frombuffer(joined, dtype), count)
    return out


def global_cu_seqlens(cu: np.ndarray, cu_counts: np.ndarray, token_counts: np.ndarray) -> np.ndarray:
    """Document boundaries over the shard's concatenated tokens from per-sample `cu_seqlens`.

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
