"""Input discovery and record readers: SlimPajama layout, JSONL (plain, .gz, .zst), parquet, and
Hugging Face `datasets` saved with `save_to_disk`.

Readers yield `Record`s (text, source, line) or `BadRecord`s (reason, line, detail); the caller
decides whether to skip and count them or fail the part. A truncated or corrupt compressed file
raises `CorruptInputError` naming the path and where it broke (for zstd the frame and block zstd
refuses, with their byte range): nothing read from a broken stream is ever kept silently.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from slimpack.extras import require
from slimpack.tokenize.tokenizer import replace_lone_surrogates
from slimpack.zstd_blocks import locate_damage

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)
_SPLITS = ("train", "validation", "test")
# The optional library each input kind reads with (an extra of pyproject.toml; see extras.py).
KIND_MODULES = {"parquet": "pyarrow.parquet", "hf": "datasets"}
_READ_BYTES = 1 << 20

BAD_REASONS = (
    "invalid_json", "not_an_object", "missing_text", "non_string_text", "empty_text",
    "undecodable_utf8",
)


class CorruptInputError(RuntimeError):
    """A compressed input ended early or holds corrupt data."""


@dataclass(frozen=True)
class InputFile:
    """One unit of work: an input file (or a saved HF dataset split) and the part it becomes."""

    path: str  # file, or directory for a saved HF dataset
    part: str  # relative part name, e.g. "train/chunk1/example_train_0.jsonl.zst"
    split: str
    kind: str  # "jsonl", "parquet" or "hf"


@dataclass(frozen=True)
class Record:
    text: str
    source: str
    line: int


@dataclass(frozen=True)
class BadRecord:
    reason: str
    line: int
    detail: str


def _kind(path: Path) -> str | None:
    name = path.name
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _is_hf_saved(path: Path) -> bool:
    return (path / "state.json").exists() or (path / "dataset_dict.json").exists()


def _split_of(rel: Path) -> str:
    for part in rel.parts:
        if part in _SPLITS:
            return part
    return "train"


def _near(path: Path) -> Path:
    """`path`'s parent and grandparent names: where SlimPajama's layout puts the split
    (`validation/chunk1/x.jsonl.zst`), for inputs given below the layout's root."""
    path = path.absolute()
    return Path(path.parent.parent.name, path.parent.name)


def discover(inputs: Sequence[str | os.PathLike]) -> tuple[list[InputFile], list[str]]:
    """(every input file under the given files and directories sorted by part name, ignored files).

    A directory is searched recursively; part names are paths relative to it, so they are stable
    whatever the machine. A directory in SlimPajama's layout (it has `train/`, `validation/` or
    `test/`) contributes only the files under those split directories; other files there (a
    README, a manifest) are returned as ignored so the caller can say so. A file or directory
    given below the layout's root (`validation/chunk1/x.jsonl.zst`, or `validation/`) takes its
    split from its parent and grandparent names, so it never lands in train. A saved HF dataset
    (directory with `state.json`, or a `DatasetDict` with `dataset_dict.json`) becomes one part
    per split.
    """
    found: dict[str, InputFile] = {}
    ignored: list[str] = []

    def add(item: InputFile) -> None:
        if item.part in found and found[item.part].path != item.path:
            raise ValueError(
                f"two inputs map to part {item.part!r}: {found[item.part].path} and {item.path}; "
                "pass their common parent directory instead")
        found[item.part] = item

    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"input {raw} does not exist")
        if path.is_dir() and _is_hf_saved(path):
            add_hf(path, path.name, add)
        elif path.is_dir():
            split_layout = any((path / split).is_dir() for split in _SPLITS)
            for file in sorted(path.rglob("*")):
                rel = file.relative_to(path)
                if file.is_symlink() and not file.exists() and _kind(file):
                    raise FileNotFoundError(
                        f"input {file} is a broken symbolic link (to {os.readlink(file)}): fetch the "
                        "file it points to (e.g. `git annex get`, `dvc pull`) or remove the link")
                if split_layout and rel.parts[0] not in _SPLITS:
                    if file.is_file():
                        ignored.append(str(file))
                    continue
                if file.is_dir() and _is_hf_saved(file):
                    add_hf(file, rel.as_posix(), add)
                elif file.is_file() and not any(_is_hf_saved(p) for p in file.parents):
                    if not _kind(file):
                        ignored.append(str(file))  # named in the report: never dropped unseen
                        continue
                    split = _split_of(rel if split_layout else _near(path / "x") / rel)
                    add(InputFile(str(file), rel.as_posix(), split, _kind(file)))
        elif _kind(path):
            add(InputFile(str(path), path.name, _split_of(_near(path) / path.name), _kind(path)))
        else:
            raise ValueError(
                f"input {raw}: unsupported file type; expected {', '.join(JSONL_SUFFIXES)}, "
                ".parquet or a Hugging Face dataset saved with save_to_disk")
    return [found[k] for k in sorted(found)], ignored


