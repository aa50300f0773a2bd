"""Our MDS codec: round trips, pickle refusal, and compatibility with mosaicml-streaming both ways."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from slimpack.shards import mds, schema
from slimpack.tokenize.job import TokenizeConfig, run_tokenize

COLUMNS = {"cu_seqlens": "ndarray:int32", "doc_sources": "ndarray:uint32", "n": "int64",
           "text": "str", "tokens": "ndarray:uint32", "meta": "json"}


def _samples(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        lengths = rng.integers(2, 300, rng.integers(1, 6))
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        out.append({"tokens": rng.integers(0, 128_256, cu[-1]).astype(np.uint32), "cu_seqlens": cu,
                    "doc_sources": rng.integers(0, 2**32, len(lengths), dtype=np.uint64).astype(np.uint32),
                    "n": np.int64(i), "text": f"sample {i} ✓", "meta": {"i": i}})
    return out


def _equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("compression", ["zstd:3", None])
def test_round_trip_with_size_limited_shards(tmp_path: Path, compression):
    samples = _samples(60)
    w = mds.ShardWriter(tmp_path, columns=COLUMNS, compression=compression, size_limit=8000)
    for s in samples:
        w.write(s)
    index = w.finish()
    assert len(index["shards"]) > 3
    ds = mds.MDSDataset(tmp_path)
    assert len(ds) == 60
    for a, b in zip(samples, ds, strict=True):
        _equal(a, b)
    _equal(samples[37], ds[37])
    for entry in index["shards"]:
        stored = entry["zip_data"] or entry["raw_data"]
        data = (tmp_path / stored["basename"]).read_bytes()
        assert mds.hash_bytes("xxh3_64", data) == stored["hashes"]["xxh3_64"]
        assert len(data) == stored["bytes"]


def test_pickle_columns_are_refused(tmp_path: Path):
    w = mds.ShardWriter(tmp_path, columns={"tokens": "ndarray:uint32"}, compression=None)
    w.write({"tokens": np.arange(5, dtype=np.uint32)})
    index = w.finish()
    index["shards"][0]["column_encodings"] = ["pkl"]
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(mds.ShardFormatError, match="never unpickles"):
        mds.MDSDataset(tmp_path)


def test_truncated_shard_is_reported(tmp_path: Path):
    w = mds.ShardWriter(tmp_path, columns={"tokens": "ndarray:uint32"}, compression=None)
    for i in range(4):
        w.write({"tokens": np.arange(i + 1, dtype=np.uint32)})
    w.finish()
    shard = tmp_path / "shard.00000.mds"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(mds.ShardFormatError, match="truncated or corrupt"):
        mds.MDSDataset(tmp_path)[0]


def test_a_flipped_bit_in_a_compressed_shard_never_decodes_into_other_bytes(tmp_path: Path):
    # Token ids of text are far from uniform: Zipf-like ids compress the way real shards do.
    rng = np.random.default_rng(0)
    w = mds.ShardWriter(tmp_path, columns=schema.COLUMNS, size_limit=1 << 20)
    for _ in range(8):
        docs = [np.concatenate([[128000], rng.zipf(1.3, rng.integers(5, 300)) % 128000, [128001]])
                for _ in range(5)]
        cu = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int32)
        w.write({"tokens": np.concatenate(docs).astype(np.uint32), "cu_seqlens": cu,
                 "doc_sources": np.zeros(5, np.uint32)})
    info = mds.parse_index(w.finish())[0]
    data = (tmp_path / info.basename).read_bytes()
    raw = mds.decode_shard(data, info, "s").raw
    refused = []
    for k in range(len(data)):  # one flipped bit in every byte: frame header, blocks, checksum
        bad = bytearray(data)
        bad[k] ^= 1 << (k % 8)
        try:
            assert mds.decode_shard(bytes(bad), info, "s").raw == raw, f"byte {k} decoded into other bytes"
        except mds.ShardFormatError as err:
            refused.append(str(err))
    assert len(refused) > 0.99 * len(data)  # the rest are bits zstd never reads (table padding)
    assert any("content checksum" in e and "the damage is somewhere in compressed bytes 0-" in e
               for e in refused)
    assert any(re.search(r"s: zstd decompression failed: frame 0, block \d+ \(compressed bytes", e)
               for e in refused)


def _streaming():
    return pytest.importorskip("streaming", reason="mosaicml-streaming is not installed")


def test_streaming_dataset_reads_our_shards(demo_corpus: Path, tmp_path: Path):
    streaming = _streaming()
    from streaming.base.util import clean_stale_shared_memory

    out = tmp_path / "ours"
    run_tokenize([str(demo_corpus)], str(out), TokenizeConfig(block_tokens=8192, shard_size_limit=1 << 18),
                 workers=2, progress=False)
    ours = mds.MDSDataset(out)
    copy = tmp_path / "copy"  # StreamingDataset writes decompressed shards next to the originals
    shutil.copytree(out, copy)
    clean_stale_shared_memory()
    try:
        theirs = streaming.StreamingDataset(local=str(copy), shuffle=False, batch_size=1, validate_hash="xxh3_64")
        assert len(theirs) == len(ours) > 10
        for i in range(len(ours)):
            _equal({k: v for k, v in theirs[i].items()}, ours[i])
    finally:
        clean_stale_shared_memory()


def test_our_reader_reads_mdswriter_shards(tmp_path: Path):
    streaming = _streaming()
    samples = _samples(40, seed=1)
    with streaming.MDSWriter(out=str(tmp_path / "theirs"), columns=COLUMNS, compression="zstd",
                             hashes=["sha1", "xxh3_64"], size_limit=6000) as writer:
        for s in samples:
            writer.write(s)
    ds = mds.MDSDataset(tmp_path / "theirs")
    assert len(ds.shards) > 3
    for a, b in zip(samples, ds, strict=True):
        _equal(a, b)
    # Same samples and settings through our writer: the raw (uncompressed) shard bytes are identical.
    ours = mds.ShardWriter(tmp_path / "ours", columns=COLUMNS, compression="zstd", hashes=["sha1", "xxh3_64"],
                           size_limit=6000)
    for s in samples:
        ours.write(s)
    our_index = ours.finish()
    their_index = json.loads((tmp_path / "theirs" / schema.INDEX_FILENAME).read_text())
    assert [s["raw_data"] for s in our_index["shards"]] == [s["raw_data"] for s in their_index["shards"]]
