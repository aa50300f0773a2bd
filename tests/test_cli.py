"""The `slimpack` command as a whole."""

import subprocess
import sys


def test_the_cli_starts_without_importing_torch():
    # CPU tokenization nodes run `slimpack tokenize` many times; torch costs a second each.
    code = "import sys, slimpack.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
