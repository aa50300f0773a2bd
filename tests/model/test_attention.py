"""The attention seam: the CPU reference equals dense block-diagonal causal attention (values and
gradients, GQA included), no query sees another document, and varlen_attn's keywords are adapted to
each torch release's signature. GPU backends are compared with the reference in test_gpu.py."""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimpack.model.attention import attention, resolve_backend, varlen_causal_kwargs


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def dense_block_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Textbook attention over the whole packed batch with an explicit (T, T) mask: key j is visible
    to query i iff both lie in the same document and j <= i. K/V heads repeated for GQA."""
    T, H, D = q.shape
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # (T,)
    idx = torch.arange(T)
    visible = (doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])  # (T, T)
    groups = H // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (T, H, D)
    scores = torch.einsum("ihd,jhd->hij", q, k) / D**0.5  # (H, T, T)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hij,jhd->ihd", probs, v)  # (T, H, D)


def _qkv(T: int, H: int, Hkv: int, D: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, h, D, generator=g, dtype=dtype, requires_grad=True) for h in (H, Hkv, Hkv)]


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 17), min_size=1, max_size=6),
       heads=st.sampled_from([(4, 4), (4, 2), (4, 1), (6, 2)]), seed=st.integers(0, 2**16))
def test_reference_equals_dense_block_causal_values_and_grads(lengths, heads, seed):
    H, Hkv = heads
    q, k, v = _qkv(sum(lengths), H, Hkv, 8, seed)
    out = attention(q, k, v, _cu(lengths), max(lengths), backend="sdpa_ref")
    ref = dense_block_causal(q, k, v, lengths)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = torch.autograd.grad(ref, (q, k, v), grad_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_no_query_sees_another_document_or_the_future():
    lengths = [7, 5, 9]
    cu = _cu(lengths)
    q, k, v = (t.detach() for t in _qkv(21, 4, 2, 8, seed=1, dtype=torch.float32))
    base = attention(q, k, v, cu, 9)
    # Change the middle document's keys/values and its last token: only that document may move, and
    # within it only the changed position and later ones.
    k2, v2 = k.clone(), v.clone()
    k2[7:12] += 1.0
    v2[11] -= 3.0
    out = attention(q, k2, v2, cu, 9)
    assert torch.equal(out[:7], base[:7])
    assert torch.equal(out[12:], base[12:])
    assert not torch.allclose(out[7:12], base[7:12])
    k3, v3 = k.clone(), v.clone()
    k3[10], v3[10] = k3[10] + 1.0, v3[10] + 1.0
    out = attention(q, k3, v3, cu, 9)
    torch.testing.assert_close(out[7:10], base[7:10], rtol=0, atol=1e-6)
    assert not torch.allclose(out[10:12], base[10:12])


def test_auto_is_the_reference_on_cpu():
    q = torch.zeros(3, 2, 4)
    assert resolve_backend("auto", q) == "sdpa_ref"
    assert resolve_backend("varlen", q) == "varlen"
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash", q)


def test_bad_inputs_are_refused_with_the_reason():
    q, k, v = (t.detach() for t in _qkv(6, 4, 2, 8, seed=0, dtype=torch.float32))
    with pytest.raises(ValueError, match="rise from 0 to T=6"):
        attention(q, k, v, _cu([2, 3]), 3)  # ends at 5, not 6
    with pytest.raises(ValueError, match="rise from 0 to T=6"):
        attention(q, k, v, torch.tensor([0, 4, 2, 6], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        attention(q, k[:, :1].expand(6, 3, 8), v[:, :1].expand(6, 3, 8), _cu([6]), 6)
    with pytest.raises(ValueError, match=r"q \(T, H, D\)"):
        attention(q[0], k, v, _cu([6]), 6)


def test_empty_documents_are_allowed():
    q, k, v = (t.detach() for t in _qkv(6, 4, 2, 8, seed=3, dtype=torch.float32))
    out = attention(q, k, v, torch.tensor([0, 2, 2, 6], dtype=torch.int32), 4)
    torch.testing.assert_close(out, attention(q, k, v, _cu([2, 4]), 4))


# ---- varlen_attn signature adaptation (the kernel itself runs in test_gpu.py) -----------------------


def _sig_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None): ...


def _sig_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
              window_size=(-1, -1)): ...


def _sig_later(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
               window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None): ...


@pytest.mark.parametrize(("fn", "kwargs", "gqa"), [
    (_sig_2_10, {"is_causal": True}, False),
    (_sig_2_11, {"window_size": (-1, 0)}, False),
    (_sig_later, {"window_size": (-1, 0)}, True),
])
def test_varlen_keywords_follow_the_signature(fn, kwargs, gqa):
    assert varlen_causal_kwargs(inspect.signature(fn)) == (kwargs, gqa)


def test_varlen_keywords_for_the_installed_torch():
    from torch.nn.attention.varlen import varlen_attn

    sig = inspect.signature(varlen_attn)
    causal, gqa = varlen_causal_kwargs(sig)
    assert set(causal) <= set(sig.parameters)
    assert gqa == ("enable_gqa" in sig.parameters)


def test_unknown_varlen_signature_is_refused():
    def fn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, mask=None): ...

    with pytest.raises(RuntimeError, match="neither window_size nor is_causal"):
        varlen_causal_kwargs(inspect.signature(fn))


@pytest.mark.parametrize(("backend", "module"), [("flash_attn", "flash_attn"), ("xformers", "xformers")])
def test_missing_optional_backend_says_how_to_install(backend, module):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed; test_gpu.py compares it with the reference")
    q, k, v = (t.detach() for t in _qkv(4, 2, 2, 8, seed=0, dtype=torch.float32))
    with pytest.raises(RuntimeError, match="pip install"):
        attention(q, k, v, _cu([4]), 4, backend=backend)
