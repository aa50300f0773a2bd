"""Whole-shard column decoding equals `Shard.sample`, and the fast checks agree with per-sample ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from slimpack.shards import mds, schema
from slimpack.shards.columns import concat_columns, global_cu_seqlens
from slimpack.shards.invariants import sample_problems
from slimpack.shards.shard_checks import vectorised_checks as _vectorised_checks

BOS, EOS, VOCAB = 128_000, 128_001, 128_256


def shards(root: Path) -> list[mds.Shard]:
    entries = json.loads((root / schema.INDEX_FILENAME).read_text())["shards"]
    return [mds.load_shard(root, info) for info in mds.parse_index({"version": 2, "shards": entries})]


def test_concat_columns_equals_per_sample_decoding(dataset: Path) -> None:
    for shard in shards(dataset):
        cols = concat_columns(shard, ["tokens", "cu_seqlens", "doc_sources"])
        samples = [shard.sample(k) for k in range(len(shard))]
        for name, (values, counts) in cols.items():
            np.testing.assert_array_equal(values, np.concatenate([s[name] for s in samples]))
            assert values.dtype == np.dtype(schema.COLUMNS[name].split(":")[1])
            assert counts.tolist() == [len(s[name]) for s in samples]
        doc_cu = global_cu_seqlens(*cols["cu_seqlens"], cols["tokens"][1])
        lengths = np.concatenate([np.diff(s["cu_seqlens"]) for s in samples])
        np.testing.assert_array_equal(np.diff(doc_cu), lengths)


@pytest.mark.parametrize("seed", range(40))
def test_fast_checks_agree_with_per_sample_checks(dataset: Path, seed: int) -> None:
    """Random edits (control ids, out-of-vocab ids, moved boundaries): fast path says 'sound'
    exactly when every sample passes `sample_problems`."""
    rng = np.random.default_rng(seed)
    shard = shards(dataset)[seed % 5]
    samples = [{n: np.array(v) for n, v in shard.sample(k).items()} for k in range(len(shard))]
    s = samples[int(rng.integers(len(samples)))]
    kind = seed % 4
    if kind == 0:
        s["tokens"][rng.integers(len(s["tokens"]))] = rng.choice([BOS, EOS, VOCAB, 5])
    elif kind == 1 and len(s["cu_seqlens"]) > 2:
        s["cu_seqlens"][rng.integers(1, len(s["cu_seqlens"]) - 1)] += int(rng.integers(-3, 4))
    elif kind == 2:
        s["cu_seqlens"][-1] -= 1
    # kind 3 (and 1 with a single document): unchanged, must pass
    raw = _encode(shard, samples)
    fast = _vectorised_checks(mds.Shard(raw, shard.info, "edited"), bos_id=BOS, eos_id=EOS,
                               vocab_size=VOCAB)
    slow = [p for x in samples for p in sample_problems(x["tokens"], x["cu_seqlens"], bos_id=BOS, eos_id=EOS,
                                                        vocab_size=VOCAB, doc_sources=x["doc_sources"])]
    assert (fast is not None) == (not slow), slow


def _encode(shard: mds.Shard, samples: list[dict]) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        w = mds.ShardWriter(tmp, columns=schema.COLUMNS, compression=None, hashes=[], size_limit=1 << 30)
        for s in samples:
            w.write(s)
        w.finish()
        return (Path(tmp) / "shard.00000.mds").read_bytes()
