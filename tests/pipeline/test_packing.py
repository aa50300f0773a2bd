"""Packing arithmetic against a per-token reference, and layout checks."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimpack.pipeline import check_layout
from slimpack.pipeline.packing import IGNORE_INDEX, pack_slice, sequence_start


def reference_pack(flat, doc_starts, seq_len):
    """Per-token loops, written from the spec, not from pack_slice."""
    n = len(flat) - 1
    starts = set(int(s) for s in doc_starts)
    inputs, labels, positions, bounds = [], [], [], []
    pos = 0
    for i in range(n):
        if i % seq_len == 0 or i in starts:
            pos = 0
            bounds.append(i)
        inputs.append(int(flat[i]))
        labels.append(IGNORE_INDEX if (i + 1) in starts else int(flat[i + 1]))
        positions.append(pos)
        pos += 1
    bounds.append(n)
    return inputs, labels, positions, bounds, max(b - a for a, b in itertools.pairwise(bounds))


@settings(max_examples=200, deadline=None)
@given(seq_len=st.integers(1, 17), m=st.integers(1, 5),
       doc_lens=st.lists(st.integers(1, 30), min_size=1, max_size=40), skip=st.integers(0, 30))
def test_pack_slice_matches_reference(seq_len, m, doc_lens, skip):
    # A stream of documents; the slice starts `skip` tokens in, so it may begin mid-document.
    cu = np.concatenate([[0], np.cumsum(doc_lens)])
    need = skip + m * seq_len + 1
    if cu[-1] < need:
        cu = np.concatenate([cu, [need + 5]])
    stream = np.arange(cu[-1], dtype=np.int64) * 7 + 3
    flat = stream[skip:skip + m * seq_len + 1]
    starts = cu[:-1][(cu[:-1] >= skip) & (cu[:-1] < skip + len(flat))] - skip
    out = pack_slice(flat, starts.astype(np.int64), seq_len)
    inputs, labels, positions, bounds, max_seqlen = reference_pack(flat, starts, seq_len)
    assert out["input_ids"].tolist() == inputs
    assert out["labels"].tolist() == labels
    assert out["position_ids"].tolist() == positions
    assert out["cu_seqlens"].tolist() == bounds and out["cu_seqlens"].dtype == np.int32
    assert out["max_seqlen"] == max_seqlen and type(out["max_seqlen"]) is int
    assert len(out["input_ids"]) == m * seq_len  # nothing padded


def test_rank_rule_tiles_the_step():
    g, m = 48, 3
    for w in (1, 2, 4, 8):
        a = g // (w * m)
        seqs = sorted(s for j in range(a) for r in range(w)
                      for s in range(sequence_start(5, j, r, world_size=w, micro_batch_size=m,
                                                    sequences_per_step=g),
                                     sequence_start(5, j, r, world_size=w, micro_batch_size=m,
                                                    sequences_per_step=g) + m))
        assert seqs == list(range(5 * g, 6 * g))


def test_layout_derives_grad_accum_and_proposes_fixes():
    assert check_layout(seq_len=2048, global_batch_tokens=4_194_304, micro_batch_size=8, world_size=16) == 16
    assert check_layout(seq_len=4096, global_batch_tokens=4_194_304, micro_batch_size=4, world_size=16) == 16
    with pytest.raises(ValueError, match=r"not a multiple of seq_len 2048; use one of \[4192256, 4194304\]"):
        check_layout(seq_len=2048, global_batch_tokens=4_194_000, micro_batch_size=8, world_size=16)
    with pytest.raises(ValueError, match=r"micro_batch_size in .*for world_size 3.*global_batch_tokens in"):
        check_layout(seq_len=2048, global_batch_tokens=2048 * 48, micro_batch_size=5, world_size=3)
    with pytest.raises(ValueError, match=r"world_size 5.*global_batch_tokens in \[2007040, 2048000\]"):
        check_layout(seq_len=2048, global_batch_tokens=2048 * 1000 - 2048 * 20 + 2048 * 2, micro_batch_size=4,
                     world_size=5)
