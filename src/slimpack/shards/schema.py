"""The shard contract, schema v1: the one source of truth for writer, reader, validator and loader.

A dataset directory holds:

    index.json            MDS v2 index over every shard of every part (basenames are relative
                          paths such as ``parts/train/chunk1/example_train_0.jsonl.zst/shard.00000.mds.zstd``)
    slimpack.json         the manifest: schema version, tokenizer identity, counts, fingerprint
    sample_tokens.npy     int64 token count of every sample, in index order (the loader's input)
    inputs.json           every input the tokenize job was given (part, path, split, kind), so a
                          merge and validate can name an input whose part is missing
    parts/<name>/         one directory per input file, named by its path under the input root:
        index.json        the part's own MDS index
        shard.NNNNN.mds[.zstd]
        stats.json        written last and atomically: the part is complete only when it exists

A sample is a block of whole documents (never split), each ``BOS text EOS``; ``cu_seqlens`` holds
the document starts plus the end, so ``tokens[cu[i]:cu[i+1]]`` is document i.
"""

from __future__ import annotations

import zlib

SCHEMA_VERSION = 1
MDS_VERSION = 2

# Column name -> MDS encoding. MDS stores columns sorted by name; keep this sorted too.
COLUMNS: dict[str, str] = {
    "cu_seqlens": "ndarray:int32",
    "doc_sources": "ndarray:uint32",
    "tokens": "ndarray:uint32",
}
TOKENS_DTYPE = "uint32"
CU_SEQLENS_DTYPE = "int32"
DOC_SOURCES_DTYPE = "uint32"

INDEX_FILENAME = "index.json"
MANIFEST_FILENAME = "slimpack.json"
SAMPLE_TOKENS_FILENAME = "sample_tokens.npy"
INPUTS_FILENAME = "inputs.json"
PARTS_DIRNAME = "parts"
PART_STATS_FILENAME = "stats.json"

DEFAULT_BLOCK_TOKENS = 65_536
DEFAULT_SHARD_SIZE_LIMIT = 1 << 26  # 64 MiB of raw shard bytes, as mosaicml-streaming
DEFAULT_COMPRESSION = "zstd:3"
DEFAULT_HASHES = ("sha1", "xxh3_64")

# Encodings that may appear in a shard we read. Anything else (pickle above all) is refused.
SAFE_ENCODINGS = frozenset(
    {"bytes", "str", "int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
     "uint64", "float16", "float32", "float64", "str_int", "str_float", "str_decimal", "json"}
)


def is_safe_encoding(encoding: str) -> bool:
    """True for encodings we decode without executing anything (never ``pkl``)."""
    return encoding in SAFE_ENCODINGS or encoding.split(":")[0] == "ndarray"


def part_of(basename: str) -> str | None:
    """The part a shard belongs to (``parts/<part>/shard.00000.mds.zstd`` -> ``<part>``), or None
    for a basename outside ``parts/``."""
    pieces = basename.split("/")
    if len(pieces) > 2 and pieces[0] == PARTS_DIRNAME:
        return "/".join(pieces[1:-1])
    return None


def source_id(name: str) -> int:
    """Stable 32-bit id of a source name (CRC-32 of its UTF-8 bytes).

    A per-document source id that depends only on the name keeps every part's bytes a function
    of its own file; the manifest maps ids back to names and merge refuses a collision.
    """
    return zlib.crc32(name.encode("utf-8"))
