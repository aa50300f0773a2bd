"""PackedLoader against an independent reader: coverage, layout independence, resume, errors."""

import itertools
import json
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeline_data import PARTS, make_dataset, split_stream

from slimpack.pipeline import LoaderConfig, PackedLoader, step_digest
from slimpack.pipeline.order import epoch_order
from slimpack.shards import schema
from slimpack.shards.dataset import UnusableInputError as DatasetError
from slimpack.shards.mds import ShardFormatError

L, G_SEQS = 16, 8  # small windows so documents (2..200 tokens) cross them often


def cfg(path, **kw):
    base = dict(seq_len=L, global_batch_tokens=L * G_SEQS, micro_batch_size=2)
    base.update(kw)
    return LoaderConfig(str(path), **base)


@pytest.mark.parametrize("which", ["dataset", "interleaved"])
def test_epochs_cover_their_streams_exactly_once(which, request):
    dataset = request.getfixturevalue(which)
    loader = PackedLoader(cfg(dataset, epochs=2))
    assert loader.stream._contiguous == (which == "dataset")
    windows = loader.stream.sequences_per_epoch
    steps = list(loader)
    assert len(steps) == 2 * windows // G_SEQS and windows % G_SEQS  # one step straddles the epochs
    # world_size 1: micro-batches in order are the global sequences in order, so the concatenated
    # inputs are epoch 0's stream (all its whole windows), then epoch 1's.
    inputs = torch.cat([mb["input_ids"] for step in steps for mb in step]).numpy()
    labels = torch.cat([mb["labels"] for step in steps for mb in step]).numpy()
    offset = 0
    for epoch in (0, 1):
        order = epoch_order(len(loader.stream.samples), seed=0, epoch=epoch, fingerprint=loader.fingerprint)
        stream, starts = split_stream(dataset, "train", order)
        n = min(windows * L, len(inputs) - offset)
        # every token once, nothing duplicated or lost...
        assert np.array_equal(inputs[offset:offset + n], stream[:n])
        # ...labels are the stream shifted by one, -100 exactly where the next token starts a document
        crossing = np.zeros(n, bool)
        crossing[starts[(starts >= 1) & (starts <= n)] - 1] = True
        got = labels[offset:offset + n]
        assert np.array_equal(got[~crossing], stream[1:n + 1][~crossing])
        assert np.all(got[crossing] == -100)
        assert np.all(stream[:n][crossing] == 128001)  # only a document's EOS loses its label
        offset += n
        # only the tail shorter than a window is dropped, and it is reported
        assert loader.epoch_report()["dropped_tokens_per_epoch"] == len(stream) - windows * L
        assert 1 <= len(stream) - windows * L <= L
    assert offset == len(inputs)


def test_micro_batches_agree_with_their_documents(dataset):
    loader = PackedLoader(cfg(dataset, micro_batch_size=4, max_tokens=L * G_SEQS * 6))
    for step in loader:
        for mb in step:
            ids, labels, pos, cu = (mb[k].numpy()
                                    for k in ("input_ids", "labels", "position_ids", "cu_seqlens"))
            assert ids.dtype == labels.dtype == pos.dtype == np.int64 and cu.dtype == np.int32
            assert len(ids) == len(labels) == len(pos) == 4 * L and cu[0] == 0 and cu[-1] == 4 * L
            lengths = np.diff(cu)
            assert mb["max_seqlen"] == int(lengths.max()) and isinstance(mb["max_seqlen"], int)
            assert np.array_equal(pos, np.concatenate([np.arange(n) for n in lengths]))
            assert set(range(0, 4 * L, L)) <= set(cu.tolist())  # windows are boundaries
            # every BOS starts a segment; inside a segment no BOS, and an EOS only at its end
            assert set(np.flatnonzero(ids == 128000).tolist()) <= set(cu.tolist())
            for a, b in itertools.pairwise(cu):
                inner = labels[a:b - 1]
                assert not np.any(inner == 128000) and not np.any(inner == -100)
                assert labels[b - 1] != 128000  # never predict the next document's BOS


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_step_digests_independent_of_world_size_and_workers(dataset, world_size, num_workers):
    steps = 4
    per_rank = []
    for rank in range(world_size):
        loader = PackedLoader(cfg(dataset, micro_batch_size=G_SEQS // world_size // 2, rank=rank,
                                  world_size=world_size, num_workers=num_workers,
                                  max_tokens=L * G_SEQS * steps))
        per_rank.append(list(loader))
        assert loader.grad_accum == 2
    got = [step_digest([per_rank[r][s] for r in range(world_size)]) for s in range(steps)]
    reference = PackedLoader(cfg(dataset))
    assert got == [reference.step_digest(s) for s in range(steps)]


