"""Provenance recorded with every artifact (manifest, checkpoints): the git commit when known."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path


@cache
def git_sha() -> str | None:
    """HEAD of the checkout this package runs from, or None (installed wheel, no git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None
