"""Input discovery and record readers: formats, bad records, broken compressed files."""

from __future__ import annotations

import functools
import gzip
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from slimpack.tokenize.readers import BadRecord, CorruptInputError, Record, discover, read_records


def _jsonl(records: list) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def _docs(n: int, source: str = "RedPajamaC4") -> list[dict]:
    return [{"text": f"document {i} " + "word " * (i + 3), "meta": {"redpajama_set_name": source}}
            for i in range(n)]


def test_slimpajama_layout_sorted_with_splits(shared_data):
    items, ignored = discover([shared_data])
    assert [i.part for i in items] == [
        "test/chunk1/example_holdout_0.jsonl.zst", "train/chunk1/example_train_0.jsonl.zst",
        "train/chunk1/example_train_1.jsonl.zst", "train/chunk2/example_train_0.jsonl.zst",
        "validation/chunk1/example_holdout_0.jsonl.zst"]
    assert [i.split for i in items] == ["test", "train", "train", "train", "validation"]
    assert {Path(f).name for f in ignored} >= {"manifest.jsonl", "README.md"}


def test_formats_read_the_same_records(tmp_path: Path):
    docs = _docs(5)
    (tmp_path / "a.jsonl").write_bytes(_jsonl(docs))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(_jsonl(docs)))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(docs)))
    pq.write_table(pa.Table.from_pylist(docs), tmp_path / "d.parquet")
    items, _ = discover([tmp_path])
    assert [i.part for i in items] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet"]
    expected = [(d["text"], d["meta"]["redpajama_set_name"]) for d in docs]
    for item in items:
        got = [(r.text, r.source) for r in read_records(item)]
        assert got == expected, item.path


def test_multi_frame_zstd_and_multi_member_gzip(tmp_path: Path):
    docs = _docs(6)
    z = zstandard.ZstdCompressor()
    (tmp_path / "m.jsonl.zst").write_bytes(z.compress(_jsonl(docs[:3])) + z.compress(_jsonl(docs[3:])))
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress(_jsonl(docs[:2])) + gzip.compress(_jsonl(docs[2:])))
    for item in discover([tmp_path])[0]:
        assert [r.text for r in read_records(item)] == [d["text"] for d in docs]


def test_hf_save_to_disk(tmp_path: Path):
    import datasets

    docs = _docs(4, "RedPajamaWikipedia")
    datasets.Dataset.from_list(docs).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(docs),
                          "validation": datasets.Dataset.from_list(docs[:1])}).save_to_disk(str(tmp_path / "dd"))
    items, _ = discover([tmp_path / "ds", tmp_path / "dd"])
    assert [(i.part, i.split, i.kind) for i in items] == [
        ("dd/train", "train", "hf"), ("dd/validation", "validation", "hf"), ("ds", "train", "hf")]
    recs = list(read_records(items[2]))
    assert [r.text for r in recs] == [d["text"] for d in docs]
    assert {r.source for r in recs} == {"RedPajamaWikipedia"}


