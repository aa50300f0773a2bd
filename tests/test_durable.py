"""Durable writes: every file a resume or a merge trusts is fsynced before its rename, and its
directory after (storage.write_atomic), on local disk.

A power loss cannot be staged in a test, so what is checked is what makes one harmless: the
fsync calls and their order, on real files. A wrapper around ``os.fsync`` records the path of each
fsynced file or directory, in this process and (through ``sitecustomize``) in the processes that
tokenize spawns.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

SPY = '''
import os

_LOG = os.environ.get("SLIMPACK_TEST_FSYNC_LOG")
_real_fsync = os.fsync


def fsync(fd):
    _real_fsync(fd)
    line = (os.readlink(f"/proc/self/fd/{fd}") + "\\n").encode()
    out = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(out, line)
    finally:
        os.close(out)


if _LOG:
    os.fsync = fsync
'''
_TMP = re.compile(r"\.tmp\d+\.\d+$")  # write_atomic's temporary name: the fsync happens before the rename


@pytest.fixture
def fsyncs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[str]]:
    """Returns a function that lists the paths fsynced so far, in order (temporary names mapped
    to the final ones)."""
    log = tmp_path_factory.mktemp("fsync") / "log"
    hook = tmp_path_factory.mktemp("hook")
    (hook / "sitecustomize.py").write_text(SPY)
    monkeypatch.setenv("SLIMPACK_TEST_FSYNC_LOG", str(log))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    spy: dict = {}
    exec(SPY, spy)
    monkeypatch.setattr(os, "fsync", spy["fsync"])

    def read() -> list[str]:
        lines = log.read_text().splitlines() if log.exists() else []
        return [_TMP.sub("", line) for line in lines]

    return read


def _check_durable(path: Path, log: list[str]) -> None:
    """``path`` was fsynced, and its directory after it."""
    assert str(path) in log, f"{path} was never fsynced"
    after = log[log.index(str(path)) + 1:]
    assert str(path.parent) in after, f"{path.parent} was not fsynced after {path.name}"


def test_write_atomic_fsyncs_the_file_then_its_directory(tmp_path: Path, fsyncs) -> None:
    from slimpack.storage import write_atomic

    target = tmp_path / "stats.json"
    write_atomic(target, b"{}")
    assert fsyncs() == [str(target), str(tmp_path)]
    assert target.read_bytes() == b"{}"


def test_root_write_bytes_makes_new_directories_durable(tmp_path: Path, fsyncs) -> None:
    from slimpack.storage import Root

    Root(str(tmp_path / "out")).write_bytes("parts/p/stats.json", b"{}")
    log = fsyncs()
    _check_durable(tmp_path / "out/parts/p/stats.json", log)
    for new in ("out", "out/parts", "out/parts/p"):  # each created directory, in its parent
        assert str((tmp_path / new).parent) in log


def test_tokenize_and_merge_write_every_file_durably(demo_corpus: Path, tmp_path: Path, fsyncs) -> None:
    from slimpack.shards import schema
    from slimpack.tokenize.job import TokenizeConfig, run_tokenize

    out = tmp_path / "out"
    report = run_tokenize([str(demo_corpus)], str(out), TokenizeConfig(block_tokens=4096, shard_size_limit=1 << 17),
                          progress=False, workers=1)
    assert report.ok and report.merged
    log = fsyncs()
    files = sorted(p for p in out.rglob("*") if p.is_file())
    names = {p.name for p in files}
    assert {schema.PART_STATS_FILENAME, schema.INDEX_FILENAME, schema.MANIFEST_FILENAME,
            schema.SAMPLE_TOKENS_FILENAME, schema.INPUTS_FILENAME} <= names
    assert any(n.endswith(".mds.zstd") for n in names)
    for path in files:  # shards, each part's index.json and stats.json, the merged files, reports
        _check_durable(path, log)


def test_ledger_history_metrics_and_run_id_are_durable(tmp_path: Path, fsyncs) -> None:
    pytest.importorskip("torch")
    from slimpack.train.ledger import write_position_frequency
    from slimpack.train.loop import _run_id
    from slimpack.train.metrics import _truncate_after

    _check_durable(write_position_frequency(tmp_path, 4, b"ledger"), fsyncs())
    _run_id(tmp_path)
    _check_durable(tmp_path / "run.json", fsyncs())
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n{"step": 2}\n')
    _truncate_after(metrics, 1)  # a resume from step 1 drops step 2
    assert metrics.read_text() == '{"step": 1}\n'
    _check_durable(metrics, fsyncs())


def test_a_checkpoint_is_durable_before_its_name_says_complete(tmp_path: Path, fsyncs) -> None:
    torch = pytest.importorskip("torch")
    import torch.distributed as dist

    from slimpack.model.transformer import Transformer, model_config
    from slimpack.train import checkpoint as ckpt
    from slimpack.train.config import OptimSection, ParallelSection
    from slimpack.train.optim import build_optimizer
    from slimpack.train.parallel import init_distributed, parallelize

    d = init_distributed("cpu")
    try:
        torch.manual_seed(0)
        model = Transformer(model_config("tiny"))
        parallelize(model, d.mesh, ParallelSection(mixed_precision=False), d.device)
        opt = build_optimizer(model, OptimSection(lr=1e-2), d.device)
        final = ckpt.save_checkpoint(tmp_path, 7, model, opt, {"tokens": 0},
                                     keep_last=2, extra_files={"position_frequency.npy": b"x"})
    finally:
        dist.destroy_process_group()
    tmp = tmp_path / "step_00000007.tmp"  # the name while it is written
    log = fsyncs()
    for name in sorted(p.name for p in final.iterdir()):  # DCP's files, the ledger, meta.json
        # (DCP writes .metadata as .metadata.tmp, fsyncs it and renames it)
        assert str(tmp / name) in log or str(tmp / f"{name}.tmp") in log, f"{name} was never fsynced"
    meta = log.index(str(tmp / ckpt.META))
    entries = log.index(str(tmp), meta)  # meta.json's directory entry, before the rename ...
    assert str(tmp_path) in log[entries + 1:]  # ... and the rename to step_00000007 after it
