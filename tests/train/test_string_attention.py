"""STRING attention: the fused decomposition (sliding window + shifted queries, merged by log-sum-exp)
equals the dense fp32 reference that rotates every (query, key) pair by the remapped P[i, j], on
packed documents shorter than, equal to and longer than the shift, with GQA."""

from __future__ import annotations

import pytest
import torch

from slimpack.train.attention import attention
from slimpack.train.model import apply_rope, rope_cos_sin
from slimpack.train.string_attention import (
    StringConfig,
    string_attention,
    string_attention_dense,
    string_positions,
)

THETA = 10_000.0


def test_positions_keep_small_distances_and_shift_the_rest():
    P = string_positions(8, StringConfig(shift=4, window=2))
    # Row 7: distances 7..0 -> d >= 4 become d - 4 + 2: 5 4 3 2 | 3 2 1 0
    assert P[7].tolist() == [5, 4, 3, 2, 3, 2, 1, 0]
    assert P[3].tolist() == [3, 2, 1, 0, -1, -1, -1, -1]  # no distance reaches S yet
    assert string_positions(4, None)[3].tolist() == [3, 2, 1, 0]


def test_config_refuses_a_window_not_below_the_shift():
    with pytest.raises(ValueError, match="0 <= window < shift"):
        StringConfig(shift=4, window=4)


def _inputs(lengths, heads=4, kv_heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q = torch.randn(T, heads, dim, generator=g)
    k = torch.randn(T, kv_heads, dim, generator=g)
    v = torch.randn(T, kv_heads, dim, generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, pos, cu


def _rotated(q, k, pos, string):
    cos, sin = rope_cos_sin(pos, q.shape[-1], THETA)
    cos_s, sin_s = rope_cos_sin(pos - string.shift + string.window, q.shape[-1], THETA)
    return apply_rope(q, cos, sin), apply_rope(q, cos_s, sin_s), apply_rope(k, cos, sin)


@pytest.mark.parametrize("shift,window", [(5, 2), (8, 0), (3, 1), (16, 15)])
def test_reference_path_equals_dense(shift, window):
    lengths = [17, 5, 1, 6, 30]  # shorter than S, equal to S, S + 1, much longer
    q, k, v, pos, cu = _inputs(lengths)
    string = StringConfig(shift=shift, window=window)
    q_d, q_s, k_r = _rotated(q, k, pos, string)
    got = string_attention(q_d, q_s, k_r, v, cu, max(lengths), string=string, backend="sdpa_ref")
    want = string_attention_dense(q, k, v, cu, string=string, rope_theta=THETA)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_dense_reference_in_row_blocks_equals_one_block():
    lengths = [13, 6]
    q, k, v, _, cu = _inputs(lengths)
    string = StringConfig(shift=5, window=2)
    torch.testing.assert_close(string_attention_dense(q, k, v, cu, string=string, rope_theta=THETA, rows_per_block=4),
                               string_attention_dense(q, k, v, cu, string=string, rope_theta=THETA))


def test_dense_reference_without_string_is_ordinary_attention():
    lengths = [9, 4]
    q, k, v, pos, cu = _inputs(lengths)
    cos, sin = rope_cos_sin(pos, q.shape[-1], THETA)
    plain = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, cu, 9, backend="sdpa_ref")
    torch.testing.assert_close(string_attention_dense(q, k, v, cu, string=None, rope_theta=THETA), plain,
                               rtol=1e-5, atol=1e-5)


def test_string_changes_long_documents_only():
    lengths = [4, 12]
    q, k, v, _, cu = _inputs(lengths)
    string = StringConfig(shift=4, window=1)
    with_string = string_attention_dense(q, k, v, cu, string=string, rope_theta=THETA)
    without = string_attention_dense(q, k, v, cu, string=None, rope_theta=THETA)
    torch.testing.assert_close(with_string[:8], without[:8])  # distances < 4 everywhere up to row 3 of doc 2
    assert not torch.allclose(with_string[8:], without[8:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shift,window", [(64, 16), (200, 128)])
def test_fused_varlen_equals_dense_on_gpu(shift, window):
    lengths = [300, 64, 65, 1, 513]
    q, k, v, pos, cu = (x.cuda() for x in _inputs(lengths, heads=8, kv_heads=2, dim=64))
    string = StringConfig(shift=shift, window=window)
    q_d, q_s, k_r = _rotated(q, k, pos, string)
    bf16 = [x.bfloat16() for x in (q_d, q_s, k_r, v)]
    fused = string_attention(*bf16, cu, max(lengths), string=string, backend="varlen").float()
    ref16 = string_attention(*bf16, cu, max(lengths), string=string, backend="sdpa_ref").float()
    want = string_attention_dense(q, k, v, cu, string=string, rope_theta=THETA)

    def rel(a):
        return ((a - want).abs().max() / want.abs().max()).item()

    # The budget: twice what rounding the inputs to bf16 costs the exact reference path, as the
    # training backends' GPU tests allow.
    assert rel(fused) < max(2 * rel(ref16), 1e-2), (rel(fused), rel(ref16))
