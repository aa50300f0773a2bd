"""Shared fixtures: the real-text corpora every test may use.

`shared_data` is ../shared/data/slimpajama-mini beside the repository (skipped where absent, as in
a bare checkout); `demo_corpus` is built from Python's own text and exists everywhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "slimpajama-mini"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (tests on ../shared data run only beside it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slimpack.demo import build_corpus

    out = tmp_path_factory.mktemp("demo-corpus")
    build_corpus(out)
    return out


@pytest.fixture(scope="session")
def llama3():
    from slimpack.tokenize.tokenizer import Llama3Tokenizer

    return Llama3Tokenizer()


@pytest.fixture(scope="session")
def meta_tokenizer():
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()
