"""The Llama 3 tokenizer through tiktoken, built from the `tokenizer.model` that `llama-models` ships.

Ids equal Meta's ``llama_models.llama3.tokenizer.Tokenizer.encode(text, bos=True, eos=True)``
exactly. Meta encodes a document in pieces: 400,000-character chunks, each cut further inside any
run of more than 25,000 consecutive whitespace (or non-whitespace) characters, at every 25,000th
character of the run. Those cuts change the ids, so we make the same cuts, but only where one can
occur: a document of at most 400,000 characters with no such run is encoded in one call.
Finding long runs is one linear regex pass (anchored at run starts, so never quadratic).

Policies:
- special-token strings inside text (``<|end_of_text|>``...) are ordinary text, never control ids;
- lone surrogates (from JSON ``\\ud800`` escapes) become U+FFFD, exactly as tiktoken and therefore
  Meta's reference do; documents where that happened are counted, never dropped.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import itertools
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import tiktoken

# Meta's pre-tokenization pattern for Llama 3.
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    "<|image|>",
]
# Python's `\s` and str.isspace() share one definition of whitespace, so this finds exactly the
# runs Meta's character loop counts. The lookbehinds start a match only at the start of a run.
_BLOCK = MAX_RUN_CHARS // 2
_SPACE, _NON_SPACE = re.compile(r"\s"), re.compile(r"\S")
_LONG_RUN = re.compile(rf"(?<!\S)\S{{{MAX_RUN_CHARS + 1},}}|(?<!\s)\s{{{MAX_RUN_CHARS + 1},}}")


def llama3_model_path() -> Path:
    """Path of `tokenizer.model` inside the installed `llama-models` package (no import of it)."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llama-models package is not installed: pip install llama-models")
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    if not path.exists():
        raise RuntimeError(f"{path} is missing: reinstall llama-models")
    return path


def split_like_meta(text: str) -> list[str]:
    """The pieces Meta's reference encodes separately (see the module docstring)."""
    pieces = []
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[start:start + MAX_ENCODE_CHARS]
        cuts = [0]
        if _may_have_long_run(chunk):
            for run in _LONG_RUN.finditer(chunk):
                cuts.extend(range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS))
        cuts.append(len(chunk))
        pieces.extend(chunk[a:b] for a, b in itertools.pairwise(cuts))
    return pieces or [""]


def _may_have_long_run(text: str) -> bool:
    """False guarantees no run of more than 25,000 characters of one class.

    Such a run fully contains an aligned block of 12,500 characters (any 24,999 consecutive
    characters do). So when every aligned block holds both a whitespace and a non-whitespace
    character, there is none; checking that costs two regex searches per block that stop at the
    first hit, a few characters in. Only a text with a uniform block needs the full scan.
    """
    return len(text) > MAX_RUN_CHARS and any(
        _SPACE.search(text, i, i + _BLOCK) is None or _NON_SPACE.search(text, i, i + _BLOCK) is None
        for i in range(0, len(text) - _BLOCK + 1, _BLOCK))


def needs_split(text: str) -> bool:
    """True when Meta's splitting can cut `text` (a long input, or a run over 25,000 characters)."""
    if len(text) > MAX_ENCODE_CHARS:
        return True
    return _may_have_long_run(text) and _LONG_RUN.search(text) is not None


def replace_lone_surrogates(text: str) -> str:
    """U+FFFD for each lone surrogate (from JSON ``\\ud800`` escapes): tiktoken's own repair."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class Llama3Tokenizer:
    """Llama 3 tokenizer: 128,000 BPE ranks + 256 special tokens = 128,256 ids."""

    def __init__(self, model_path: str | Path | None = None) -> None:
        self.model_path = Path(model_path) if model_path else llama3_model_path()
        data = self.model_path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        ranks = {}
        for line in data.splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        num_base = len(ranks)
        specials = _NAMED_SPECIALS + [
            f"<|reserved_special_token_{2 + i}|>"
            for i in range(NUM_SPECIAL_TOKENS - len(_NAMED_SPECIALS))
        ]
        self.special_tokens = {tok: num_base + i for i, tok in enumerate(specials)}
        self.encoding = tiktoken.Encoding(
            name="llama3", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.vocab_size = num_base + NUM_SPECIAL_TOKENS
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]

    @cached_property
    def identity(self) -> dict:
        return {
            "name": "llama3",
            "source": "llama-models tokenizer.model",
            "sha256": self.sha256,
            "pattern": PATTERN,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
        }

    def encode_document(self, text: str) -> np.ndarray:
        """``BOS text EOS`` as uint32."""
        return self.encode_documents([text])[0]

    def encode_documents(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode a batch of documents to ``BOS text EOS`` uint32 arrays, Meta-exact."""
        return self.encode_batch(texts)[0]

    def encode_batch(self, texts: Sequence[str]) -> tuple[list[np.ndarray], int]:
        """(``BOS text EOS`` uint32 arrays, number of documents whose lone surrogates became U+FFFD).

        Each piece goes straight into a uint32 buffer (`encode_to_numpy`), skipping the Python
        int list that `encode_ordinary` builds: converting that list costs about a fifth of the
        encode time. Documents needing Meta's splitting are encoded piece by piece.
        """
        bos, eos = np.array([self.bos_id], np.uint32), np.array([self.eos_id], np.uint32)
        out, replaced = [], 0
        for text in texts:
            pieces = split_like_meta(text) if needs_split(text) else (text,)
            arrays, flags = zip(*map(self._encode_piece, pieces))
            out.append(np.concatenate([bos, *arrays, eos]))
            replaced += any(flags)
        return out, replaced

    def _encode_piece(self, text: str) -> tuple[np.ndarray, bool]:
        # No special tokens are allowed or checked: their strings encode as ordinary text.
        try:
            return self.encoding.encode_to_numpy(text, disallowed_special=()), False
        except UnicodeEncodeError:
            # Lone surrogates: the same U+FFFD replacement tiktoken's encode applies.
            return self.encoding.encode_to_numpy(replace_lone_surrogates(text), disallowed_special=()), True

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(map(int, ids)))
