"""Our own MDS v2 codec: shard writer and reader, byte-compatible with mosaicml-streaming.

Shard file layout (raw, before optional compression of the whole file):

    uint32 num_samples | uint32 offsets[num_samples + 1] | config JSON | samples...

each offset is the absolute byte position of a sample; a sample is ``uint32 sizes[k]`` for its k
variable-size columns followed by the encoded columns in name order. ``ndarray:<dtype>`` (static
dtype, dynamic shape) encodes as ``[ndim << 2 | shape_dtype] [shape] [values]``.

Only encodings that execute nothing are read (see ``schema.is_safe_encoding``): no pickle, ever.
Compressed shards are one zstd frame with its content checksum; shard names in an index must stay
inside the dataset root (``storage.check_member``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
import zstandard

from slimpack.exitcodes import UnusableDatasetError
from slimpack.shards import schema
from slimpack.storage import check_member, make_dirs, member_path, write_atomic
from slimpack.zstd_blocks import locate_damage

_SHAPE_DTYPES = ("uint8", "uint16", "uint32", "uint64")
_VALUE_DTYPES = {
    8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32", 33: "int32",
    34: "float32", 64: "uint64", 65: "int64", 66: "float64",
}
_VALUE_DTYPE_IDS = {v: k for k, v in _VALUE_DTYPES.items()}
_SCALARS = {
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
}


class ShardFormatError(UnusableDatasetError):
    """A shard or index does not follow the MDS format; the message names the file and the fix."""


# ----------------------------------------------------------------------------- encodings


def _parse_ndarray(encoding: str) -> tuple[str | None, tuple[int, ...] | None]:
    args = encoding.split(":")[1:]
    dtype = args[0] if args and args[0] else None
    shape = tuple(int(x) for x in args[1].split(",")) if len(args) > 1 else None
    return dtype, shape


def encoded_size(encoding: str) -> int | None:
    """Fixed byte size of a column, or None when it varies per sample (and so has a size slot)."""
    if encoding in _SCALARS:
        return np.dtype(encoding).itemsize
    if encoding.startswith("ndarray"):
        dtype, shape = _parse_ndarray(encoding)
        if dtype is not None and shape is not None:
            return int(np.prod(shape)) * np.dtype(dtype).itemsize
    return None


def encode_ndarray(array: np.ndarray, dtype: str) -> bytes:
    """``ndarray:<dtype>`` with a dynamic shape, as MDS writes it."""
    if array.dtype != np.dtype(dtype):
        raise ValueError(f"expected {dtype}, got {array.dtype}")
    if array.size == 0:
        raise ValueError("MDS cannot encode an empty array")
    shape = np.asarray(array.shape, np.int64)
    top = int(shape.max())
    shape_code = 0 if top < 1 << 8 else 1 if top < 1 << 16 else 2 if top < 1 << 32 else 3
    head = bytes([(array.ndim << 2) | shape_code])
    return head + shape.astype(_SHAPE_DTYPES[shape_code]).tobytes() + np.ascontiguousarray(array).tobytes()


def decode_column(encoding: str, data: bytes | memoryview) -> Any:
    """Decode one column value. Refuses anything but safe encodings."""
    if not schema.is_safe_encoding(encoding):
        raise ShardFormatError(f"refusing column encoding {encoding!r}: slimpack never unpickles")
    if encoding.startswith("ndarray"):
        dtype, shape = _parse_ndarray(encoding)
        pos = 0
        if dtype is None:
            dtype = _VALUE_DTYPES[data[0]]
            pos = 1
        if shape is None:
            byte = data[pos]
            ndim, shape_dtype = byte >> 2, _SHAPE_DTYPES[byte & 3]
            width = np.dtype(shape_dtype).itemsize
            shape = tuple(np.frombuffer(data, shape_dtype, ndim, pos + 1).tolist())
            pos += 1 + ndim * width
        return np.frombuffer(data, dtype, offset=pos).reshape(shape)
    if encoding in _SCALARS:
        return np.frombuffer(data, encoding)[0]
    if encoding == "bytes":
        return bytes(data)
    if encoding == "int":
        return int(np.frombuffer(data, np.int64)[0])
    text = bytes(data).decode("utf-8")
    if encoding == "str":
        return text
    if encoding == "json":
        return json.loads(text)
    if encoding == "str_int":
        return int(text)
    return float(text)  # str_float, str_decimal


# ----------------------------------------------------------------------------- hashing / compression


def hash_bytes(algo: str, data: bytes | memoryview) -> str:
    """Hex digest by MDS hash name (hashlib names and xxhash's ``xxh3_64``, ``xxh64``...)."""
    if algo.startswith("xxh"):
        return getattr(xxhash, f"{algo}_hexdigest")(data)
    return hashlib.new(algo, data).hexdigest()


def _compression(compression: str | None) -> tuple[str, int] | None:
    if not compression:
        return None
    algo, _, level = compression.partition(":")
    if algo != "zstd":
        raise ValueError(f"unsupported compression {compression!r}; use 'zstd[:level]' or none")
    return algo, int(level or 3)


def compress(compression: str | None, data: bytes) -> bytes:
    algo_level = _compression(compression)
    if algo_level is None:
        return data
    # Single-threaded, content size in the frame header: deterministic bytes, and readable by
    # the `zstd` package that mosaicml-streaming uses. The content checksum (xxh64 of the raw
    # bytes, 4 bytes a frame) makes zstd refuse a damaged frame: without it about two thirds of
    # single-bit flips in a test shard decoded into other bytes without complaint.
    return zstandard.ZstdCompressor(level=algo_level[1], write_content_size=True,
                                    write_checksum=True).compress(data)


def decompress(compression: str | None, data: bytes) -> bytes:
    if not compression:
        return data
    _compression(compression)
    return zstandard.ZstdDecompressor().decompress(data)


def zstd_damage(data: bytes, err: Exception) -> str:
    """Where ``data`` (a zstd frame zstd refused with ``err``) breaks: frame, block, byte range."""
    return locate_damage(io.BytesIO(data)) or f"{err} (the frame structure itself reads cleanly)"


# ----------------------------------------------------------------------------- writer


class ShardWriter:
    """Write samples into size-limited MDS shards in a local directory, then its index.json.

    Output bytes depend only on the samples and the arguments (no timestamps, no randomness).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        columns: dict[str, str],
        compression: str | None = schema.DEFAULT_COMPRESSION,
        hashes: Sequence[str] = schema.DEFAULT_HASHES,
        size_limit: int = schema.DEFAULT_SHARD_SIZE_LIMIT,
    ) -> None:
        self.out_dir = Path(out_dir)
        make_dirs(self.out_dir)
        _compression(compression)
        self.names = sorted(columns)
        self.encodings = [columns[n] for n in self.names]
        self.sizes = [encoded_size(e) for e in self.encodings]
        self.compression = compression or None
        self.hashes = list(hashes)
        self.size_limit = size_limit
        self.config = {
            "column_encodings": self.encodings,
            "column_names": self.names,
            "column_sizes": self.sizes,
            "compression": self.compression,
            "format": "mds",
            "hashes": self.hashes,
            "size_limit": self.size_limit,
            "version": schema.MDS_VERSION,
        }
        self._config_bytes = json.dumps(self.config, sort_keys=True).encode("utf-8")
        self.shards: list[dict[str, Any]] = []
        self._samples: list[bytes] = []
        self._pending = 8 + len(self._config_bytes)

    def _encode(self, sample: dict[str, Any]) -> bytes:
        sizes, parts = [], []
        for name, encoding, size in zip(self.names, self.encodings, self.sizes):
            value = sample[name]
            if encoding.startswith("ndarray"):
                datum = encode_ndarray(value, _parse_ndarray(encoding)[0] or value.dtype.name)
            elif encoding in _SCALARS:
                datum = np.asarray(value, encoding).tobytes()
            elif encoding == "str":
                datum = value.encode("utf-8")
            elif encoding == "json":
                datum = json.dumps(value, sort_keys=True).encode("utf-8")
            elif encoding == "bytes":
                datum = bytes(value)
            else:
                raise ValueError(f"ShardWriter does not write {encoding!r}")
            if size is None:
                sizes.append(len(datum))
            parts.append(datum)
        return np.asarray(sizes, np.uint32).tobytes() + b"".join(parts)

    def write(self, sample: dict[str, Any]) -> None:
        data = self._encode(sample)
        cost = len(data) + 4  # + its offset slot
        if self._samples and self._pending + cost > self.size_limit:
            self._flush()
        self._samples.append(data)
        self._pending += cost

    def _flush(self) -> None:
        n = len(self._samples)
        head = 4 + 4 * (n + 1) + len(self._config_bytes)
        offsets = np.cumsum([0] + [len(s) for s in self._samples], dtype=np.int64) + head
        if offsets[-1] >= 1 << 32:
            raise ValueError("shard over 4 GiB: lower size_limit")
        raw = (np.uint32(n).tobytes() + offsets.astype(np.uint32).tobytes() + self._config_bytes
               + b"".join(self._samples))
        raw_name = f"shard.{len(self.shards):05d}.mds"
        raw_info = {"basename": raw_name, "bytes": len(raw),
                    "hashes": {a: hash_bytes(a, raw) for a in self.hashes}}
        zip_info = None
        data = raw
        if self.compression:
            data = compress(self.compression, raw)
            zip_info = {"basename": raw_name + ".zstd", "bytes": len(data),
                        "hashes": {a: hash_bytes(a, data) for a in self.hashes}}
        write_atomic(self.out_dir / (zip_info or raw_info)["basename"], data)
        self.shards.append({"raw_data": raw_info, "samples": n, "zip_data": zip_info, **self.config})
        self._samples = []
        self._pending = 8 + len(self._config_bytes)

    def finish(self) -> dict[str, Any]:
        """Flush the last shard and write index.json; returns the index."""
        if self._samples:
            self._flush()
        index = {"shards": self.shards, "version": schema.MDS_VERSION}
        write_atomic(self.out_dir / schema.INDEX_FILENAME, dumps_index(index))
        return index


def dumps_index(index: dict[str, Any]) -> bytes:
    return json.dumps(index, sort_keys=True).encode("utf-8")


# ----------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class ShardInfo:
    """One shard entry of an index, with the path of its stored file."""

    index: int
    samples: int
    basename: str  # of the stored file (compressed if compression is on), relative to the root
    compression: str | None
    names: tuple[str, ...]
    encodings: tuple[str, ...]
    sizes: tuple[int | None, ...]
    entry: dict


def parse_index(index: dict[str, Any], where: str = "index.json") -> list[ShardInfo]:
    """Shard entries of an MDS v2 index, checked for the fields we rely on."""
    if not isinstance(index, dict) or index.get("version") != schema.MDS_VERSION:
        raise ShardFormatError(f"{where}: not an MDS v2 index (missing 'version': 2)")
    shards = index.get("shards")
    if not isinstance(shards, list):
        raise ShardFormatError(f"{where}: 'shards' must be a list")
    out = []
    for i, e in enumerate(shards):
        try:
            if e["format"] != "mds":
                raise ShardFormatError(f"{where}: shard {i} has format {e['format']!r}, not 'mds'")
            stored = e["zip_data"] or e["raw_data"]
            check_member(stored["basename"], where=f"{where}: shard {i}")
            names, encodings = tuple(e["column_names"]), tuple(e["column_encodings"])
            for name, enc in zip(names, encodings):
                if not schema.is_safe_encoding(enc):
                    raise ShardFormatError(
                        f"{where}: shard {i} ({stored['basename']}) column {name!r} uses encoding "
                        f"{enc!r}; slimpack never unpickles: rewrite the data with ndarray columns")
            out.append(ShardInfo(i, int(e["samples"]), stored["basename"], e.get("compression"),
                                 names, encodings, tuple(e["column_sizes"]), e))
        except (KeyError, TypeError) as err:
            raise ShardFormatError(f"{where}: shard {i} entry is malformed ({err!r})") from err
    return out


class Shard:
    """A decoded view of one raw shard's bytes."""

    def __init__(self, raw: bytes, info: ShardInfo, where: str) -> None:
        self.raw, self.info, self.where = raw, info, where
        if len(raw) < 8:
            raise ShardFormatError(f"{where}: {len(raw)} bytes is too short for an MDS shard header")
        n = int(np.frombuffer(raw, np.uint32, 1)[0])
        if n != info.samples:
            raise ShardFormatError(
                f"{where}: header says {n} samples, index says {info.samples}: re-run the merge or "
                "re-tokenize the part")
        if 4 * (n + 2) > len(raw):
            raise ShardFormatError(f"{where}: header claims {n} samples but the file is truncated")
        self.offsets = np.frombuffer(raw, np.uint32, n + 1, 4).astype(np.int64)
        if self.offsets[-1] != len(raw) or np.any(np.diff(self.offsets) < 0):
            raise ShardFormatError(
                f"{where}: sample offsets are not monotonic or end at {int(self.offsets[-1])} "
                f"instead of the file size {len(raw)}: the shard is truncated or corrupt")
        self._variable = [i for i, s in enumerate(info.sizes) if s is None]

    def __len__(self) -> int:
        return self.info.samples

    def columns(self, k: int) -> dict[str, memoryview]:
        """Raw bytes of every column of sample k (no decoding)."""
        begin, end = int(self.offsets[k]), int(self.offsets[k + 1])
        view = memoryview(self.raw)[begin:end]
        nvar = len(self._variable)
        var_sizes = np.frombuffer(view, np.uint32, nvar).tolist() if nvar else []
        pos, out, it = 4 * nvar, {}, iter(var_sizes)
        for name, size in zip(self.info.names, self.info.sizes):
            size = next(it) if size is None else size
            out[name] = view[pos:pos + size]
            pos += size
        if pos != end - begin:
            raise ShardFormatError(f"{self.where}: sample {k} column sizes do not add up")
        return out

    def sample(self, k: int) -> dict[str, Any]:
        cols = self.columns(k)
        return {n: decode_column(e, cols[n]) for n, e in zip(self.info.names, self.info.encodings)}


def read_json(path: str | os.PathLike) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def decode_shard(data: bytes, info: ShardInfo, where: str) -> Shard:
    """Decompress (if the index says so) and parse one stored shard file's bytes."""
    try:
        raw = decompress(info.compression, data)
    except zstandard.ZstdError as err:
        raise ShardFormatError(f"{where}: zstd decompression failed: {zstd_damage(data, err)}; the file "
                               "is corrupt or truncated: re-copy or re-tokenize it") from err
    return Shard(raw, info, where)


def load_shard(root: str | os.PathLike, info: ShardInfo) -> Shard:
    """Read, decompress and parse one shard from a local dataset root."""
    path = member_path(root, info.basename, where=f"{root}: shard {info.index}")
    with open(path, "rb") as f:
        return decode_shard(f.read(), info, str(path))


class MDSDataset:
    """Random access to the samples of a local MDS directory (ours or mosaicml-streaming's).

    Keeps the most recently used shard decoded; reading in index order touches each shard once.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        index_path = self.root / schema.INDEX_FILENAME
        if not index_path.exists():
            raise ShardFormatError(f"{index_path}: no MDS index here; point at a dataset directory "
                                   "(`slimpack tokenize ... --out DIR` writes one, `slimpack shards merge` "
                                   "completes an unmerged one)")
        try:
            index = read_json(index_path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ShardFormatError(f"{index_path} is not readable JSON ({err}); re-run `slimpack shards merge`") \
                from err
        self.shards = parse_index(index, str(index_path))
        counts = np.asarray([s.samples for s in self.shards], np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)])
        self._cache: tuple[int, Shard] | None = None

    def __len__(self) -> int:
        return int(self.shard_starts[-1])

    def shard(self, i: int) -> Shard:
        if self._cache is None or self._cache[0] != i:
            self._cache = (i, load_shard(self.root, self.shards[i]))
        return self._cache[1]

    def locate(self, idx: int) -> tuple[int, int]:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self.shard_starts, idx, side="right") - 1)
        return shard, idx - int(self.shard_starts[shard])

    def __getitem__(self, idx: int) -> dict[str, Any]:
        shard, k = self.locate(idx)
        return self.shard(shard).sample(k)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self.shards)):
            shard = self.shard(i)
            for k in range(len(shard)):
                yield shard.sample(k)
