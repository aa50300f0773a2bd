"""The project stands alone: no tracked file points at anything beside the repository.

A clone holds only the repository, so a default, a doc link or a benchmark input under `../` is a
path that does not exist for anyone else (issue 13: the design, three benches and two tests once
defaulted to a directory beside the checkout).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The sibling directory the project once read its design and sample data from, and the absolute
# root of the machine it was developed on. (Not every "../": path-traversal tests need that one.)
# Spelled in pieces so that this file does not match itself.
_OUTSIDE = re.compile(r"\.\./" + r"shared\b|(?<![\w.])/" + "work/")


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    files = [REPO / name for name in out.stdout.decode().split("\0") if name]
    return [f for f in files if f.is_file() and b"\0" not in f.read_bytes()[:8192]]


def test_no_tracked_file_refers_outside_the_repository():
    offenders = []
    for path in _tracked_text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if _OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}")
    assert not offenders, "paths outside the repository:\n" + "\n".join(offenders)
