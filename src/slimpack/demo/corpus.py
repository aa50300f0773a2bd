"""The demo corpus: real human-written text every Python installation ships (the pydoc topic help,
standard-library docstrings and source, the Python licence), labelled by what it really is, in
SlimPajama's layout. No network and no torch: the core profile's CPU tools run on it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics

import zstandard

# Honest labels: what each document really is (SlimPajama's field, our values).
SOURCE_TOPICS = "PythonDocsTopics"
SOURCE_DOCSTRINGS = "PythonStdlibDocstrings"
SOURCE_CODE = "PythonStdlibSource"
SOURCE_LICENSE = "PythonLicense"

_TRAIN_FILES = 4
_MAX_CODE_DOCS = 300  # keeps the corpus (and the demo) small: about 10 MB of text


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in ("site-packages", "dist-packages", "test", "idlelib", "lib2to3") or "tests" in rel:
            continue
        files.append(path)
    return files


def iter_corpus() -> Iterator[tuple[str, str, str]]:
    """(document id, source label, text) for every demo document, in a fixed order."""
    for name in sorted(topics):
        if topics[name].strip():
            yield f"topic:{name}", SOURCE_TOPICS, topics[name]
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _stdlib_files()
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = []
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    title = getattr(node, "name", path.relative_to(root).as_posix())
                    docs.append(f"{title}\n\n{doc}")
        if docs:
            yield f"docstrings:{path.relative_to(root)}", SOURCE_DOCSTRINGS, "\n\n".join(dict.fromkeys(docs))
    step = max(1, len(files) // _MAX_CODE_DOCS)
    for path in files[::step]:
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield f"source:{path.relative_to(root)}", SOURCE_CODE, text
    for lic in (root / "LICENSE.txt", Path(sys.base_prefix) / "LICENSE.txt"):
        if lic.exists():
            yield "license", SOURCE_LICENSE, lic.read_text(encoding="utf-8", errors="replace")
            break


def build_corpus(out: Path) -> dict[str, int]:
    """Write the corpus as SlimPajama-style `*.jsonl.zst` files; returns documents per file."""
    files: dict[str, list[bytes]] = {}
    for doc_id, source, text in iter_corpus():
        bucket = int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % 20
        if bucket == 0:
            name = "validation/chunk1/example_holdout_0.jsonl.zst"
        elif bucket == 1:
            name = "test/chunk1/example_holdout_0.jsonl.zst"
        else:
            name = f"train/chunk1/example_train_{bucket % _TRAIN_FILES}.jsonl.zst"
        line = json.dumps({"text": text, "meta": {"redpajama_set_name": source}}, ensure_ascii=False)
        files.setdefault(name, []).append(line.encode("utf-8") + b"\n")
    counts = {}
    for name in sorted(files):
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(zstandard.ZstdCompressor(level=3).compress(b"".join(files[name])))
        counts[name] = len(files[name])
    return counts
