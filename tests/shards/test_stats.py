"""Relative-position frequency against brute force, and `slimpack shards stats` on real shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimpack.cli import main
from slimpack.shards import schema
from slimpack.shards.stats import (
    compute_stats,
    distance_frequency,
    label_segment_counts,
    percentiles_from_counts,
    segment_length_counts,
    unmasked_distance_frequency,
)


def brute_force(lengths: list[int], seq_len: int, *, labels_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Count every (query, key) pair in every complete window: masked and unmasked. With
    `labels_only`, masked pairs count only where the query has a label (its next token is not a
    document start: the loader's rule)."""
    doc = np.repeat(np.arange(len(lengths)), lengths)
    doc_start = np.zeros(len(doc) + 1, bool)
    doc_start[np.cumsum([0, *lengths])] = True
    windows = max(0, (len(doc) - 1) // seq_len)
    masked = np.zeros(seq_len, np.int64)
    unmasked = np.zeros(seq_len, np.int64)
    for g in range(windows):
        lo = g * seq_len
        for p in range(lo, lo + seq_len):
            for q in range(lo, p + 1):
                unmasked[p - q] += 1
                masked[p - q] += doc[p] == doc[q] and not (labels_only and doc_start[p + 1])
    return masked, unmasked


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(1, 17))
def test_distance_frequency_equals_brute_force(lengths: list[int], seq_len: int) -> None:
    total = sum(lengths)
    end = max(0, (total - 1) // seq_len) * seq_len
    masked = distance_frequency(segment_length_counts(np.array(lengths), seq_len=seq_len, stream_end=end))
    want_masked, want_unmasked = brute_force(lengths, seq_len)
    np.testing.assert_array_equal(masked, want_masked)
    np.testing.assert_array_equal(unmasked_distance_frequency(end // seq_len, seq_len), want_unmasked)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(1, 17))
def test_label_pairs_equal_brute_force(lengths: list[int], seq_len: int) -> None:
    """The loader masks a document's EOS label: stats counts only pairs whose query has a label."""
    total = sum(lengths)
    end = max(0, (total - 1) // seq_len) * seq_len
    starts = np.cumsum([0, *lengths])[:-1]
    got = distance_frequency(label_segment_counts(starts, np.array(lengths), seq_len=seq_len, stream_end=end))
    np.testing.assert_array_equal(got, brute_force(lengths, seq_len, labels_only=True)[0])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=2, max_size=30), st.integers(1, 17), st.data())
def test_segments_add_up_over_chunks(lengths: list[int], seq_len: int, data: st.DataObject) -> None:
    """Shards counted separately from their stream offsets sum to the whole (the parallel path)."""
    cut = data.draw(st.integers(1, len(lengths) - 1))
    total = sum(lengths)
    end = max(0, (total - 1) // seq_len) * seq_len
    whole = segment_length_counts(np.array(lengths), seq_len=seq_len, stream_end=end)
    a = segment_length_counts(np.array(lengths[:cut]), seq_len=seq_len, stream_end=end)
    b = segment_length_counts(np.array(lengths[cut:]), seq_len=seq_len, stream_start=sum(lengths[:cut]),
                              stream_end=end)
    np.testing.assert_array_equal(a + b, whole)


def test_long_document_spanning_many_windows() -> None:
    # One 10-token document then a 1-token one, L = 4: windows [0,4) [4,8): two whole segments.
    c = segment_length_counts(np.array([10, 1]), seq_len=4, stream_end=8)
    assert c.tolist() == [0, 0, 0, 0, 2]
    assert distance_frequency(c).tolist() == [8, 6, 4, 2]


def test_percentiles_nearest_rank() -> None:
    values, counts = np.array([1, 2, 10]), np.array([2, 1, 1])  # multiset 1 1 2 10
    p = percentiles_from_counts(values, counts, (0, 25, 50, 51, 75, 100))
    assert p == {"p0": 1, "p25": 1, "p50": 1, "p51": 2, "p75": 2, "p100": 10}


def test_stats_on_real_shards(dataset: Path, tmp_path: Path) -> None:
    manifest = json.loads((dataset / schema.MANIFEST_FILENAME).read_text())
    one = compute_stats(dataset, seq_lens=(64, 256), workers=1)
    assert (one.documents, one.tokens) == (manifest["documents"], manifest["tokens"])
    assert {n: (s["documents"], s["tokens"]) for n, s in one.per_source.items()} == {
        n: (s["documents"], s["tokens"]) for n, s in manifest["per_source"].items()}
    assert {n: s["tokens"] for n, s in one.per_split.items()} == {
        n: s["tokens"] for n, s in manifest["per_split"].items()}
    assert sum(one.doc_length["histogram"]["counts"]) == one.documents

    # The position frequency counts the train split only, in the loader's epoch-0 order: equal to
    # the count over the train documents read with the plain MDS reader in that order.
    from slimpack.pipeline.index import load_index
    from slimpack.pipeline.loader import loader_fingerprint
    from slimpack.pipeline.order import epoch_order
    from slimpack.shards.mds import MDSDataset

    index, ds = load_index(str(dataset)), MDSDataset(dataset)
    train = index.split_samples("train")
    order = epoch_order(len(train), seed=0, epoch=0, fingerprint=loader_fingerprint(index.fingerprint, "train"))
    lengths = np.concatenate([np.diff(ds[int(train[k])]["cu_seqlens"]) for k in order]).astype(np.int64)
    pf = one.position_frequency["64"]
    assert pf["split"] == "train" and pf["tokens_in_windows"] + pf["tokens_dropped"] == lengths.sum()
    assert pf["windows"] == (int(lengths.sum()) - 1) // 64 < one.tokens // 64
    c = label_segment_counts(np.cumsum(lengths) - lengths, lengths, seq_len=64, stream_end=pf["tokens_in_windows"])
    assert pf["masked"] == distance_frequency(c).tolist()
    prefix = lengths[:60]  # brute force is quadratic in the window length: a prefix of real lengths
    masked, _ = brute_force(prefix.tolist(), 64, labels_only=True)
    c = label_segment_counts(np.cumsum(prefix) - prefix, prefix, seq_len=64,
                             stream_end=(int(prefix.sum()) - 1) // 64 * 64)
    np.testing.assert_array_equal(distance_frequency(c), masked)
    # Masking never adds pairs; at distance 0 every window position is a pair without masking, and
    # with it every position but the EOS whose label is masked.
    assert all(m <= u for m, u in zip(pf["masked"], pf["unmasked"], strict=True))
    assert pf["unmasked"][0] == pf["tokens_in_windows"]
    eos_in_windows = int(np.sum(np.cumsum(lengths) <= pf["tokens_in_windows"]))
    assert pf["masked"][0] == pf["tokens_in_windows"] - eos_in_windows
    other = compute_stats(dataset, seq_lens=(64,), workers=1, seed=1).position_frequency["64"]
    assert other["windows"] == pf["windows"] and other["masked"] != pf["masked"]  # another order

    two = compute_stats(dataset, seq_lens=(64, 256), workers=2)
    assert {**two.to_dict(), "seconds": 0} == {**one.to_dict(), "seconds": 0}

    out = tmp_path / "stats.json"
    plots = tmp_path / "plots"
    assert main(["shards", "stats", str(dataset), "--seq-len", "64", "128", "--workers", "1",
                 "--split", "validation", "--json", str(out), "--plots", str(plots)]) == 0
    pf = json.loads(out.read_text())["position_frequency"]["128"]
    assert len(pf["masked"]) == 128 and pf["split"] == "validation"
    assert pf["tokens_in_windows"] + pf["tokens_dropped"] == manifest["per_split"]["validation"]["tokens"]
    for name in ("doc_lengths.png", "position_frequency.png", "sources.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stats_on_a_missing_empty_or_unmerged_directory_is_a_clean_error(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from slimpack import exitcodes
    from slimpack.tokenize.job import TokenizeConfig, run_tokenize

    (tmp_path / "empty").mkdir()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("")  # merges into a dataset of no documents
    assert run_tokenize([str(tmp_path / "in")], str(tmp_path / "nodocs"), TokenizeConfig(),
                        progress=False).merged
    for path, fragment in ((tmp_path / "nowhere", "does not exist"),
                           (tmp_path / "empty", "slimpack.json does not exist"),
                           (tmp_path / "nodocs", "holds no documents")):
        assert main(["shards", "stats", str(path), "--workers", "1"]) == exitcodes.UNUSABLE
        err = capsys.readouterr().err
        assert err.startswith("slimpack shards stats: error: ") and err.count("\n") == 1, err
        assert str(path) in err and fragment in err
