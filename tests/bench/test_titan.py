"""The torchtitan baseline of `slimpack bench train` (slimpack.bench.titan) is the model and step it
claims to be: our shape, documents masked at EOS by its flex path, and its loss normalisation."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from slimpack.bench import titan
from slimpack.bench.train import eos_id_for, synthetic_micro_batches
from slimpack.model.transformer import Transformer, model_config
from slimpack.train.parallel import init_distributed

pytest.importorskip("torchtitan", reason="torchtitan is the [titan] extra (requirements-dev installs it)")
from torchtitan.models.llama3.model import model as titan_model


@pytest.mark.parametrize("preset", ["tiny", "tinyllama-1.3b"])
def test_torchtitan_model_has_our_shape(preset):
    cfg = model_config(preset)
    with torch.device("meta"):
        theirs = titan_model.Transformer(titan.model_args(cfg, seq_len=2048))
        ours = Transformer(cfg)
    shapes = sorted(tuple(p.shape) for p in theirs.parameters())
    assert shapes == sorted(tuple(p.shape) for p in ours.parameters())
    if preset == "tinyllama-1.3b":
        assert sum(p.numel() for p in theirs.parameters()) == 1_494_312_960


def _logits(attention: str, ids: torch.Tensor, eos: int) -> torch.Tensor:
    cfg = model_config("tiny")
    torch.manual_seed(0)
    model = titan_model.Transformer(titan.model_args(cfg, seq_len=ids.shape[1], attention=attention, eos_id=eos))
    with torch.no_grad():
        model.init_weights()
        masks = model.get_attention_masks(input_batch=ids, tokenizer=titan._Eos(eos)) if attention == "flex" else None
        return model(ids, attention_masks=masks)


def test_flex_block_causal_keeps_documents_apart_and_causal_sdpa_does_not(monkeypatch):
    # torchtitan builds its block mask on "cuda" unless told otherwise; flex's forward runs on CPU.
    from torchtitan.models import attention as titan_attention

    monkeypatch.setattr(titan_model, "create_attention_mask",
                        functools.partial(titan_attention.create_attention_mask, device="cpu"))
    cfg = model_config("tiny")
    eos = eos_id_for(cfg.vocab_size)
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 1000, (1, 64), generator=g)
    a[0, 29] = eos  # document 1 is a[0, :30], EOS included; document 2 follows
    b = a.clone()
    b[0, :29] = torch.randint(0, 1000, (29,), generator=g)  # another first document, same second one
    flex_a, flex_b = _logits("flex", a, eos), _logits("flex", b, eos)
    torch.testing.assert_close(flex_a[0, 30:], flex_b[0, 30:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(flex_a[0, :30], flex_b[0, :30])
    causal_a, causal_b = _logits("sdpa", a, eos), _logits("sdpa", b, eos)
    assert not torch.allclose(causal_a[0, 30:], causal_b[0, 30:], atol=1e-3)
    # Its positions run on across documents; RoPE is relative, so document 2 alone gives the same.
    torch.testing.assert_close(flex_a[0, 30:], _logits("flex", a[:, 30:], eos)[0], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def dist1():
    d = init_distributed("cpu")
    yield d
    dist.destroy_process_group()


def test_a_step_returns_the_mean_token_loss_over_the_step(dist1):
    cfg = model_config("tiny")
    model, loss_fn = titan.build(cfg, dist1.device, dist1.mesh, seq_len=128, compile_blocks=False,
                                 mixed_precision=False, attention="sdpa")
    opt = titan.optimizer(model)
    batches = synthetic_micro_batches(seq_len=128, micro_batch_size=2, vocab_size=cfg.vocab_size)
    micro = [next(batches) for _ in range(2)]
    with torch.no_grad():  # the mean over every labelled token of the step, before the update
        logits = torch.cat([model(mb["input_ids"].view(-1, 128)).flatten(0, 1) for mb in micro])
        want = F.cross_entropy(logits.float(), torch.cat([mb["labels"] for mb in micro]), ignore_index=-100)
    before = [_full(p).clone() for p in model.parameters()]
    got = titan.step(model, opt, loss_fn, micro, device=dist1.device, seq_len=128, eos_id=eos_id_for(cfg.vocab_size),
                     attention="sdpa")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert all(not torch.equal(b, _full(p)) for b, p in zip(before, model.parameters()))


def _full(p: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value (FSDP2 holds DTensor shards, or the gathered tensor after a forward)."""
    p = p.detach()
    return p.full_tensor() if hasattr(p, "full_tensor") else p
