"""GPU checks, run deliberately on a CUDA machine: `pytest -m gpu tests/train/test_gpu.py`.

The fused varlen backends agree with the per-document reference (forward and backward, bf16), the
model on GPU equals Hugging Face's, and the chunked loss agrees with the plain bf16 path on the real
vocabulary. Skipped where CUDA is absent."""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch
import torch.nn.functional as F

from slimpack.model.attention import attention, resolve_backend
from slimpack.model.transformer import ModelConfig, RMSNorm, Transformer
from slimpack.train.loss import IGNORE_INDEX, cross_entropy_sum

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Awkward lengths on purpose: 1-token documents, non-multiples of the kernels' tile sizes, one long.
LENGTHS = [1, 17, 128, 300, 1, 999, 2048, 652]


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device="cuda")


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _backends() -> list[str]:
    found = ["varlen"]
    found += [b for b in ("cudnn", "flash_attn", "xformers") if importlib.util.find_spec(b) is not None]
    return found


def test_auto_picks_a_fused_kernel_for_bf16_cuda():
    want = "cudnn" if importlib.util.find_spec("cudnn") is not None else "varlen"
    assert resolve_backend("auto", torch.zeros(1, device="cuda", dtype=torch.bfloat16)) == want


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize(("H", "Hkv", "D"), [(32, 4, 64), (8, 8, 128)])
def test_fused_backend_matches_reference_forward_and_backward(backend, H, Hkv, D):
    torch.manual_seed(0)
    T, cu = sum(LENGTHS), _cu(LENGTHS)
    q, k, v = (torch.randn(T, h, D, device="cuda") for h in (H, Hkv, Hkv))
    grad_out = torch.randn(T, H, D, device="cuda")

    def run(backend: str, dtype: torch.dtype):
        leaves = [x.detach().to(dtype).clone().requires_grad_() for x in (q, k, v)]
        out = attention(*leaves, cu, max(LENGTHS), backend=backend)
        out.backward(grad_out.to(dtype))
        return [out, *(x.grad for x in leaves)]

    exact = run("sdpa_ref", torch.float32)  # fp32 per-document reference
    ref16 = run("sdpa_ref", torch.bfloat16)  # the same reference in bf16: the rounding budget
    fused = run(backend, torch.bfloat16)
    for name, f, r16, r32 in zip(("out", "dq", "dk", "dv"), fused, ref16, exact, strict=True):
        assert torch.isfinite(f).all(), name
        budget = max(2 * _rel_err(r16, r32), 1e-2)
        assert _rel_err(f, r32) < budget, (name, _rel_err(f, r32), _rel_err(r16, r32))


@pytest.mark.parametrize("backend", _backends())
def test_fused_backend_never_attends_across_documents(backend):
    torch.manual_seed(1)
    T, cu = sum(LENGTHS), _cu(LENGTHS)
    q, k, v = (torch.randn(T, h, 64, device="cuda", dtype=torch.bfloat16) for h in (32, 4, 4))
    base = attention(q, k, v, cu, max(LENGTHS), backend=backend)
    k2, v2 = k.clone(), v.clone()
    s, e = 447, 447 + 999  # the 999-token document
    k2[s:e] += 1.0
    v2[s:e] -= 1.0
    out = attention(q, k2, v2, cu, max(LENGTHS), backend=backend)
    assert torch.equal(out[:s], base[:s]) and torch.equal(out[e:], base[e:])
    assert not torch.equal(out[s:e], base[s:e])


def _model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    for m in model.modules():
        if isinstance(m, RMSNorm):
            torch.nn.init.normal_(m.weight, 1.0, 0.3)
    return model.cuda()


