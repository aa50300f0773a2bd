"""`slimpack shards validate` on real shards: a clean copy passes, every corruption is caught."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from shard_corruption import edit_json, edit_raw, edit_sample, entries, stored_path

from slimpack.cli import main
from slimpack.shards import mds, schema
from slimpack.shards.validate import validate_dataset

VOCAB, BOS = 128_256, 128_000


def findings(root: Path, **kwargs) -> list:
    report = validate_dataset(root, **kwargs)
    assert report.unusable is None, report.unusable
    return report.findings


def assert_found(root: Path, check: str, fragment: str, **kwargs) -> None:
    report = validate_dataset(root, **kwargs)
    assert report.exit_status == 1, report.summary()
    hits = [f for f in report.findings if f.check == check and fragment in f.message]
    assert hits, f"no [{check}] finding containing {fragment!r}:\n{report.summary()}"
    assert all(f.hint for f in report.findings)


def a_sample_with_docs(root: Path, docs: int) -> tuple[int, int]:
    """(shard, sample) of the first sample holding at least `docs` documents."""
    for i, e in enumerate(entries(root)):
        shard = mds.load_shard(root, mds.parse_index({"version": 2, "shards": [e]})[0])
        for k in range(len(shard)):
            if len(shard.sample(k)["cu_seqlens"]) - 1 >= docs:
                return i, k
    raise AssertionError("fixture has no such sample")


def test_clean_copy_passes(copy: Path) -> None:
    report = validate_dataset(copy, all_hashes=True, retokenize=10_000)
    assert report.ok and report.exit_status == 0, report.summary()
    manifest = json.loads((copy / schema.MANIFEST_FILENAME).read_text())
    assert report.documents == manifest["documents"] and report.tokens == manifest["tokens"]
    assert report.retokenized == manifest["documents"]  # every document re-tokenized and equal
    assert report.hash_algorithms == ["xxh3_64", "sha1"]
    assert report.shards > 6 and report.samples > report.shards  # the fixture exercises the layout


def test_truncated_shard(copy: Path) -> None:
    path = stored_path(copy, 1)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_found(copy, "size", "compressed file is")
    assert_found(copy, "decompress", "zstd decompression failed")


def test_flipped_payload_byte(copy: Path) -> None:
    path = stored_path(copy, 2)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert_found(copy, "hash", "xxh3_64 of the compressed file is")


def test_flipped_header_byte(copy: Path) -> None:
    def flip(raw: bytearray) -> None:
        raw[0] ^= 0x02  # the sample count

    edit_raw(copy, 0, flip)
    assert_found(copy, "header", "the shard header says")


def test_offsets_out_of_bounds(copy: Path) -> None:
    def flip(raw: bytearray) -> None:
        n = int(np.frombuffer(raw, np.uint32, 1)[0])
        raw[4 + 4 * n + 3] ^= 0x40  # the last offset's high byte: far past the end

    edit_raw(copy, 0, flip)
    assert_found(copy, "header", "sample offsets are not monotonic and in bounds")


def test_deleted_shard(copy: Path) -> None:
    stored_path(copy, 3).unlink()
    assert_found(copy, "missing_shard", "does not exist")


def test_unlisted_shard(copy: Path) -> None:
    src = stored_path(copy, 0)
    shutil.copyfile(src, src.with_name("shard.00099.mds.zstd"))
    assert_found(copy, "unlisted_shard", "shard.00099.mds.zstd is on disk but in no index entry")


def test_wrong_hash_in_index(copy: Path) -> None:
    def wrong(index: dict) -> None:
        index["shards"][4]["raw_data"]["hashes"]["xxh3_64"] = "0123456789abcdef"

    edit_json(copy / schema.INDEX_FILENAME, wrong)
    assert_found(copy, "hash", "the index says 0123456789abcdef")
    assert_found(copy, "manifest", "fingerprint")  # the fingerprint covers the hashes
    assert_found(copy, "index", "differs from the merged index.json")


def test_cu_seqlens_out_of_order(copy: Path) -> None:
    i, k = a_sample_with_docs(copy, 3)

    def swap(s: dict) -> None:
        s["cu_seqlens"][[1, 2]] = s["cu_seqlens"][[2, 1]]

    edit_sample(copy, i, k, swap)
    found = findings(copy)
    assert [(f.check, f.sample) for f in found] == [("sample", k)], found  # only this, located
    assert "cu_seqlens is not strictly increasing at document 1 (out of order" in found[0].message


def test_id_equal_to_vocab_size(copy: Path) -> None:
    def bump(s: dict) -> None:
        s["tokens"][5] = VOCAB

    edit_sample(copy, 1, 0, bump)
    assert_found(copy, "sample", f"token id {VOCAB} >= vocab size {VOCAB} (first at position 5)")


def test_bos_inside_document(copy: Path) -> None:
    def bos(s: dict) -> None:
        s["tokens"][7] = BOS

    edit_sample(copy, 2, 0, bos)
    assert_found(copy, "sample", "BOS inside document 0 at position 7")


def test_missing_eos_and_empty_document(copy: Path) -> None:
    i, k = a_sample_with_docs(copy, 2)

    def no_eos(s: dict) -> None:
        s["tokens"][s["cu_seqlens"][1] - 1] = 100

    edit_sample(copy, i, k, no_eos)
    assert_found(copy, "sample", "document 0 does not end with EOS")


def test_manifest_count_off_by_one(copy: Path) -> None:
    manifest = json.loads((copy / schema.MANIFEST_FILENAME).read_text())

    def off(m: dict) -> None:
        m["documents"] += 1
        name = sorted(m["per_source"])[0]
        m["per_source"][name]["tokens"] -= 1

    edit_json(copy / schema.MANIFEST_FILENAME, off)
    assert_found(copy, "manifest", f"documents: slimpack.json says {manifest['documents'] + 1}, "
                                   f"the shards hold {manifest['documents']}")
    assert_found(copy, "manifest", "tokens: slimpack.json says")


def test_sample_tokens_file_off(copy: Path) -> None:
    tokens = np.load(copy / schema.SAMPLE_TOKENS_FILENAME)
    tokens[3] += 1
    np.save(copy / schema.SAMPLE_TOKENS_FILENAME, tokens)
    assert_found(copy, "manifest", f"first at sample 3: recorded {tokens[3]}, counted {tokens[3] - 1}")


def test_pickle_column(copy: Path) -> None:
    def pickle(index: dict) -> None:
        index["shards"][0]["column_encodings"][1] = "pkl"

    edit_json(copy / schema.INDEX_FILENAME, pickle)
    assert_found(copy, "columns", "column 'doc_sources' uses encoding 'pkl'")


def test_embedded_config_differs(copy: Path) -> None:
    def limit(index: dict) -> None:
        index["shards"][0]["size_limit"] = 123

    edit_json(copy / schema.INDEX_FILENAME, limit)
    assert_found(copy, "shard_config", "size_limit is 32768 in the shard, 123 in the index")


def test_malformed_index_entries(copy: Path) -> None:
    def break_entries(index: dict) -> None:
        del index["shards"][1]["column_sizes"]
        index["shards"][2] = "not an entry"

    edit_json(copy / schema.INDEX_FILENAME, break_entries)
    report = validate_dataset(copy)
    assert report.exit_status == 1 and report.unusable is None
    assert [f.message for f in report.findings if f.check == "index"][:2] == [
        "index entry 1 is malformed (KeyError('column_sizes'))",
        "index entry 2 is malformed (AttributeError(\"'str' object has no attribute 'get'\"))"]
    assert any("were not compared with slimpack.json" in n for n in report.notes)


def test_unusable_inputs(copy: Path, tmp_path: Path) -> None:
    assert "is not a local directory" in validate_dataset(tmp_path / "nowhere").unusable
    (copy / schema.INDEX_FILENAME).write_text("{truncated")
    assert "is not readable JSON" in validate_dataset(copy).unusable
    (copy / schema.INDEX_FILENAME).write_text(json.dumps({"shards": []}))
    assert "not an MDS v2 index" in validate_dataset(copy).unusable
    (copy / schema.MANIFEST_FILENAME).unlink()
    report = validate_dataset(copy)
    assert report.exit_status == 3 and "slimpack shards merge" in report.unusable


def test_parts_missing_and_extra(copy: Path) -> None:
    extra = copy / schema.PARTS_DIRNAME / "train" / "chunk9" / "example_train_0.jsonl.zst"
    shutil.copytree(copy / schema.PARTS_DIRNAME / "train" / "chunk1" / "example_train_0.jsonl.zst", extra)
    assert_found(copy, "part", "parts/train/chunk9/example_train_0.jsonl.zst/ is on disk but in neither")

    def drop(m: dict) -> None:
        m["parts"]["train/chunk1/example_train_1_gone"] = m["parts"]["train/chunk1/example_train_1.jsonl.zst"]

    edit_json(copy / schema.MANIFEST_FILENAME, drop)
    assert_found(copy, "part", "part train/chunk1/example_train_1_gone is in slimpack.json but no "
                               "index.json entry lists its shards (its directory is missing too)")


def test_retokenize_finds_changed_ids_with_location(copy: Path) -> None:
    def change(s: dict) -> None:
        s["tokens"][3] = 1000 if s["tokens"][3] != 1000 else 1001  # still a valid sample

    edit_sample(copy, 0, 0, change)
    assert not findings(copy)  # structurally sound: only re-tokenization can tell
    report = validate_dataset(copy, retokenize=10_000)
    bad = [f for f in report.findings if f.check == "retokenize"]
    assert len(bad) == 1, report.summary()
    part = entries(copy)[0]["zip_data"]["basename"].split("/")[1:-1]
    assert bad[0].part == "/".join(part) and bad[0].sample == 0
    # document 0 of the first part is line 1 of its input file; first difference at token 3
    assert "document 0 (" in bad[0].message and ".jsonl.zst:1)" in bad[0].message
    assert "first difference at token 3" in bad[0].message


def test_retokenize_skips_unreachable_sources(copy: Path, tmp_path: Path) -> None:
    for stats in (copy / schema.PARTS_DIRNAME).rglob(schema.PART_STATS_FILENAME):
        edit_json(stats, lambda s: s["input"].update(path=str(tmp_path / "gone.jsonl.zst")))
    report = validate_dataset(copy, retokenize=5)
    assert report.ok and report.retokenized == 0
    assert any("is not reachable" in n for n in report.notes)


def test_workers_agree(copy: Path) -> None:
    stored_path(copy, 3).unlink()
    one = validate_dataset(copy, workers=1)
    two = validate_dataset(copy, workers=2)
    assert one.findings == two.findings and one.findings


def test_cli_exit_statuses_and_json(copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report.json"
    assert main(["shards", "validate", str(copy), "--workers", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["ok"] is True
    stored_path(copy, 0).unlink()
    assert main(["shards", "validate", str(copy), "--workers", "1", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["finding_counts"]["missing_shard"] == 1 and report["findings"][0]["hint"]
    assert "missing_shard" in capsys.readouterr().out
    (copy / schema.INDEX_FILENAME).unlink()
    assert main(["shards", "validate", str(copy), "--workers", "1"]) == 3
    assert "UNUSABLE INPUT" in capsys.readouterr().out


def test_parts_whose_every_record_was_skipped_are_valid(tmp_path: Path) -> None:
    """A part with no documents (empty file, or every record bad) has no shards; that is clean."""
    from slimpack.tokenize.job import TokenizeConfig, run_tokenize

    corpus = tmp_path / "corpus"
    (corpus / "train").mkdir(parents=True)
    (corpus / "validation").mkdir()
    (corpus / "train" / "a.jsonl").write_text('{"text": "hello world"}\n{"text": 5}\n')
    (corpus / "train" / "b.jsonl").write_text('{"x": 1}\nnot json\n')  # every record skipped
    (corpus / "validation" / "c.jsonl").write_text("")  # a split holding only an empty part
    report = run_tokenize([str(corpus)], str(tmp_path / "ds"), TokenizeConfig(), progress=False)
    assert report.ok and report.merged, report.summary()
    result = validate_dataset(tmp_path / "ds")
    assert result.ok and result.exit_status == 0, result.summary()
    assert result.documents == 1

    # An empty part is still checked against its own stats.json.
    stats = tmp_path / "ds" / "parts" / "train" / "b.jsonl" / "stats.json"
    edit = json.loads(stats.read_text())
    edit["documents"] = 3
    stats.write_text(json.dumps(edit))
    assert_found(tmp_path / "ds", "part", "parts/train/b.jsonl/stats.json says documents = 3")