def add_hf(path: Path, part: str, add: Callable[[InputFile], None]) -> None:
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        for split in splits:
            add(InputFile(str(path / split), f"{part}/{split}", split, "hf"))
    else:
        add(InputFile(str(path), part, _split_of(Path(part)), "hf"))


# ----------------------------------------------------------------------------- byte streams


class CountingFile:
    """Counts compressed bytes read, for progress and for error offsets."""

    def __init__(self, path: str, on_bytes: Callable[[int], None] | None = None) -> None:
        self.path = path
        self.f = open(path, "rb")
        self.offset = 0
        self.on_bytes = on_bytes

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.offset += len(data)
        if self.on_bytes and data:
            self.on_bytes(len(data))
        return data

    def close(self) -> None:
        self.f.close()


def _decompressed_chunks(src: CountingFile) -> Iterator[bytes]:
    """Decompressed bytes of a plain, gzip or zstd file, frame by frame.

    Unlike `zstandard.stream_reader` (which returns a silent EOF on a truncated frame), a stream
    that ends inside a frame or member raises `CorruptInputError`.
    """
    name = src.path
    if name.endswith((".zst", ".zstd")):
        new, errors, label = (lambda: zstandard.ZstdDecompressor().decompressobj()), zstandard.ZstdError, "zstd"
    elif name.endswith(".gz"):
        new, errors, label = (lambda: zlib.decompressobj(wbits=31)), zlib.error, "gzip"
    else:
        while chunk := src.read(_READ_BYTES):
            yield chunk
        return
    d, pending = new(), b""
    while True:
        data = pending or src.read(_READ_BYTES)
        pending = b""
        if not data:
            break
        try:
            out = d.decompress(data)
        except errors as err:
            raise CorruptInputError(f"{name}: corrupt {label} data: {_where_broken(src, label, len(data), err)}; "
                                    "re-download the file or exclude it") from err
        if out:
            yield out
        if d.eof:
            pending = d.unused_data
            d = new()
            if not pending:
                # A clean end between frames: only trailing bytes would start a new frame.
                nxt = src.read(_READ_BYTES)
                if not nxt:
                    return
                pending = nxt
    if not d.eof:
        raise CorruptInputError(
            f"{name}: {label} stream is truncated at compressed byte offset {src.offset} (the file "
            "ends inside a frame); re-download the file or exclude it")


def _where_broken(src: CountingFile, label: str, fed: int, err: Exception) -> str:
    """Where decoding failed, as precisely as the format allows.

    The decoder raises after a whole read (``fed`` bytes ending at ``src.offset``), so the end of
    that read says little. A zstd file is read again block by block to name the block zstd refuses
    (see `zstd_blocks`); gzip's decoder cannot be stepped that way, so the read's range is given.
    """
    if label == "zstd":
        with open(src.path, "rb") as f:
            where = locate_damage(f)
        if where is not None:
            return where
    return (f"somewhere in compressed bytes {src.offset - fed:,}-{src.offset - 1:,} ({err}; the {label} "
            "decoder raised on this read and does not say where in it)")


