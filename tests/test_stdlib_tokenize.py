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


def test_the_cli_starts_without_importing_torch():
    # CPU tokenization nodes run `slimpack tokenize` many times; torch costs a second each.
    import subprocess
    import sys

    code = "import sys, slimpack.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
