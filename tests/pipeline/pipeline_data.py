"""Synthetic slimpack datasets for the pipeline tests, written with the real shard writer and merge.

Documents are ``BOS body EOS`` with random lengths (including 2-token documents and documents
longer than a window); parts carry train/validation splits as the tokenize job writes them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from slimpack.shards import schema
from slimpack.shards.mds import MDSDataset, ShardWriter
from slimpack.tokenize.merge import fingerprint, merge_dataset

BOS, EOS, VOCAB = 128000, 128001, 128256


def _documents(rng: np.random.Generator, num_docs: int, max_doc: int) -> list[np.ndarray]:
    lengths = rng.integers(2, max_doc + 1, num_docs)
    lengths[rng.random(num_docs) < 0.1] = 2  # bare BOS EOS documents
    docs = []
    for n in lengths:
        doc = rng.integers(0, BOS, n).astype(np.uint32)
        doc[0], doc[-1] = BOS, EOS
        docs.append(doc)
    return docs


def make_dataset(root: Path, *, parts: dict[str, tuple[str, int]], block_tokens: int = 300,
                 max_doc: int = 200, shard_size_limit: int = 4096, compression: str | None = "zstd:1",
                 seed: int = 0) -> Path:
    """Write ``parts`` ({part name: (split, documents)}) under ``root`` and merge them."""
    rng = np.random.default_rng(seed)
    for part, (split, num_docs) in sorted(parts.items()):
        out = root / schema.PARTS_DIRNAME / part
        writer = ShardWriter(out, columns=schema.COLUMNS, compression=compression,
                             size_limit=shard_size_limit)
        docs = _documents(rng, num_docs, max_doc)
        sample_tokens, block = [], []
        for i, doc in enumerate(docs):
            block.append(doc)
            if sum(map(len, block)) >= block_tokens or i == len(docs) - 1:
                tokens = np.concatenate(block)
                cu = np.concatenate([[0], np.cumsum([len(d) for d in block])]).astype(np.int32)
                writer.write({"tokens": tokens, "cu_seqlens": cu,
                              "doc_sources": np.zeros(len(block), np.uint32)})
                sample_tokens.append(len(tokens))
                block = []
        index = writer.finish()
        total = int(sum(sample_tokens))
        stats = {
            "schema_version": schema.SCHEMA_VERSION, "part": part, "split": split,
            "input": {"path": f"/synthetic/{part}", "kind": "synthetic", "bytes": 0, "sha256": None},
            "documents": num_docs, "tokens": total, "samples": len(sample_tokens),
            "shards": len(index["shards"]), "sample_tokens": sample_tokens,
            "sources": {"synthetic": {"id": 0, "documents": num_docs, "tokens": total}},
            "skipped": {}, "bad_examples": [], "surrogates_replaced": 0,
            "tokenizer": {"name": "synthetic", "sha256": "0" * 64, "bos_id": BOS, "eos_id": EOS,
                          "vocab_size": VOCAB},
            "config": {"block_tokens": block_tokens, "compression": compression}, "slimpack_version": "test",
        }
        (out / schema.PART_STATS_FILENAME).write_text(json.dumps(stats))
    merge_dataset(str(root))
    return root


PARTS = {"train/chunk1/a": ("train", 120), "train/chunk1/b": ("train", 90),
         "validation/chunk1/a": ("validation", 40)}
INTERLEAVED_PARTS = {"chunk1/a": ("train", 60), "chunk1/b": ("validation", 30), "chunk2/a": ("train", 60)}


def split_stream(root: Path, split: str, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference epoch stream read with the plain MDS reader: (tokens int64, document starts)."""
    ds = MDSDataset(root)
    manifest = json.loads((root / schema.MANIFEST_FILENAME).read_text())
    ids = []
    for i, shard in enumerate(ds.shards):
        part = shard.basename.split("/shard.")[0][len("parts/"):]
        if manifest["parts"][part]["split"] == split:
            ids.extend(range(int(ds.shard_starts[i]), int(ds.shard_starts[i + 1])))
    tokens, starts, offset = [], [], 0
    for k in order:
        s = ds[ids[k]]
        tokens.append(s["tokens"].astype(np.int64))
        starts.append(s["cu_seqlens"][:-1].astype(np.int64) + offset)
        offset += len(s["tokens"])
    return np.concatenate(tokens), np.concatenate(starts)


def escape_part(root: Path, part: str, name: str) -> Path:
    """Rewrite a merged dataset as a hostile writer would: ``part``'s files move to where
    ``parts/<name>`` points (``name`` such as ``../../outside`` leaves the root) and every name,
    count and the fingerprint agree, so nothing but the path gives it away. Returns the new
    directory of the part's files."""
    target = Path(os.path.normpath(root / schema.PARTS_DIRNAME / name))
    shutil.move(root / schema.PARTS_DIRNAME / part, target)
    index = json.loads((root / schema.INDEX_FILENAME).read_text())
    old, new = f"{schema.PARTS_DIRNAME}/{part}/", f"{schema.PARTS_DIRNAME}/{name}/"
    for entry in index["shards"]:
        for key in ("raw_data", "zip_data"):
            if entry[key] and entry[key]["basename"].startswith(old):
                entry[key]["basename"] = new + entry[key]["basename"][len(old):]
    manifest = json.loads((root / schema.MANIFEST_FILENAME).read_text())
    manifest["parts"][name] = manifest["parts"].pop(part)
    manifest["fingerprint"] = fingerprint(index["shards"], manifest["tokenizer"]["sha256"],
                                          {p: v["split"] for p, v in manifest["parts"].items()})
    (root / schema.INDEX_FILENAME).write_text(json.dumps(index, sort_keys=True))
    (root / schema.MANIFEST_FILENAME).write_text(json.dumps(manifest, sort_keys=True))
    return target