@torch.no_grad()
def test_model_logits_equal_hugging_face_on_gpu(tmp_path):
    transformers = pytest.importorskip("transformers")
    from slimpack.train.export import export_hf

    cfg = ModelConfig(hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8, num_kv_heads=2)
    model = _model(cfg)
    export_hf(model.state_dict(), cfg, tmp_path)
    lengths = [1, 37, 512, 200]
    T = sum(lengths)
    ids = torch.randint(0, cfg.vocab_size, (T,), device="cuda")
    pos = torch.cat([torch.arange(n, device="cuda") for n in lengths])
    cu = _cu(lengths)
    bounds = cu.tolist()

    def hf_logits(dtype: torch.dtype, impl: str) -> torch.Tensor:
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=dtype, attn_implementation=impl)
        hf = hf.cuda().eval()
        return torch.cat([hf(input_ids=ids[None, s:e]).logits[0] for s, e in itertools.pairwise(bounds)])

    # fp32: ours (auto -> per-document SDPA) vs HF eager, to float tolerance.
    hf32 = hf_logits(torch.float32, "eager")
    ours32 = model.logits(ids, pos, cu, max(lengths))
    torch.testing.assert_close(ours32, hf32, rtol=1e-4, atol=1e-4)
    # bf16: ours through varlen on the packed batch vs HF's SDPA per document; both measured against
    # the fp32 logits, ours may not be much worse than HF's own bf16 rounding.
    hf16 = hf_logits(torch.bfloat16, "sdpa")
    ours16 = model.to(torch.bfloat16).logits(ids, pos, cu, max(lengths))
    assert _rel_err(ours16, hf32) < max(1.5 * _rel_err(hf16, hf32), 1e-2), (
        _rel_err(ours16, hf32), _rel_err(hf16, hf32))


@pytest.mark.parametrize("backend", _backends())
def test_upper_bound_max_seqlen_and_torch_compile_agree_with_eager(backend):
    """The trainer may pass seq_len as max_seqlen (a constant, so torch.compile need not specialise
    on every batch's longest document), and compile the model: both must give eager's numbers."""
    cfg = ModelConfig(hidden_size=256, intermediate_size=704, num_layers=2, num_heads=8, num_kv_heads=2)
    model = _model(cfg).to(torch.bfloat16)
    for layer in model.layers:
        layer.attention.backend = backend
    lengths = [3, 700, 321]
    T = sum(lengths)
    ids = torch.randint(0, cfg.vocab_size, (T,), device="cuda")
    pos = torch.cat([torch.arange(n, device="cuda") for n in lengths])
    cu = _cu(lengths)

    def run(fn, max_seqlen: int):
        model.zero_grad(set_to_none=True)
        out = fn(ids, pos, cu, max_seqlen)
        out.float().square().mean().backward()
        return out.detach(), model.layers[0].attention.wq.weight.grad.clone()

    eager_out, eager_grad = run(model, max(lengths))
    bound_out, bound_grad = run(model, T)
    assert _rel_err(bound_out, eager_out) < 1e-3 and _rel_err(bound_grad, eager_grad) < 1e-3
    compiled_out, compiled_grad = run(torch.compile(model), T)
    assert _rel_err(compiled_out, eager_out) < 2e-2, _rel_err(compiled_out, eager_out)
    assert _rel_err(compiled_grad, eager_grad) < 5e-2, _rel_err(compiled_grad, eager_grad)


def test_chunked_loss_on_the_real_vocabulary():
    torch.manual_seed(0)
    T, D, V = 4096, 2048, 128_256
    hidden = (torch.randn(T, D, device="cuda") * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(V, D, device="cuda") * 0.02).bfloat16().requires_grad_()
    labels = torch.randint(0, V, (T,), device="cuda")
    labels[::7] = IGNORE_INDEX
    loss = cross_entropy_sum(hidden, weight, labels, chunk_tokens=1024)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    plain = F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    ph, pw = torch.autograd.grad(plain, (hidden, weight))
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=0)
    assert _rel_err(gh, ph) < 1e-2 and _rel_err(gw, pw) < 1e-2, (_rel_err(gh, ph), _rel_err(gw, pw))


@pytest.mark.skipif(importlib.util.find_spec("cudnn") is None, reason="needs the cuDNN frontend")
def test_cudnn_custom_op_passes_opcheck():
    """Schema, fake implementation and autograd registration agree with the real kernel."""
    from slimpack.model.cudnn_attention import cudnn_varlen_fwd

    g = torch.Generator(device="cuda").manual_seed(0)
    cu = _cu([5, 300, 0, 211])
    T = int(cu[-1])
    q, k, v = (torch.randn(T, h, 64, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
               for h in (8, 2, 2))
    torch.library.opcheck(cudnn_varlen_fwd, (q, k, v, cu, 512))


@pytest.mark.skipif(importlib.util.find_spec("cudnn") is None, reason="needs the cuDNN frontend")
def test_cudnn_names_the_fallback_when_it_cannot_build_a_graph():
    """A shape cuDNN's fused kernel does not take (a head dim not a multiple of 8) fails with the way out."""
    cu = _cu([5, 11])
    q = torch.randn(16, 2, 60, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"(?s)cannot build .* head dim 60.*attention_backend=varlen"):
        attention(q, q[:, :1], q[:, :1], cu, 11, backend="cudnn")
