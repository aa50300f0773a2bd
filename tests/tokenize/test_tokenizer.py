"""Our Llama 3 tokenizer against Meta's reference, `Tokenizer.encode(text, bos=True, eos=True)`."""

from __future__ import annotations

import re
import sys

import pytest

from slimpack.tokenize.readers import Record, discover, read_records
from slimpack.tokenize.tokenizer import (
    MAX_ENCODE_CHARS,
    MAX_RUN_CHARS,
    Llama3Tokenizer,
    needs_split,
    split_like_meta,
)


def _texts(root) -> list[str]:
    items, _ = discover([root])
    return [r.text for item in items for r in read_records(item) if isinstance(r, Record)]


def _assert_meta_equal(ours: Llama3Tokenizer, meta, texts: list[str]) -> None:
    for i, (text, ids) in enumerate(zip(texts, ours.encode_documents(texts), strict=True)):
        ref = meta.encode(text, bos=True, eos=True)
        assert ids.tolist() == ref, f"document {i} ({len(text)} chars) differs from Meta's ids"


def test_identity(llama3):
    assert llama3.vocab_size == 128_256
    assert (llama3.bos_id, llama3.eos_id) == (128_000, 128_001)
    assert llama3.identity["sha256"] == llama3.sha256 and len(llama3.sha256) == 64


def test_equals_meta_on_all_shared_text(llama3, meta_tokenizer, shared_data):
    texts = _texts(shared_data)
    assert len(texts) == 902
    _assert_meta_equal(llama3, meta_tokenizer, texts)


def test_equals_meta_on_demo_corpus(llama3, meta_tokenizer, demo_corpus):
    texts = _texts(demo_corpus)
    assert len(texts) > 500
    _assert_meta_equal(llama3, meta_tokenizer, texts)


ADVERSARIAL = {
    "special_strings": "a <|end_of_text|> b <|begin_of_text|><|eot_id|> c <|reserved_special_token_5|>",
    "cjk_emoji_combining_rtl": "漢字かなカナ 한국어 😀👍🏽👨‍👩‍👧 e\u0301 n\u0303 שָׁלוֹם مرحبا بالعالم \u202eRTL",
    "crlf_tabs": "line one\r\nline two\r\n\r\n\tindented\t\ttabs \r\n  \t mixed\x0b\x0c\x1c\x85\u2028",
    "lone_surrogates": "lone \ud800 high, \udfff low, pair-ish \ud83d and end \udc00",
    "run_25000": "x" * MAX_RUN_CHARS + " tail",
    "run_25001": "x" * (MAX_RUN_CHARS + 1) + " tail",
    "spaces_25001": " " * (MAX_RUN_CHARS + 1) + "a",
    "spaces_50001_mid": "a" + " " * 50_001 + "b" + "\n" * 30_000,
    "unicode_space_run": "\u3000" * 30_000 + "word" + "\xa0" * 26_000,
    "chunk_boundary": "ab " * (MAX_ENCODE_CHARS // 3) + "x" * 40_000,
    "exact_400k": "y" * MAX_ENCODE_CHARS,
    "newlines_400001": "\n" * (MAX_ENCODE_CHARS + 1),
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_equals_meta_on_adversarial_input(llama3, meta_tokenizer, name):
    _assert_meta_equal(llama3, meta_tokenizer, [ADVERSARIAL[name]])


@pytest.mark.parametrize("text", [
    "a" * 1_000_000,
    " " * 1_000_000,
    ("The quick brown fox. " * 50_000)[:1_000_000].replace(" ", "", 1),
    "z" * 5_000_000,  # a 5 MB single line
    ("word " * 1_000_000)[:5_000_000],
], ids=["1MB-one-char", "1MB-spaces", "1MB-prose", "5MB-no-space", "5MB-line"])
def test_equals_meta_on_huge_input(llama3, meta_tokenizer, text):
    _assert_meta_equal(llama3, meta_tokenizer, [text])


def test_special_strings_are_text_not_control_ids(llama3):
    ids = llama3.encode_document("<|end_of_text|><|begin_of_text|>")
    assert ids[0] == llama3.bos_id and ids[-1] == llama3.eos_id
    inner = ids[1:-1]
    assert llama3.bos_id not in inner and llama3.eos_id not in inner
    assert all(i < 128_000 for i in inner)


def test_lone_surrogates_become_replacement_character(llama3):
    ids = llama3.encode_document("a\ud800b")
    assert llama3.decode(ids[1:-1]) == "a\ufffdb"


def test_regex_whitespace_matches_str_isspace():
    # The long-run finder relies on `\s` meaning exactly str.isspace(), for every code point.
    ws = re.compile(r"\s")
    mismatches = [c for c in map(chr, range(sys.maxunicode + 1))
                  if bool(ws.match(c)) != c.isspace()]
    assert mismatches == []


def test_split_only_where_it_can_change_the_result():
    assert not needs_split("hello world " * 1000)
    assert needs_split("x" * (MAX_RUN_CHARS + 1))
    assert needs_split("ab " * MAX_ENCODE_CHARS)
    pieces = split_like_meta("x" * 60_000)
    assert [len(p) for p in pieces] == [25_000, 25_000, 10_000]
    assert "".join(split_like_meta("ab " * 300_000)) == "ab " * 300_000


def test_surrogate_replacements_are_counted(llama3):
    ids, replaced = llama3.encode_batch(["clean", "one \ud800", "x" * 30_000 + "\udc00" + " " * 30_000])
    assert replaced == 2 and len(ids) == 3


def test_needs_split_block_shortcut_agrees_with_the_full_scan():
    # Exhaustive over run lengths around the limit and over where the run sits in the text.
    from slimpack.tokenize.tokenizer import _LONG_RUN

    for run in (12_499, 12_500, 24_999, 25_000, 25_001, 37_501):
        for lead in (0, 1, 6_250, 12_499, 12_500, 30_000):
            for char, filler in (("x", "ab "), (" ", "ab ")):
                text = filler * (lead // 3) + char * run + filler * 5_000
                assert needs_split(text) == (_LONG_RUN.search(text) is not None), (run, lead, char)
