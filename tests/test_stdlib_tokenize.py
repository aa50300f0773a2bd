"""Guard: our `slimpack.tokenize` package must never shadow the standard library's `tokenize`."""

import linecache
import tokenize


def test_import_tokenize_is_the_standard_library():
    assert hasattr(tokenize, "generate_tokens") and hasattr(tokenize, "detect_encoding")
    assert "slimpack" not in (tokenize.__file__ or "")
    # linecache (used by every traceback) goes through tokenize.open
    assert linecache.getline(__file__, 1).startswith('"""Guard')


def test_slimpack_tokenize_is_ours():
    import slimpack.tokenize.tokenizer as ours

    assert ours.__name__ == "slimpack.tokenize.tokenizer"

