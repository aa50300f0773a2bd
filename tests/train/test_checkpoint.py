"""Checkpoints: exact round trip of model and optimiser, atomic directories, keep-last-K, export reads,
checksums (a truncated or bit-flipped file is named before loading; resume falls back past it)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist

from slimpack.model.transformer import Transformer, model_config
from slimpack.train import checkpoint as ckpt
from slimpack.train.config import OptimSection, ParallelSection
from slimpack.train.loop import train_step
from slimpack.train.optim import build_optimizer
from slimpack.train.parallel import init_distributed, parallelize


@pytest.fixture(scope="module")
def dist1():
    d = init_distributed("cpu")
    yield d
    dist.destroy_process_group()


def _batch(seed: int, T: int = 64) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (T,), generator=g)
    cu = torch.tensor([0, 20, T], dtype=torch.int32)
    pos = torch.cat([torch.arange(20), torch.arange(T - 20)])
    labels = torch.roll(ids, -1).clone()
    labels[[19, T - 1]] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "cu_seqlens": cu, "max_seqlen": T - 20}


def _trained(d, seed: int):
    torch.manual_seed(seed)
    model = Transformer(model_config("tiny"))
    parallelize(model, d.mesh, ParallelSection(mixed_precision=False), d.device)
    opt = build_optimizer(model, OptimSection(lr=1e-2), d.device)
    for s in range(2):
        train_step(model, opt, [_batch(s)], device=d.device, world_size=1, grad_clip_norm=1.0)
    return model, opt


def _full(model) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor().clone() for k, v in model.state_dict().items()}


def test_round_trip_is_exact_and_training_continues_identically(dist1, tmp_path):
    model, opt = _trained(dist1, seed=0)
    path = ckpt.save_checkpoint(tmp_path, 2, model, opt, {"tokens": 128, "loader": {"step": 2}}, keep_last=3)
    assert path.name == "step_00000002" and json.loads((path / "meta.json").read_text())["tokens"] == 128
    expected = _full(model)
    # Continue the original one step; a different model restored from disk must do the same step.
    loss_a = train_step(model, opt, [_batch(7)], device=dist1.device, world_size=1, grad_clip_norm=1.0)[0]
    other, other_opt = _trained(dist1, seed=1)
    assert not all(torch.equal(v, expected[k]) for k, v in _full(other).items())
    meta = ckpt.load_checkpoint(path, other, other_opt)
    assert meta["step"] == 2 and meta["loader"] == {"step": 2}
    assert all(torch.equal(v, expected[k]) for k, v in _full(other).items())
    loss_b = train_step(other, other_opt, [_batch(7)], device=dist1.device, world_size=1,
                        grad_clip_norm=1.0)[0]
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(v, _full(model)[k]) for k, v in _full(other).items())

    weights, meta = ckpt.load_model_state_dict(path)  # no process group needed (export path)
    assert set(weights) == set(expected) and all(torch.equal(weights[k], expected[k]) for k in expected)


def test_an_async_save_returns_before_the_write_and_saves_the_state_of_its_step(dist1, tmp_path, monkeypatch):
    """AsyncCheckpointer: training waits only for the host copy. The writer is held at a gate (around
    the real dcp.save) so the test sees the moment after `save` returned: nothing written yet, the
    older checkpoint still there, training already changing the weights."""
    import threading

    model, opt = _trained(dist1, seed=0)
    gate = threading.Event()
    write = ckpt.dcp.save
    monkeypatch.setattr(ckpt.dcp, "save", lambda *a, **k: (gate.wait(60), write(*a, **k))[1])
    saver = ckpt.AsyncCheckpointer()
    gate.set()
    first = saver.save(tmp_path, 2, model, opt, {"tokens": 1}, keep_last=1)
    assert saver.wait() == first and ckpt.list_checkpoints(tmp_path) == [first]
    expected = _full(model)
    gate.clear()
    path = saver.save(tmp_path, 3, model, opt, {"tokens": 2}, keep_last=1)
    assert not path.exists() and ckpt.list_checkpoints(tmp_path) == [first]  # not written, nothing deleted
    train_step(model, opt, [_batch(7)], device=dist1.device, world_size=1, grad_clip_norm=1.0)  # goes on
    gate.set()
    assert saver.wait() == path and ckpt.list_checkpoints(tmp_path) == [path]  # then the old one went
    weights, meta = ckpt.load_model_state_dict(path)  # verifies the checksums first
    assert meta["tokens"] == 2 and all(torch.equal(weights[k], expected[k]) for k in expected)
    assert not all(torch.equal(v, expected[k]) for k, v in _full(model).items())
    # A failed write is raised by the next wait (here: the checkpoint root is a file).
    (tmp_path / "a-file").write_text("")
    saver.save(tmp_path / "a-file", 4, model, opt, {}, keep_last=1)
    with pytest.raises(OSError):
        saver.wait()
    assert saver.wait() == path  # raised once


def test_interrupted_saves_are_never_listed_and_keep_last_prunes(dist1, tmp_path):
    model, opt = _trained(dist1, seed=0)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, opt, {}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    # A save killed mid-way: DCP files written, no meta.json, still the .tmp name.
    broken = tmp_path / "step_00000009.tmp"
    broken.mkdir()
    (broken / ".metadata").write_bytes(b"partial")
    # A directory with the final name but no meta.json (e.g. copied by hand, incomplete) is no checkpoint.
    (tmp_path / "step_00000010").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000003"
    with pytest.raises(FileNotFoundError, match="not a complete slimpack checkpoint"):
        ckpt.load_checkpoint(tmp_path / "step_00000010", model, opt)
    ckpt.save_checkpoint(tmp_path, 4, model, opt, {}, keep_last=2)
    assert not broken.exists()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]


def test_keep_last_never_deletes_the_checkpoint_just_saved(dist1, tmp_path):
    # A run resumed from an older checkpoint (--resume step_00000002) saves steps below ones already
    # there; the save it just made must survive pruning, with the newest keep_last - 1 others.
    model, opt = _trained(dist1, seed=0)
    for step in (2, 5, 6):
        ckpt.save_checkpoint(tmp_path, step, model, opt, {}, keep_last=2)
    saved = ckpt.save_checkpoint(tmp_path, 3, model, opt, {}, keep_last=2)
    assert (saved / "meta.json").is_file()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000006"]
    ckpt.save_checkpoint(tmp_path, 4, model, opt, {}, keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000004"]


def test_a_kill_while_pruning_never_leaves_a_listed_half_deleted_checkpoint(dist1, tmp_path, monkeypatch):
    model, opt = _trained(dist1, seed=0)
    ckpt.save_checkpoint(tmp_path, 1, model, opt, {}, keep_last=1)
    real_rmtree = ckpt.shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        # What SIGKILL during the delete leaves: data files gone, meta.json not reached yet.
        path = tmp_path / path
        if not path.exists():
            return real_rmtree(path, ignore_errors=ignore_errors)
        for f in path.iterdir():
            if f.name != "meta.json":
                f.unlink()
        raise KeyboardInterrupt("killed while deleting")

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, model, opt, {}, keep_last=1)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002"]
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), model, opt)
    ckpt.save_checkpoint(tmp_path, 3, model, opt, {}, keep_last=1)  # cleans up the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]


def test_unfinished_save_is_refused_by_resume_and_export(dist1, tmp_path):
    # Rank 0 writes meta.json into step_N.tmp before the rename; killed in between (or while
    # meta.json is half-written), the .tmp directory must still never load.
    model, opt = _trained(dist1, seed=0)
    done = ckpt.save_checkpoint(tmp_path, 1, model, opt, {}, keep_last=2)
    tmp = tmp_path / "step_00000002.tmp"
    shutil.copytree(done, tmp)
    with pytest.raises(FileNotFoundError, match="unfinished save"):
        ckpt.load_checkpoint(tmp, model, opt)
    with pytest.raises(FileNotFoundError, match="unfinished save"):
        ckpt.load_model_state_dict(tmp)


def test_train_step_gradient_is_that_of_the_mean_over_all_micro_batch_tokens(dist1):
    # Micro-batches with different numbers of valid labels: each token weighs 1/total, not each
    # micro-batch 1/grad_accum. AdamW hides a constant factor, so compare the gradient norm itself.
    from slimpack.train.loss import count_valid, cross_entropy_sum

    torch.manual_seed(0)
    ref = Transformer(model_config("tiny"))
    model = Transformer(model_config("tiny"))
    model.load_state_dict(ref.state_dict())
    parallelize(model, dist1.mesh, ParallelSection(mixed_precision=False), dist1.device)
    opt = build_optimizer(model, OptimSection(), dist1.device)
    a, b = _batch(0), _batch(1, T=32)
    b["labels"][:20] = -100
    total = sum(cross_entropy_sum(ref(mb["input_ids"], mb["position_ids"], mb["cu_seqlens"], mb["max_seqlen"]),
                                  ref.output.weight, mb["labels"]) for mb in (a, b))
    (total / (count_valid(a["labels"]) + count_valid(b["labels"]))).backward()
    want = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))
    loss_sum, n_valid, got = train_step(model, opt, [a, b], device=dist1.device, world_size=1,
                                        grad_clip_norm=1e9)
    assert n_valid.item() == 62 + 11
    torch.testing.assert_close(loss_sum, total.detach())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def _damage(path, how: str, name: str = "__0_0.distcp") -> str:
    """Truncate or flip one byte of a checkpoint file (the one rank's data file by default), as a disk
    or copy would."""
    data = path / name
    raw = bytearray(data.read_bytes())
    if how == "truncate":
        data.write_bytes(raw[: len(raw) // 2])
    else:
        raw[len(raw) // 2] ^= 0x10
        data.write_bytes(raw)
    return data.name


@pytest.mark.parametrize("how,name", [("truncate", "__0_0.distcp"), ("flip", "__0_0.distcp"),
                                      ("flip", "position_frequency.npy")])
def test_a_damaged_checkpoint_is_named_before_anything_is_loaded(dist1, tmp_path, how, name):
    model, opt = _trained(dist1, seed=0)
    ledger = np.arange(64, dtype=np.int64).tobytes()  # an extra file, as the position ledger is saved
    path = ckpt.save_checkpoint(tmp_path, 2, model, opt, {}, keep_last=3,
                                extra_files={"position_frequency.npy": ledger})
    files = json.loads((path / "meta.json").read_text())["files"]
    assert set(files) == {p.name for p in path.iterdir()} - {"meta.json"}
    assert {".metadata", "position_frequency.npy"} <= set(files)
    name = _damage(path, how, name)
    other, other_opt = _trained(dist1, seed=1)
    before = _full(other)
    with pytest.raises(ckpt.CheckpointCorrupt, match=re.escape(f"checkpoint {path} is corrupt: {name} has")):
        ckpt.load_checkpoint(path, other, other_opt)
    assert all(torch.equal(v, before[k]) for k, v in _full(other).items())  # refused before loading
    with pytest.raises(ckpt.CheckpointCorrupt, match=name):  # export-hf's reader checks too
        ckpt.load_model_state_dict(path)


def test_resume_falls_back_past_a_corrupt_newest_checkpoint_and_sets_it_aside(dist1, tmp_path):
    model, opt = _trained(dist1, seed=0)
    ckpt.save_checkpoint(tmp_path, 1, model, opt, {"loader": {"step": 1}}, keep_last=3)
    expected = _full(model)
    train_step(model, opt, [_batch(5)], device=dist1.device, world_size=1, grad_clip_norm=1.0)
    newest = ckpt.save_checkpoint(tmp_path, 2, model, opt, {"loader": {"step": 2}}, keep_last=3)
    _damage(newest, "truncate")
    other, other_opt = _trained(dist1, seed=1)
    # An explicit --resume PATH is what the user asked for: no fallback, a clear error.
    with pytest.raises(ckpt.CheckpointCorrupt, match="step_00000002 is corrupt"):
        ckpt.load_for_resume(newest, other, other_opt, fall_back=False)
    path, meta = ckpt.load_for_resume(newest, other, other_opt, fall_back=True)
    assert path.name == "step_00000001" and meta["loader"] == {"step": 1}
    assert all(torch.equal(v, expected[k]) for k, v in _full(other).items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002.corrupt"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000001"


def test_resume_with_no_good_checkpoint_moves_nothing(dist1, tmp_path):
    model, opt = _trained(dist1, seed=0)
    for step in (1, 2):
        _damage(ckpt.save_checkpoint(tmp_path, step, model, opt, {}, keep_last=3), "flip")
    with pytest.raises(ckpt.CheckpointCorrupt, match=r"no checkpoint under .* verifies \(2 tried.*nothing was moved"):
        ckpt.load_for_resume(ckpt.latest_checkpoint(tmp_path), model, opt, fall_back=True)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]


def test_a_torn_meta_json_or_a_files_entry_outside_the_checkpoint_is_corrupt(dist1, tmp_path):
    model, opt = _trained(dist1, seed=0)
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, {}, keep_last=3)
    meta = json.loads((path / "meta.json").read_text())
    (tmp_path / "outside").write_bytes(b"x")
    meta["files"]["../outside"] = {"bytes": 1, "xxh3_128": "0"}
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointCorrupt, match=re.escape("bad files entry '../outside'")):
        ckpt.load_checkpoint(path, model, opt)
    (path / "meta.json").write_text(json.dumps(meta)[:100])
    with pytest.raises(ckpt.CheckpointCorrupt, match=r"meta\.json is unreadable"):
        ckpt.load_checkpoint(path, model, opt)


def test_a_checkpoint_without_checksums_loads_with_a_warning_and_a_malformed_files_record_is_corrupt(
        dist1, tmp_path, caplog):
    model, opt = _trained(dist1, seed=0)
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, {}, keep_last=3)
    expected = _full(model)
    meta = json.loads((path / "meta.json").read_text())
    other, other_opt = _trained(dist1, seed=1)
    # Saved before checksums were recorded: no "files" at all. Loads, saying it is unverified.
    (path / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "files"}))
    with caplog.at_level("WARNING", logger="slimpack.model.checkpoint_files"):
        ckpt.load_checkpoint(path, other, other_opt)
    assert f"checkpoint {path} records no checksums" in caplog.text and "loading it unverified" in caplog.text
    assert all(torch.equal(v, expected[k]) for k, v in _full(other).items())
    # A "files" record that is not a {name: {bytes, xxh3_128}} map naming .metadata, or whose entry
    # has no integer size, is corrupt, refused before anything is loaded.
    fresh, fresh_opt = _trained(dist1, seed=1)
    before = _full(fresh)
    no_metadata = {k: v for k, v in meta["files"].items() if k != ".metadata"}
    bad_size = {**meta["files"], ".metadata": {"bytes": "12", "xxh3_128": "0"}}
    for files, message in (("not a map", "has no valid 'files' record"), ([], "has no valid 'files' record"),
                           (no_metadata, "has no valid 'files' record"), (bad_size, "bad files entry '.metadata'")):
        (path / "meta.json").write_text(json.dumps({**meta, "files": files}))
        with pytest.raises(ckpt.CheckpointCorrupt, match=re.escape(message)):
            ckpt.load_checkpoint(path, fresh, fresh_opt)
        with pytest.raises(ckpt.CheckpointCorrupt, match=re.escape(message)):
            ckpt.load_model_state_dict(path)
    assert all(torch.equal(v, before[k]) for k, v in _full(fresh).items())
