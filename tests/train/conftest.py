"""Fixtures of the training tests: a small real dataset (the real tokenize job over word salad)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = ["the", "model", "reads", "packed", "documents", "and", "learns", "which", "token", "follows",
         "in", "every", "sequence", "of", "stream", "while", "gradients", "flow", "through", "shards"]


@pytest.fixture(scope="session")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~8K train tokens in documents of 6-121 tokens; a validation split of 12 documents of which
    the first 8 hold at least 64 tokens (for loss by position)."""
    from slimpack.tokenize.job import TokenizeConfig, run_tokenize

    root = tmp_path_factory.mktemp("ledger-data")
    rng = random.Random(1)
    for split, words in (("train", [rng.randrange(5, 120) for _ in range(120)]),
                         ("validation", [rng.randrange(70, 150) for _ in range(8)] + [5, 9, 20, 30])):
        lines = []
        for n in words:
            start = rng.randrange(len(WORDS))
            text = " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))
            lines.append(json.dumps({"text": text, "meta": {"redpajama_set_name": "Synthetic"}}))
        path = root / "corpus" / split / "chunk1" / f"example_{split}_0.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
    report = run_tokenize([str(root / "corpus")], str(root / "shards"), TokenizeConfig(block_tokens=512),
                          workers=1, progress=False)
    assert report.ok, report.summary()
    return root / "shards"