def _lines(src: CountingFile) -> Iterator[bytes]:
    tail = b""
    for chunk in _decompressed_chunks(src):
        chunk = tail + chunk
        lines = chunk.split(b"\n")
        tail = lines.pop()
        yield from lines
    if tail:
        yield tail


# ----------------------------------------------------------------------------- records


def _get_path(obj: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def _missing_detail(obj: dict[str, Any], path: Sequence[str]) -> str:
    """'no field' plus the fields the record does have where the path stops: a misnamed field
    (`content` for `text`) then shows its fix in the first example."""
    node, found = obj, []
    for key in path:
        if not isinstance(node, dict) or key not in node:
            break
        node = node[key]
        found.append(key)
    where = f" under {'.'.join(found)!r}" if found else ""
    fields = ", ".join(sorted(map(str, node))) if isinstance(node, dict) and node else "none"
    return f"no field {'.'.join(path)!r}; fields{where}: {fields}"


def _to_record(obj: Any, line: int, text_path: Sequence[str], source_path: Sequence[str],
               default_source: str) -> Record | BadRecord:
    if not isinstance(obj, dict):
        return BadRecord("not_an_object", line, f"a JSON {type(obj).__name__}, not an object")
    text = _get_path(obj, text_path)
    if text is None:
        return BadRecord("missing_text", line, _missing_detail(obj, text_path))
    if not isinstance(text, str):
        return BadRecord("non_string_text", line, f"{'.'.join(text_path)!r} is {type(text).__name__}")
    if not text:
        return BadRecord("empty_text", line, "empty text")
    source = _get_path(obj, source_path)
    if isinstance(source, str) and not source.isascii():
        # Lone surrogates (JSON "\\ud800" escapes) cannot be UTF-8 encoded for the source id:
        # U+FFFD, the same replacement the tokenizer applies to text.
        source = replace_lone_surrogates(source)
    return Record(text, source if isinstance(source, str) and source else default_source, line)


_WS_LINE = re.compile(rb"\s*")


def read_records(
    item: InputFile,
    *,
    text_field: str = "text",
    source_field: str = "meta.redpajama_set_name",
    default_source: str = "unknown",
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[Record | BadRecord]:
    """Records of one input, in file order; lines are 1-based (rows for parquet and HF)."""
    text_path, source_path = text_field.split("."), source_field.split(".")
    if item.kind == "jsonl":
        src = CountingFile(item.path, on_bytes)
        try:
            for line_no, raw in enumerate(_lines(src), 1):
                if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a UTF-8 byte order mark (Windows tools write one) is not text
                if _WS_LINE.fullmatch(raw):
                    continue  # blank lines (a trailing newline) are not records
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield BadRecord("undecodable_utf8", line_no, str(err))
                    continue
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as err:  # RecursionError: nesting too deep
                    yield BadRecord("invalid_json", line_no, str(err))
                    continue
                yield _to_record(obj, line_no, text_path, source_path, default_source)
        finally:
            src.close()
    elif item.kind == "parquet":
        pq = require(KIND_MODULES["parquet"])
        pf = pq.ParquetFile(item.path)
        names = pf.schema_arrow.names
        if text_path[0] not in names:
            # Only the text and source columns are read, so the rows cannot name the others.
            detail = f"no field {text_field!r}; the file's columns: {', '.join(names) or 'none'}"
            for row in range(1, pf.metadata.num_rows + 1):
                yield BadRecord("missing_text", row, detail)
        else:
            columns = sorted({text_path[0], source_path[0]} & set(names))
            row = 0
            for batch in pf.iter_batches(batch_size=1024, columns=columns):
                for obj in batch.to_pylist():
                    row += 1
                    yield _to_record(obj, row, text_path, source_path, default_source)
        if on_bytes:
            on_bytes(os.path.getsize(item.path))
    elif item.kind == "hf":
        ds = require(KIND_MODULES["hf"]).load_from_disk(item.path)
        for row, obj in enumerate(ds, 1):
            yield _to_record(obj, row, text_path, source_path, default_source)
    else:
        raise ValueError(f"unknown input kind {item.kind!r}")


def input_bytes(item: InputFile) -> int:
    path = Path(item.path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