def test_bad_records_each_reason_with_line(tmp_path: Path):
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b"{not json",
        json.dumps({"meta": {}}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": ""}).encode(),
        b'{"text": "bad \xff\xfe bytes"}',
        json.dumps([1, 2]).encode(),
        b"",  # a blank line is not a record
        json.dumps({"text": "good two", "meta": {"redpajama_set_name": "RedPajamaBook"}}).encode(),
    ]
    (tmp_path / "x.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    recs = list(read_records(discover([tmp_path / "x.jsonl"])[0][0]))
    bad = [(r.reason, r.line) for r in recs if isinstance(r, BadRecord)]
    assert bad == [("invalid_json", 2), ("missing_text", 3), ("non_string_text", 4), ("empty_text", 5),
                   ("undecodable_utf8", 6), ("not_an_object", 7)]
    good = [r for r in recs if isinstance(r, Record)]
    assert [(r.text, r.source, r.line) for r in good] == [
        ("good one", "unknown", 1), ("good two", "RedPajamaBook", 9)]


def test_configurable_field_paths(tmp_path: Path):
    (tmp_path / "y.jsonl").write_bytes(_jsonl([{"body": {"content": "hi"}, "origin": "web"}]))
    (rec,) = read_records(discover([tmp_path / "y.jsonl"])[0][0], text_field="body.content",
                          source_field="origin")
    assert (rec.text, rec.source) == ("hi", "web")


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz"])
def test_truncated_compressed_file_raises_with_offset(tmp_path: Path, suffix: str):
    raw = _jsonl(_docs(3000))
    data = zstandard.ZstdCompressor().compress(raw) if suffix.endswith("zst") else gzip.compress(raw)
    path = tmp_path / f"t{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptInputError, match=r"truncated at compressed byte offset \d+") as err:
        list(read_records(discover([path])[0][0]))
    assert str(path) in str(err.value)


def _flip(path: Path, data: bytes, at: int, n: int = 64) -> None:
    bad = bytearray(data)
    for k in range(at, at + n):
        bad[k] ^= 0x5A
    path.write_bytes(bytes(bad))


def _byte_range(message: str, before: str) -> tuple[int, int]:
    m = re.search(before + r"compressed bytes ([\d,]+)-([\d,]+)", message)
    assert m, message
    return int(m[1].replace(",", "")), int(m[2].replace(",", ""))


@functools.cache
def _varied_jsonl(n: int) -> bytes:
    """Text that compresses about 2.7x (like web text), so a zstd file has full 128 KiB blocks."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 10))) for _ in range(5000)]
    return _jsonl([{"text": " ".join(rng.choice(words, rng.integers(20, 200)))} for _ in range(n)])


def test_corrupt_zstd_names_the_block_where_decoding_failed(tmp_path: Path):
    # Several 128 KiB blocks: the error used to name the end of the read (the file size here).
    data = zstandard.ZstdCompressor().compress(_varied_jsonl(2000))
    at = len(data) // 3
    path = tmp_path / "c.jsonl.zst"
    _flip(path, data, at)
    with pytest.raises(CorruptInputError) as err:
        list(read_records(discover([path])[0][0]))
    message = str(err.value)
    first, last = _byte_range(message, r"frame 0, block \d+ \(")
    assert first <= at <= last < len(data) - 1 and last - first < 1 << 17, message
    assert message.startswith(f"{path}: corrupt zstd data: frame 0, block ")
    assert "the damage is in this block, or in an earlier block of the frame that still decoded" in message


def test_corrupt_zstd_with_a_checksum_names_the_frame(tmp_path: Path):
    raw = _varied_jsonl(2000)
    first, second = raw[:len(raw) // 2], raw[len(raw) // 2:]
    plain = zstandard.ZstdCompressor().compress(second)

    def decodes_wrong(k: int) -> bool:
        bad = bytearray(plain)
        bad[k] ^= 0x01
        try:
            return zstandard.ZstdDecompressor().decompress(bytes(bad)) != second
        except zstandard.ZstdError:
            return False

    # A flip that decodes into wrong text without complaint when the frame has no checksum...
    at = next(k for k in range(len(plain) // 2, len(plain)) if decodes_wrong(k))
    one = zstandard.ZstdCompressor(write_checksum=True).compress(first)
    two = zstandard.ZstdCompressor(write_checksum=True).compress(second)  # same blocks, + checksum
    path = tmp_path / "c.jsonl.zst"
    _flip(path, one + two, len(one) + at, n=1)
    # ...is caught by the checksum, which can only name the frame.
    with pytest.raises(CorruptInputError, match="frame 1's content checksum") as err:
        list(read_records(discover([path])[0][0]))
    assert _byte_range(str(err.value), "the damage is somewhere in ") == (len(one), len(one) + len(two) - 1)


def test_corrupt_gzip_names_the_range_read(tmp_path: Path):
    data = gzip.compress(_jsonl(_docs(3000)))
    at = len(data) // 3
    path = tmp_path / "c.jsonl.gz"
    _flip(path, data, at)
    with pytest.raises(CorruptInputError, match="does not say where in it") as err:
        list(read_records(discover([path])[0][0]))
    first, last = _byte_range(str(err.value), "somewhere in ")
    assert first <= at <= last


def test_conflicting_part_names_are_refused(tmp_path: Path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "same.jsonl").write_bytes(_jsonl(_docs(1)))
    with pytest.raises(ValueError, match=r"two inputs map to part 'same\.jsonl'"):
        discover([tmp_path / "a" / "same.jsonl", tmp_path / "b" / "same.jsonl"])


def test_missing_and_unsupported_inputs(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover([tmp_path / "nope"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        discover([tmp_path / "notes.txt"])


def test_split_of_files_and_split_directories_passed_directly(tmp_path: Path):
    """Passing SlimPajama's validation files (or its validation directory) must not make them train."""
    layout = {"train/chunk1/example_train_0.jsonl": "train",
              "validation/chunk1/example_holdout_0.jsonl": "validation",
              "test/chunk1/example_holdout_1.jsonl": "test"}
    for name in layout:
        (tmp_path / name).parent.mkdir(parents=True)
        (tmp_path / name).write_bytes(_jsonl([{"text": "x"}]))
    items, _ = discover([tmp_path / name for name in layout])
    assert {i.part: i.split for i in items} == {Path(n).name: s for n, s in layout.items()}
    items, _ = discover([tmp_path / "validation"])
    assert [(i.part, i.split) for i in items] == [("chunk1/example_holdout_0.jsonl", "validation")]
    items, _ = discover([tmp_path / "train" / "chunk1"])  # no split name nearby: train, as before
    assert [(i.part, i.split) for i in items] == [("example_train_0.jsonl", "train")]


def test_utf8_byte_order_mark_does_not_cost_the_first_record(tmp_path: Path):
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + _jsonl([{"text": "first"}, {"text": "second"}]))
    recs = list(read_records(discover([tmp_path / "bom.jsonl"])[0][0]))
    assert [(r.text, r.line) for r in recs] == [("first", 1), ("second", 2)]


