"""The model: exact parameter count of the paper's shape, packing equivalence (a packed batch gives
the same hidden states and gradients as each document alone, so nothing leaks across documents),
initialisation, and config validation. Equality with Hugging Face lives in test_export.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from slimpack.model.transformer import PRESETS, ModelConfig, RMSNorm, Transformer, model_config

# Small vocabulary for speed: the vocabulary size changes no code path.
CFG = dataclasses.replace(model_config("tiny"), vocab_size=512)


def _packed(lengths: list[int], vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, pos, cu, max(lengths)


def _model(cfg: ModelConfig = CFG, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    # Random norm weights, so a mix-up of the two norms in a block would show.
    for m in model.modules():
        if isinstance(m, RMSNorm):
            torch.nn.init.normal_(m.weight, 1.0, 0.3)
    return model


def test_tinyllama_has_exactly_the_papers_parameter_count():
    cfg = model_config("tinyllama-1.3b")
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (
        2048, 5632, 22, 32, 4)
    assert (cfg.vocab_size, cfg.rms_norm_eps, cfg.rope_theta, cfg.head_dim) == (128_256, 1e-5, 10_000.0, 64)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == 1_494_312_960
    assert cfg.num_params() == 1_494_312_960
    # Untied: the output projection is its own parameter.
    assert model.output.weight is not model.tok_embeddings.weight


@pytest.mark.parametrize("name", ["small", "tiny"])
def test_small_presets_count_and_vocabulary(name):
    cfg = model_config(name)
    assert cfg.vocab_size == 128_256  # ids come from the Llama 3 tokenizer
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_packed_batch_equals_each_document_alone_values_and_gradients():
    model = _model().double()  # float64: agreement to 1e-10 leaves no room for a leak to hide in
    lengths = [13, 1, 29, 7, 22]
    ids, pos, cu, max_len = _packed(lengths, CFG.vocab_size)
    # A fixed random readout, so every hidden value receives a gradient.
    probe = torch.randn(sum(lengths), CFG.hidden_size, dtype=torch.float64)

    packed = model(ids, pos, cu, max_len)  # (T, D)
    (packed * probe).sum().backward()
    # `output` is applied by the loss, not by forward: it gets no gradient here.
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if n != "output.weight"}
    assert model.output.weight.grad is None
    model.zero_grad()

    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        alone = model(ids[sl], torch.arange(n), torch.tensor([0, n], dtype=torch.int32), n)
        torch.testing.assert_close(alone, packed[sl].detach(), rtol=1e-10, atol=1e-10)
        (alone * probe[sl]).sum().backward()  # grads accumulate over documents
        start += n
    for name, grad in packed_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-9, atol=1e-10)


def test_changing_one_document_leaves_the_others_untouched():
    model = _model()
    lengths = [10, 12, 8]
    ids, pos, cu, max_len = _packed(lengths, CFG.vocab_size)
    with torch.no_grad():
        base = model(ids, pos, cu, max_len)
        ids2 = ids.clone()
        ids2[10:22] = (ids2[10:22] + 1) % CFG.vocab_size
        out = model(ids2, pos, cu, max_len)
    torch.testing.assert_close(out[:10], base[:10], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[22:], base[22:], rtol=0, atol=1e-6)
    assert not torch.allclose(out[10:22], base[10:22], atol=1e-3)


def test_rotary_sees_relative_positions_only():
    model = _model()
    ids, pos, cu, max_len = _packed([16], CFG.vocab_size)
    with torch.no_grad():
        base = model(ids, pos, cu, max_len)
        # RoPE scores depend on i - j only: a constant offset changes nothing (up to rounding), which
        # is why restarting positions per document is exact and agrees with a lone 0-based document.
        shifted = model(ids, pos + 1000, cu, max_len)
        gapped = model(ids, torch.cat([pos[:8], pos[8:] + 3]), cu, max_len)  # relative distances change
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gapped[:8], base[:8], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(gapped[8:], base[8:], atol=1e-3)


def test_init_weights_after_meta_construction():
    cfg = dataclasses.replace(model_config("tiny"), vocab_size=4096)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.std().item() - cfg.init_std) < 0.1 * cfg.init_std, name
            assert abs(p.mean().item()) < 0.1 * cfg.init_std, name


def test_forward_shape_and_dtype():
    model = _model().to(torch.bfloat16)
    ids, pos, cu, max_len = _packed([5, 6], CFG.vocab_size)
    h = model(ids, pos, cu, max_len)
    assert h.shape == (11, CFG.hidden_size) and h.dtype == torch.bfloat16
    assert model.logits(ids, pos, cu, max_len).shape == (11, CFG.vocab_size)


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="not divisible by num_kv_heads"):
        ModelConfig(num_heads=32, num_kv_heads=5)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ModelConfig(hidden_size=100, num_heads=32)
    with pytest.raises(ValueError, match="must be positive"):
        ModelConfig(num_layers=0)
    with pytest.raises(ValueError, match=r"tinyllama-1\.3b"):
        model_config("llama-7b")
    with pytest.raises(ValueError, match="unknown attention backend"):
        Transformer(CFG, attention_backend="flash")


def test_bad_inputs_are_refused_with_the_fix():
    model = _model()
    ids, pos, cu, max_len = _packed([4, 4], CFG.vocab_size)
    with pytest.raises(ValueError, match=r"flat \(T,\)"):
        model(ids.view(2, 4), pos.view(2, 4), cu, max_len)
    with pytest.raises(ValueError, match="int32"):
        model(ids, pos, cu.long(), max_len)
    assert set(PRESETS) >= {"tinyllama-1.3b", "small", "tiny"}
