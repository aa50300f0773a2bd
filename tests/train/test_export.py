"""Export to Hugging Face: `transformers.LlamaForCausalLM` loads our directory and its logits equal
ours, per document and against our packed batch; the name mapping round-trips and refuses strangers."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from slimpack.train.export import export_hf, from_hf_state_dict, to_hf_state_dict
from slimpack.train.model import RMSNorm, Transformer, model_config

transformers = pytest.importorskip("transformers")

LENGTHS = [11, 1, 24, 6]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg = model_config("tiny")  # the real Llama 3 vocabulary size, so config.json is the real one
    torch.manual_seed(0)
    model = Transformer(cfg)
    for m in model.modules():  # random norm weights: swapped norms would show in the logits
        if isinstance(m, RMSNorm):
            torch.nn.init.normal_(m.weight, 1.0, 0.3)
    out = export_hf(model.state_dict(), cfg, tmp_path_factory.mktemp("hf"))
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    return model.eval(), hf.eval(), out


def _packed(lengths, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, pos, cu, max(lengths)


@torch.no_grad()
def test_hf_logits_equal_ours_per_document_and_packed(exported):
    model, hf, _ = exported
    ids, pos, cu, max_len = _packed(LENGTHS, model.cfg.vocab_size)
    packed = model.logits(ids, pos, cu, max_len)  # (T, V): all documents in one packed call
    bounds = cu.tolist()
    for start, end in itertools.pairwise(bounds):
        n = end - start
        theirs = hf(input_ids=ids[None, start:end]).logits[0]  # (n, V)
        alone = model.logits(ids[start:end], torch.arange(n), torch.tensor([0, n], dtype=torch.int32), n)
        torch.testing.assert_close(alone, theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed[start:end], theirs, rtol=1e-5, atol=1e-5)


def test_written_config_and_weights(exported):
    model, hf, out = exported
    cfg = model.cfg
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is False
    assert (hf.config.hidden_size, hf.config.num_hidden_layers, hf.config.num_key_value_heads) == (
        cfg.hidden_size, cfg.num_layers, cfg.num_kv_heads)
    assert hf.config.rms_norm_eps == cfg.rms_norm_eps and hf.config.vocab_size == 128_256
    # Every HF weight is ours, bit for bit (no permutation), and lm_head is not tied to the embedding.
    ours = to_hf_state_dict(model.state_dict())
    theirs = hf.state_dict()
    assert set(ours) == {k for k in theirs if not k.endswith("inv_freq")}
    for k, v in ours.items():
        assert torch.equal(theirs[k], v), k
    assert not torch.equal(theirs["lm_head.weight"], theirs["model.embed_tokens.weight"])


def test_state_dict_round_trip_and_hf_import(exported):
    model, hf, _ = exported
    sd = model.state_dict()
    back = from_hf_state_dict(to_hf_state_dict(sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    fresh = Transformer(model.cfg)
    fresh.load_state_dict(from_hf_state_dict(hf.state_dict()), strict=True)
    assert all(torch.equal(fresh.state_dict()[k], sd[k]) for k in sd)


def test_wrapper_prefixes_are_stripped_and_strangers_refused(tmp_path):
    cfg = model_config("tiny")
    sd = Transformer(cfg).state_dict()
    wrapped = {("_orig_mod." + k).replace("attention.", "_checkpoint_wrapped_module.attention."): v
               for k, v in sd.items()}
    assert to_hf_state_dict(wrapped).keys() == to_hf_state_dict(sd).keys()
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.rotary"):
        to_hf_state_dict({**sd, "layers.0.attention.rotary": torch.zeros(1)})
    small = model_config("small")
    with pytest.raises(ValueError, match="export with the config the checkpoint was trained with"):
        export_hf(sd, small, tmp_path / "wrong")
