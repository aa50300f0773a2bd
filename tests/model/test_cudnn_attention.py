"""The cuDNN ragged-attention backend's host-side parts, on CPU: the per-document lengths and ragged
offsets it hands cuDNN, its shape functions for torch.compile, and its errors. Its numerics run on a
GPU (tests/train/test_gpu.py parametrizes every fused backend against the reference)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from slimpack.model.attention import attention
from slimpack.model.cudnn_attention import BUCKET, cudnn_varlen_fwd, doc_meta


def test_doc_meta_gives_lengths_and_element_offsets_padded_with_empty_documents():
    cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32)  # documents of 3, 0 and 7 tokens
    H, Hkv, D = 4, 2, 8
    seq, off_q, off_kv, off_stats = doc_meta(cu, 5, H, Hkv, D)
    assert seq.shape == (5, 1, 1, 1) and seq.dtype == torch.int32
    assert seq.flatten().tolist() == [3, 0, 7, 0, 0]  # two empty documents pad to the bucket
    starts = [0, 3, 3, 10, 10, 10]  # in tokens; the padding starts (and ends) at T
    assert off_q.shape == (6, 1, 1, 1) and off_q.dtype == torch.int64
    assert off_q.flatten().tolist() == [s * H * D for s in starts]  # (T, H, D) elements
    assert off_kv.flatten().tolist() == [s * Hkv * D for s in starts]  # (T, Hkv, D) elements
    assert off_stats.flatten().tolist() == [s * H for s in starts]  # (T, H) fp32 stats


def test_fake_implementation_gives_shapes_for_any_document_count():
    with FakeTensorMode():
        T, H, Hkv, D = 4096, 8, 2, 64
        q, k, v = torch.empty(T, H, D, dtype=torch.bfloat16), *(torch.empty(T, Hkv, D, dtype=torch.bfloat16)
                                                                for _ in range(2))
        for docs in (1, BUCKET, BUCKET + 1):
            out, stats = cudnn_varlen_fwd(q, k, v, torch.empty(docs + 1, dtype=torch.int32), 2048)
            assert out.shape == (T, H, D) and out.dtype == torch.bfloat16
            assert stats.shape == (T, H) and stats.dtype == torch.float32


def test_cpu_tensors_get_a_clear_error():
    q = torch.zeros(4, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"fp16/bf16 CUDA tensors.*sdpa_ref"):
        attention(q, q[:, :1], q[:, :1], torch.tensor([0, 4], dtype=torch.int32), 4, backend="cudnn")


@pytest.mark.skipif(importlib.util.find_spec("cudnn") is not None, reason="the cuDNN frontend is installed")
def test_missing_frontend_names_the_install():
    from slimpack.model import cudnn_attention

    with pytest.raises(RuntimeError, match=r"pip install nvidia-cudnn-frontend==1\.16\.0"):
        cudnn_attention._lib()