def test_no_shared_memory_or_temp_files_left_behind(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = set(os.listdir("/dev/shm"))
    loader = PackedLoader(cfg(dataset, num_workers=2, max_tokens=L * G_SEQS * 5))
    assert len(list(loader)) == 5
    del loader
    assert set(os.listdir("/dev/shm")) - before == set()
    assert list(tmp_path.iterdir()) == []


def _run(loader, steps):
    out = []
    if steps == 0:
        return out
    for step in loader:
        out.append(step)
        if len(out) == steps:
            break
    return out


def _same(a, b):
    assert len(a) == len(b)
    for sa, sb in zip(a, b, strict=True):
        for ma, mb in zip(sa, sb, strict=True):
            assert ma.keys() == mb.keys()
            for k in ma:
                if torch.is_tensor(ma[k]):
                    assert torch.equal(ma[k], mb[k]) and ma[k].dtype == mb[k].dtype
                else:
                    assert ma[k] == mb[k]


def test_resume_is_bitwise_identical_across_epoch_boundaries(dataset):
    full = PackedLoader(cfg(dataset, epochs=3))
    everything = list(full)
    total = len(everything)
    assert total == 3 * full.stream.sequences_per_epoch // G_SEQS
    straddle = full.stream.sequences_per_epoch // G_SEQS  # holds the end of epoch 0 and start of 1
    assert full.stream.epoch_of(straddle) == 0 and full.stream.epoch_of(straddle + 1) == 1
    # the next epoch is a fresh permutation, not a repeat
    assert full.step_digest(0) != full.step_digest(straddle + 1)
    for at in (0, 1, straddle - 1, straddle, straddle + 1, straddle + 4, total - 1):
        first = PackedLoader(cfg(dataset, epochs=3))
        _run(first, at)
        state = first.state_dict()
        assert state["step"] == at and state["epoch"] == first.stream.epoch_of(at)
        resumed = PackedLoader(cfg(dataset, epochs=3))
        resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
        _same(list(resumed), everything[at:])
    # with DataLoader workers too
    workers = PackedLoader(cfg(dataset, epochs=3, num_workers=2))
    workers.load_state_dict({**state, "step": straddle - 1, "epoch": 0})
    _same(_run(workers, 3), everything[straddle - 1:straddle + 2])
    # iterating again continues from the current state
    cont = PackedLoader(cfg(dataset, epochs=3))
    _run(cont, 2)
    _same(_run(cont, 2), everything[2:4])


def test_elastic_resume_on_another_world_size(dataset):
    one = PackedLoader(cfg(dataset, micro_batch_size=4))
    _run(one, 5)
    state = one.state_dict()
    ranks = []
    for rank in range(2):
        loader = PackedLoader(cfg(dataset, micro_batch_size=1, rank=rank, world_size=2))
        loader.load_state_dict(state)
        ranks.append(_run(loader, 3))
        assert loader.grad_accum == 4
    digests = [step_digest([ranks[0][s], ranks[1][s]]) for s in range(3)]
    assert digests == [one.step_digest(s) for s in range(5, 8)]


def test_state_mismatch_fails_loudly(dataset, tmp_path):
    loader = PackedLoader(cfg(dataset))
    state = loader.state_dict()
    assert set(state) >= {"epoch", "step", "seed", "seq_len", "global_batch_tokens", "fingerprint",
                          "version", "split"}
    with pytest.raises(ValueError, match="seq_len=16 but this loader has seq_len=32"):
        PackedLoader(cfg(dataset, seq_len=32, global_batch_tokens=32 * 8)).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=0 but this loader has seed=1"):
        PackedLoader(cfg(dataset, seed=1)).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_tokens=128"):
        PackedLoader(cfg(dataset, global_batch_tokens=L * 16)).load_state_dict(state)
    with pytest.raises(ValueError, match="different data"):
        PackedLoader(cfg(dataset, split="validation", global_batch_tokens=L * 4)).load_state_dict(state)
    other = make_dataset(tmp_path / "other", parts=PARTS, seed=1)
    with pytest.raises(ValueError, match="different data"):
        PackedLoader(cfg(other)).load_state_dict(state)
    with pytest.raises(ValueError, match="version 0"):
        loader.load_state_dict({**state, "version": 0})
    with pytest.raises(ValueError, match="inconsistent"):
        loader.load_state_dict({**state, "step": 3 * loader.steps_per_epoch + 3})


def test_epochs_and_max_tokens_bound_the_run(dataset):
    loader = PackedLoader(cfg(dataset, epochs=2))
    assert len(loader) == 2 * loader.stream.sequences_per_epoch // G_SEQS
    loader = PackedLoader(cfg(dataset, max_tokens=L * G_SEQS * 7 + 5))
    assert len(loader) == 7 and len(list(loader)) == 7 and len(loader) == 0
    with pytest.raises(TypeError, match="unbounded"):
        len(PackedLoader(cfg(dataset)))


def test_validation_split_and_held_out_batches(dataset):
    val = PackedLoader(cfg(dataset, split="validation", global_batch_tokens=L * 4))
    train = PackedLoader(cfg(dataset))
    assert val.fingerprint != train.fingerprint
    assert len(val.stream.samples) < len(train.stream.samples)
    first = val.first_micro_batches(5)
    again = PackedLoader(cfg(dataset, split="validation", global_batch_tokens=L * 4)).first_micro_batches(5)
    _same([first], [again])
    val_tokens = set(torch.cat([mb["input_ids"] for mb in first]).tolist())
    order = epoch_order(len(val.stream.samples), seed=0, epoch=0, fingerprint=val.fingerprint)
    stream, _ = split_stream(dataset, "validation", order)
    assert np.array_equal(torch.cat([mb["input_ids"] for mb in first]).numpy(), stream[:5 * 2 * L])
    assert val_tokens  # non-empty, from the held-out part only
    with pytest.raises(DatasetError, match="no split 'test'"):
        PackedLoader(cfg(dataset, split="test"))


def test_uncompressed_shards_are_memory_mapped_and_equal(tmp_path):
    plain = make_dataset(tmp_path / "plain", parts=PARTS, compression=None)
    loader = PackedLoader(cfg(plain, epochs=1))
    order = epoch_order(len(loader.stream.samples), seed=0, epoch=0, fingerprint=loader.fingerprint)
    stream, _ = split_stream(plain, "train", order)
    inputs = torch.cat([mb["input_ids"] for step in loader for mb in step]).numpy()
    assert np.array_equal(inputs, stream[:len(inputs)])
    # Mappings count against decoded_cache_bytes like decoded shards: a small budget keeps few of
    # them open however many shards the run reads, and the batches stay equal.
    n_shards = len(loader.stream._store.index.shard_names)
    small = PackedLoader(cfg(plain, epochs=1, decoded_cache_bytes=1))
    held = []
    for step in small:
        held += [mb["input_ids"] for mb in step]
        assert len(small.stream._store._decoded) == 1
    assert small.stream._store.decodes > n_shards > 1
    assert np.array_equal(torch.cat(held).numpy(), inputs)


def test_corrupt_and_mismatched_data_fail_loudly(dataset, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(dataset, bad)
    shard = sorted((bad / "parts/train/chunk1/a").glob("shard.*.mds.zstd"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    for workers in (0, 2):
        loader = PackedLoader(cfg(bad, epochs=1, num_workers=workers))
        with pytest.raises(ShardFormatError, match=r"shard\.00000\.mds\.zstd.*xxh3_64"):
            list(loader)

    counts = tmp_path / "counts"
    shutil.copytree(dataset, counts)
    tokens = np.load(counts / schema.SAMPLE_TOKENS_FILENAME)
    np.save(counts / schema.SAMPLE_TOKENS_FILENAME, tokens[:-1])
    with pytest.raises(DatasetError, match="different merges"):
        PackedLoader(cfg(counts))
    tokens[3] += 1
    np.save(counts / schema.SAMPLE_TOKENS_FILENAME, tokens)
    loader = PackedLoader(cfg(counts, epochs=1))
    with pytest.raises(ShardFormatError, match=r"sample \d+ \(global 3\).*sample_tokens.npy says"):
        list(loader)

    with pytest.raises(DatasetError, match=r"slimpack\.json: missing"):
        PackedLoader(cfg(tmp_path))


def _max_open_shards(loader):
    first, last = {}, {}
    for s in range(loader.steps_per_epoch):
        for i in loader.stream.shards_for(s).tolist():
            first.setdefault(i, s)
            last[i] = s
    return max(sum(first[i] <= s <= last[i] for i in first) for s in range(loader.steps_per_epoch))


def test_locality_mode_bounds_shards_in_use_and_still_covers_the_stream(dataset):
    k = 2
    loader = PackedLoader(cfg(dataset, epochs=1, locality_shards=k))
    order = epoch_order(len(loader.stream.samples), seed=0, epoch=0, fingerprint=loader.fingerprint,
                        sample_shards=loader.index.shard_of(loader.stream.samples), locality_shards=k)
    stream, _ = split_stream(dataset, "train", order)
    inputs = torch.cat([mb["input_ids"] for step in loader for mb in step]).numpy()
    assert np.array_equal(inputs, stream[:len(inputs)])
    assert _max_open_shards(loader) <= 2 * k  # a window, plus the next one across its boundary
    assert _max_open_shards(PackedLoader(cfg(dataset, epochs=1))) > 2 * k  # a full shuffle is not bounded
    with pytest.raises(ValueError, match="locality_shards=2 but this loader has locality_shards=None"):
        PackedLoader(cfg(dataset)).load_state_dict(loader.state_dict())


def test_a_micro_batch_across_the_epoch_end_joins_both_streams(dataset):
    loader = PackedLoader(cfg(dataset, micro_batch_size=G_SEQS))  # one micro-batch per step
    windows = loader.stream.sequences_per_epoch
    straddle, in_epoch0 = divmod(windows, G_SEQS)
    assert in_epoch0, "the fixture should put an epoch end inside a step"
    mb = loader.micro_batches(straddle)[0]
    streams = [split_stream(dataset, "train", epoch_order(len(loader.stream.samples), seed=0, epoch=e,
                                                         fingerprint=loader.fingerprint))[0] for e in (0, 1)]
    head = streams[0][(windows - in_epoch0) * L:windows * L]
    tail = streams[1][:(G_SEQS - in_epoch0) * L]
    assert np.array_equal(mb["input_ids"].numpy(), np.concatenate([head, tail]))
    assert mb["labels"][len(head) - 1] in (streams[0][windows * L], -100)  # epoch 0's own next token
    cu = mb["cu_seqlens"].tolist()
    assert len(head) in cu and cu[-1] == G_SEQS * L and mb["position_ids"][len(head)] == 0


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq_len=st.sampled_from([5, 16, 37]), world_size=st.sampled_from([1, 2, 3]),
       micro=st.integers(1, 3), accum=st.integers(1, 3), step=st.integers(0, 400))
def test_ranks_tile_every_step_for_any_layout(dataset, seq_len, world_size, micro, accum, step):
    sequences = world_size * micro * accum
    base = dict(seq_len=seq_len, global_batch_tokens=seq_len * sequences, micro_batch_size=micro,
                world_size=world_size)
    ranks = [PackedLoader(LoaderConfig(str(dataset), rank=r, **base)) for r in range(world_size)]
    step %= 3 * ranks[0].steps_per_epoch
    got = step_digest([loader.micro_batches(step) for loader in ranks])
    assert got == ranks[0].step_digest(step)