def test_lone_surrogate_in_source_name_becomes_replacement_character(tmp_path: Path):
    # JSON may escape a lone surrogate; as in the text, it becomes U+FFFD instead of failing the
    # whole part when the source id (CRC-32 of the UTF-8 name) is computed.
    (tmp_path / "s.jsonl").write_bytes(b'{"text": "hi", "meta": {"redpajama_set_name": "Web\\ud800"}}\n')
    (rec,) = read_records(discover([tmp_path / "s.jsonl"])[0][0])
    assert (rec.text, rec.source) == ("hi", "Web\ufffd")
    rec.source.encode("utf-8")


def test_deeply_nested_json_line_is_a_bad_record_not_a_crash(tmp_path: Path):
    deep = b"[" * 100_000 + b"]" * 100_000
    (tmp_path / "d.jsonl").write_bytes(_jsonl([{"text": "before"}]) + deep + b"\n" + _jsonl([{"text": "after"}]))
    recs = list(read_records(discover([tmp_path / "d.jsonl"])[0][0]))
    assert [r.text for r in recs if isinstance(r, Record)] == ["before", "after"]
    assert [(r.reason, r.line) for r in recs if isinstance(r, BadRecord)] == [("invalid_json", 2)]


def test_broken_symlink_to_an_input_is_an_error_not_silently_skipped(tmp_path: Path):
    # git-annex / DVC checkouts hold not-yet-fetched files as dangling links.
    (tmp_path / "a.jsonl").write_bytes(_jsonl([{"text": "x"}]))
    (tmp_path / "b.jsonl.zst").symlink_to(tmp_path / "store" / "missing-object")
    with pytest.raises(FileNotFoundError, match=r"b\.jsonl\.zst is a broken symbolic link"):
        discover([tmp_path])


def test_unsupported_files_among_the_inputs_are_reported_as_ignored(tmp_path: Path):
    # e.g. .jsonl.xz or .json files next to supported ones: not read, so they must be named.
    split = tmp_path / "train" / "chunk1"
    split.mkdir(parents=True)
    (split / "a.jsonl").write_bytes(_jsonl([{"text": "x"}]))
    (split / "b.jsonl.xz").write_bytes(b"xz")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "c.jsonl").write_bytes(_jsonl([{"text": "y"}]))
    (tmp_path / "flat" / "d.json").write_bytes(_jsonl([{"text": "z"}]))
    items, ignored = discover([tmp_path / "train", tmp_path / "flat"])
    assert [i.part for i in items] == ["c.jsonl", "chunk1/a.jsonl"]
    assert sorted(Path(f).name for f in ignored) == ["b.jsonl.xz", "d.json"]
