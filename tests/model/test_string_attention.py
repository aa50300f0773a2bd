"""STRING attention: the fused decomposition (sliding window + shifted queries, merged by log-sum-exp)
equals the dense fp32 reference that rotates every (query, key) pair by the remapped P[i, j], on
packed documents shorter than, equal to and longer than the shift, with GQA; and the reference
equals a row-by-row softmax written from the paper code's rules (its logit scale, its inclusive
diagonal window)."""


from __future__ import annotations

import math

import pytest
import torch

from slimpack.model.attention import attention
from slimpack.model.string_attention import (
    StringConfig,
    string_attention,
    string_attention_dense,
    string_positions,
)
from slimpack.model.transformer import apply_rope, rope_cos_sin

THETA = 10_000.0


def test_positions_keep_small_distances_and_shift_the_rest():
    P = string_positions(8, StringConfig(shift=4, window=2))
    # Row 7: distances 7..0 -> d >= 4 become d - 4 + 2: 5 4 3 2 | 3 2 1 0
    assert P[7].tolist() == [5, 4, 3, 2, 3, 2, 1, 0]
    assert P[3].tolist() == [3, 2, 1, 0, -1, -1, -1, -1]  # no distance reaches S yet
    assert string_positions(4, None)[3].tolist() == [3, 2, 1, 0]


def test_config_defaults_follow_the_paper_code_and_refuse_nonsense():
    string = StringConfig(shift=4)
    assert string.window == 128 and string.overlap  # W = 128 > S is allowed, as the paper's code runs it
    assert string.scale == pytest.approx(0.1 * math.log(2) + 1) and string.logit_scale == pytest.approx(1.1434, 1e-4)
    assert string.diagonal_window == 5 and StringConfig(4, 2, overlap=False).diagonal_window == 4
    for bad in ({"shift": 0}, {"shift": 4, "window": -1}, {"shift": 4, "scale": 0.0}):
        with pytest.raises(ValueError, match="STRING needs shift > 0, window >= 0 and scale > 0"):
            StringConfig(**{"window": 2, **bad})


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
    """What `string_attention` takes: queries at i and i - S + W carrying the logit scale, keys at j."""
    c = string.logit_scale
    cos, sin = rope_cos_sin(pos, q.shape[-1], THETA)
    cos_s, sin_s = rope_cos_sin(pos - string.shift + string.window, q.shape[-1], THETA)
    return apply_rope(q, cos * c, sin * c), apply_rope(q, cos_s * c, sin_s * c), apply_rope(k, cos, sin)


CONFIGS = [StringConfig(5, 2), StringConfig(8, 0, scale=1.0, overlap=False), StringConfig(3, 1, overlap=False),
           StringConfig(16, 15), StringConfig(4, 6, scale=1.3), StringConfig(1, 0)]


@pytest.mark.parametrize("string", CONFIGS, ids=str)
def test_reference_path_equals_dense(string):
    lengths = [17, 5, 1, 6, 30]  # shorter than S, equal to S, S + 1, much longer
    q, k, v, pos, cu = _inputs(lengths)
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


@pytest.mark.parametrize("string", CONFIGS, ids=str)
def test_dense_reference_equals_the_paper_rules_row_by_row(string):
    """One softmax per query, written from the paper code's rules: key j at distance d = i - j
    scores at position d if d < S (d <= S with the overlap) and, if d >= S, at d - S + W; with the
    overlap the key at d = S is scored at both; every logit times scale^2 / sqrt(D)."""
    n, dim = 23, 16
    q, k, v, _, cu = _inputs([n], heads=2, kv_heads=1, dim=dim, seed=3)
    got = string_attention_dense(q, k, v, cu, string=string, rope_theta=THETA)
    S, W = string.shift, string.window
    for i in range(n):
        for h in range(2):
            logits, values = [], []
            for j in range(i + 1):
                d = i - j
                positions = ([d] if d < S or (string.overlap and d == S) else []) + ([d - S + W] if d >= S else [])
                for p in positions:
                    cos, sin = rope_cos_sin(torch.tensor([p]), dim, THETA)
                    qr = apply_rope(q[i:i + 1, h:h + 1], cos, sin)[0, 0]
                    logits.append(string.logit_scale * float(qr @ k[j, 0]) / math.sqrt(dim))
                    values.append(v[j, 0])
            probs = torch.tensor(logits, dtype=torch.float64).softmax(0)
            want = sum(float(p) * val.double() for p, val in zip(probs, values, strict=True))
            torch.testing.assert_close(got[i, h].double(), want, rtol=1e-5, atol=1e-5)


def test_string_changes_long_documents_only_and_its_scale_every_row():
    lengths = [4, 12]
    q, k, v, _, cu = _inputs(lengths)
    string = StringConfig(shift=4, window=1, scale=1.0, overlap=False)
    with_string = string_attention_dense(q, k, v, cu, string=string, rope_theta=THETA)
    without = string_attention_dense(q, k, v, cu, string=None, rope_theta=THETA)
    torch.testing.assert_close(with_string[:8], without[:8])  # distances < 4 everywhere up to row 3 of doc 2
    assert not torch.allclose(with_string[8:], without[8:])
    scaled = string_attention_dense(q, k, v, cu, string=StringConfig(4, 1), rope_theta=THETA)
    assert not torch.allclose(scaled[1:4], without[1:4])  # the paper's factor reaches queries below S too


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("string", [StringConfig(64, 16), StringConfig(200, 128, overlap=False),
                                    StringConfig(100, 128)], ids=str)
def test_fused_varlen_equals_dense_on_gpu(string):
    lengths = [300, 64, 65, 1, 513]
    q, k, v, pos, cu = (x.cuda() for x in _inputs(lengths, heads=8, kv_heads=2, dim=64))
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
