"""The position-frequency ledger: its arithmetic against brute force over real packed micro-batches,
one epoch of it against `slimpack shards stats`, and its persistence (hash-checked).

The training-loop side (2 gloo ranks sum to the 1-rank count, resume bitwise) is in test_loop.py.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimpack.pipeline import packing
from slimpack.shards.stats import distance_frequency
from slimpack.train.ledger import FILENAME, PositionLedger, step_segment_counts


def _brute_force(mb: dict, seq_len: int) -> np.ndarray:
    """Every (query, key) pair inside one attention segment whose query has a label."""
    f = np.zeros(seq_len, np.int64)
    cu = mb["cu_seqlens"].tolist()
    for a, b in itertools.pairwise(cu):
        for q in range(a, b):
            if mb["labels"][q] != packing.IGNORE_INDEX:
                for k in range(a, q + 1):
                    f[q - k] += 1
    return f


def _micro_batch(lengths: list[int], seq_len: int, sequences: int, offset: int) -> dict:
    """A real packed micro-batch (packing.pack_slice) of `sequences` windows from stream offset
    `offset` of documents with these lengths (tokens are their document numbers)."""
    starts = np.cumsum([0, *lengths])[:-1]
    stream = np.repeat(np.arange(len(lengths)), lengths)
    flat = stream[offset:offset + sequences * seq_len + 1]
    inside = starts[(starts >= offset) & (starts < offset + len(flat))] - offset
    return packing.pack_slice(flat.astype(np.int64), inside.astype(np.int64), seq_len)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=25), st.integers(1, 12), st.integers(1, 3),
       st.data())
def test_step_counts_equal_brute_force(lengths: list[int], seq_len: int, sequences: int,
                                       data: st.DataObject) -> None:
    total = sum(lengths)
    if total < sequences * seq_len + 1:
        lengths = lengths + [sequences * seq_len + 1 - total]  # enough stream for the windows
        total = sum(lengths)
    offset = data.draw(st.integers(0, total - sequences * seq_len - 1))
    mbs = [_micro_batch(lengths, seq_len, sequences, offset), _micro_batch(lengths, seq_len, 1, 0)]
    ledger = PositionLedger(seq_len)
    ledger.add_segments(step_segment_counts(mbs, seq_len))
    np.testing.assert_array_equal(ledger.frequency, sum(_brute_force(mb, seq_len) for mb in mbs))
    # f(0) is the count of valid labels: the tokens the loss is averaged over.
    assert ledger.frequency[0] == sum(int((mb["labels"] != packing.IGNORE_INDEX).sum()) for mb in mbs)
    # Without document masking every window is one causal segment: all pairs (q >= k) of each window.
    assert ledger.windows == sequences + 1
    unmasked = np.zeros(seq_len, np.int64)
    for q in range(seq_len):
        for k in range(q + 1):
            unmasked[q - k] += sequences + 1
    np.testing.assert_array_equal(ledger.unmasked, unmasked)


def test_one_epoch_of_the_loader_equals_shards_stats(train_data: Path) -> None:
    """Feeding the ledger every step of one epoch of the train split gives `shards stats` exactly."""
    from slimpack.pipeline import LoaderConfig, PackedLoader
    from slimpack.shards.stats import compute_stats

    L = 64
    for seed in (0, 3):
        loader = PackedLoader(LoaderConfig(str(train_data), seq_len=L, global_batch_tokens=L, micro_batch_size=1,
                                           seed=seed, epochs=1))
        # One sequence per step: the epoch's whole steps are exactly its windows.
        assert len(loader) == loader.epoch_report()["sequences_per_epoch"]
        ledger = PositionLedger(L)
        for micro_batches in loader:
            ledger.add_segments(step_segment_counts(micro_batches, L))
        pf = compute_stats(train_data, seq_lens=(L,), workers=1, seed=seed).position_frequency[str(L)]
        assert pf["windows"] == ledger.steps == ledger.windows
        assert ledger.frequency.tolist() == pf["masked"] and ledger.unmasked.tolist() == pf["unmasked"]


def test_ledger_summary_and_persistence(tmp_path: Path) -> None:
    ledger = PositionLedger(8)
    counts = np.zeros(10, np.int64)
    counts[[8, 3, 9]] = [2, 1, 3]  # two whole-window segments, one of 3; three windows
    ledger.add_segments(counts)
    np.testing.assert_array_equal(ledger.frequency, distance_frequency(counts[:-1]))
    assert ledger.frequency.tolist() == [19, 16, 13, 10, 8, 6, 4, 2]
    assert ledger.unmasked.tolist() == [24, 21, 18, 15, 12, 9, 6, 3]
    assert ledger.summary() == {"pf_half": 8, "pf_three_quarters": 4, "pf_last": 2,
                                "pf_far_share": pytest.approx(20 / 78), "pf_unmasked_half": 12,
                                "pf_unmasked_three_quarters": 6, "pf_unmasked_last": 3}
    with pytest.raises(ValueError, match=r"segment counts of shape \(9,\), expected \(10,\)"):
        ledger.add_segments(counts[:-1])

    data = ledger.to_bytes()
    meta = ledger.meta()
    (tmp_path / FILENAME).write_bytes(data)
    restored = PositionLedger(8)
    restored.load(tmp_path, meta, windows_per_step=99)
    assert restored.frequency.dtype == np.int64 and restored.steps == 1 and restored.windows == 3
    np.testing.assert_array_equal(restored.frequency, ledger.frequency)
    legacy = PositionLedger(8)  # saved before the window count was recorded: steps x windows per step
    legacy.load(tmp_path, {k: v for k, v in meta.items() if k != "windows"}, windows_per_step=5)
    assert legacy.windows == 5 and legacy.unmasked[0] == 40

    with pytest.raises(ValueError, match=r"seq_len 8, this run has data\.seq_len=16"):
        PositionLedger(16).load(tmp_path, meta, windows_per_step=1)
    with pytest.raises(ValueError, match="no position-frequency ledger"):
        PositionLedger(8).load(tmp_path, None, windows_per_step=1)
    (tmp_path / FILENAME).unlink()
    with pytest.raises(FileNotFoundError, match="is missing"):
        PositionLedger(8).load(tmp_path, meta, windows_per_step=1)
