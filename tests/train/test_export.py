"""Export to Hugging Face: `transformers.LlamaForCausalLM` loads our directory and its logits equal
ours, per document and against our packed batch; the name mapping round-trips and refuses strangers;
`AutoTokenizer` loads the exported tokenizer and encodes text to slimpack's ids (real text, special-
token strings, unicode, long inputs), and text generation runs on the export."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import zstandard

from slimpack.model.transformer import RMSNorm, Transformer, model_config
from slimpack.tokenize.tokenizer import needs_split, replace_lone_surrogates, split_like_meta
from slimpack.train.export import export_hf, from_hf_state_dict, to_hf_state_dict

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


# ----------------------------------------------------------------------------- tokenizer, generation


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    return transformers.AutoTokenizer.from_pretrained(exported[2])


def _texts(root: Path, *, limit_chars: int | None = None) -> list[str]:
    """Every document's text under root (SlimPajama layout), up to about limit_chars in all."""
    texts, total = [], 0
    for path in sorted(root.rglob("*.jsonl.zst")):
        with zstandard.ZstdDecompressor().stream_reader(path.open("rb")) as f:
            for line in f.read().decode().splitlines():
                texts.append(json.loads(line)["text"])
                total += len(texts[-1])
                if limit_chars is not None and total >= limit_chars:
                    return texts
    return texts


def _assert_same_ids(hf_tokenizer, llama3, texts: list[str]) -> None:
    """HF's ids are slimpack's without the EOS (BOS + text). Where Meta's reference, and so
    slimpack, cuts a long text into pieces, HF (which never cuts) must equal us piece by piece."""
    for text in texts:
        ours = llama3.encode_document(text).tolist()[:-1]
        if needs_split(text):
            theirs = [llama3.bos_id] + [i for piece in split_like_meta(text)
                                        for i in hf_tokenizer(piece, add_special_tokens=False)["input_ids"]]
        else:
            theirs = hf_tokenizer(text)["input_ids"]
        assert theirs == ours, text[:200]


def test_hf_tokenizer_equals_slimpack_on_real_web_text(hf_tokenizer, llama3, shared_data):
    texts = _texts(shared_data)
    assert any(needs_split(t) for t in texts)  # the fixture holds inputs Meta's reference cuts
    _assert_same_ids(hf_tokenizer, llama3, texts)


def test_hf_tokenizer_equals_slimpack_on_demo_text(hf_tokenizer, llama3, demo_corpus):
    _assert_same_ids(hf_tokenizer, llama3, _texts(demo_corpus, limit_chars=1_000_000))


def test_hf_tokenizer_on_unicode_special_strings_and_long_inputs(hf_tokenizer, llama3, exported):
    texts = [
        "", " ", "\n\n\n", "  leading and trailing  ", "tabs\tand\r\nCRLF", "don't WE'LL I'd 1234567 3.14159",
        "日本語のテキストと中文文本", "émoji 🤖👩‍👩‍👧 and flags 🇫🇷", "e\u0301 combining, ﬁ ligature, Ⅻ, ＦＵＬＬ",
        "עברית والعربية mixed RTL", "\x00\x01 control \u200b zero width \ufeff BOM",
        "x <|end_of_text|> y <|begin_of_text|><|eot_id|> <|reserved_special_token_7|>",
        "word " * 90_000,                    # 450,000 characters: Meta's reference cuts at 400,000
        " " * 30_000 + "x" + "y" * 26_000,   # runs over 25,000 characters: cut every 25,000
    ]
    _assert_same_ids(hf_tokenizer, llama3, texts)
    # Special-token strings: ordinary text by default, as slimpack trained on them; control ids on request.
    text = "a <|end_of_text|>"
    assert llama3.eos_id not in hf_tokenizer(text)["input_ids"]
    meta_style = transformers.AutoTokenizer.from_pretrained(exported[2], split_special_tokens=False)
    assert meta_style(text)["input_ids"][-1] == llama3.eos_id
    # Lone surrogates: HF refuses them; slimpack's repair (U+FFFD, as tiktoken does) first gives our ids.
    broken = "a\ud800b"
    assert hf_tokenizer(replace_lone_surrogates(broken))["input_ids"] == llama3.encode_document(broken).tolist()[:-1]
    ids = hf_tokenizer("héllo wörld 🤖")["input_ids"]
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == "héllo wörld 🤖"
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (llama3.bos_id, llama3.eos_id)
    assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")


@torch.no_grad()
def test_generation_runs_on_the_export_and_equals_our_greedy_decoding(exported, hf_tokenizer):
    model, hf, out = exported
    config = json.loads((out / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (128_000, 128_001)
    prompt = "The quick brown fox"
    ids = hf_tokenizer(prompt)["input_ids"]
    for _ in range(12):  # greedy with our model, no cache: the reference
        n = len(ids)
        logits = model.logits(torch.tensor(ids), torch.arange(n), torch.tensor([0, n], dtype=torch.int32), n)
        ids.append(int(logits[-1].argmax()))
    generated = hf.generate(**hf_tokenizer(prompt, return_tensors="pt"), max_new_tokens=12)
    assert generated[0].tolist() == ids
    # What people run: the text-generation pipeline on the directory alone (its model, tokenizer
    # and generation config; greedy, since the export's generation config says so).
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    text = pipe(prompt, max_new_tokens=12)[0]["generated_text"]
    assert text == hf_tokenizer.decode(ids, skip_special_tokens=True)
