"""The real trainer in real processes on CPU (gloo, FSDP2, tiny model, shards tokenized here).

- resume: 6 steps uninterrupted == 3 steps, SIGTERM (save, clean exit), `--resume auto`, 3 steps:
  every loss bitwise, the validation losses, and the final parameters exactly; an interrupted save
  left lying around is ignored.
- world size: two processes (micro-batch 2, grad_accum 2) and four as hybrid sharding (2 replicas
  x 2 shards, micro-batch 1, grad_accum 2, the cross-node all-reduce once per step) see the same
  tokens per step and give the same losses (up to float summation order): the loss normalisation
  and FSDP's gradient reduction, output projection included, are right. FSDP2's communication
  cadence (`parallel.reshard`: once per step, the default, or every micro-batch) changes neither
  losses nor gradient norms. (The one-process launch, `python -m slimpack.train` without torchrun,
  runs in the demo and in tests/bench/test_bench_train_quick.py.)
- export: `slimpack export-hf` on the final checkpoint loads in transformers with our logits.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimpack.train.checkpoint import list_checkpoints, load_model_state_dict

SRC = Path(__file__).resolve().parents[2] / "src"
WORDS = ["the", "model", "reads", "packed", "documents", "and", "learns", "which", "token", "follows",
         "in", "every", "sequence", "of", "stream", "while", "gradients", "flow", "through", "shards"]


def _write_corpus(root: Path) -> None:
    rng = random.Random(0)
    for split, n_docs in (("train", 120), ("validation", 16)):
        lines = []
        for _ in range(n_docs):
            start = rng.randrange(len(WORDS))
            text = " ".join(WORDS[(start + i) % len(WORDS)] for i in range(rng.randrange(5, 120)))
            lines.append(json.dumps({"text": text, "meta": {"redpajama_set_name": "Synthetic"}}))
        path = root / split / "chunk1" / f"example_{split}_0.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from slimpack.tokenize.job import TokenizeConfig, run_tokenize

    root = tmp_path_factory.mktemp("train-data")
    _write_corpus(root / "corpus")
    report = run_tokenize([str(root / "corpus")], str(root / "shards"), TokenizeConfig(block_tokens=512),
                          workers=1, progress=False)
    assert report.ok, report.summary()
    return root / "shards"


def _overrides(run_dir: Path, data: Path, **extra: object) -> list[str]:
    values = {"run_dir": str(run_dir), "device": "cpu", "max_steps": 6, "model.preset": "tiny",
              "model.attention_backend": "sdpa_ref", "parallel.mixed_precision": "false",
              "data.path": str(data), "data.seq_len": 64, "data.global_batch_tokens": 512,
              "data.micro_batch_size": 2, "optim.lr": 3e-3, "optim.min_lr": 3e-4, "optim.warmup_steps": 2,
              "checkpoint.every_steps": 0, "eval.every_steps": 3, "eval.sequences": 4, "log.wandb": "false",
              **extra}
    out = []
    for k, v in values.items():
        out += ["--set", f"{k}={json.dumps(v) if isinstance(v, str) and v not in ('true', 'false') else v}"]
    return out


def _train(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "slimpack.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "slimpack.train", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dataset) -> Path:
    run = tmp_path_factory.mktemp("runs") / "uninterrupted"
    _train(2, _overrides(run, dataset))
    return run


@pytest.mark.slow
def test_resume_after_sigterm_is_bitwise_identical(tmp_path, dataset, uninterrupted):
    run = tmp_path / "resumed"
    first = _train(2, _overrides(run, dataset, debug_sigterm_after_step=3))
    assert "stopped by SIGTERM" in first.stdout
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000003"]
    assert [r["step"] for r in _records(run, "train")] == [1, 2, 3]
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    # A later save that was killed half-way must be ignored (and cleaned up by the next save).
    broken = run / "checkpoints" / "step_00000005.tmp"
    broken.mkdir()
    (broken / ".metadata").write_bytes(b"torn")

    second = _train(2, [*_overrides(run, dataset), "--resume", "auto"])
    # Logged on stderr, once: the logging filter drops rank 1's copy.
    assert second.stderr.count("resumed from") == 1 and "step_00000003" in second.stderr
    assert second.stderr.count("model tiny:") == 1
    assert not broken.exists()
    assert json.loads((run / "run.json").read_text())["run_id"] == run_id

    ref, got = _records(uninterrupted, "train"), _records(run, "train")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]  # bitwise: JSON floats round-trip
    assert [r["lr"] for r in got] == [r["lr"] for r in ref]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in ref]
    val = [r["val_loss"] for r in _records(run, "eval")]
    assert val == [r["val_loss"] for r in _records(uninterrupted, "eval")] and len(val) == 2
    assert ref[-1]["loss"] < ref[0]["loss"]

    a, meta_a = load_model_state_dict(list_checkpoints(uninterrupted / "checkpoints")[-1])
    b, meta_b = load_model_state_dict(list_checkpoints(run / "checkpoints")[-1])
    assert meta_a["step"] == meta_b["step"] == 6 and meta_a["loader"] == meta_b["loader"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_metrics_record_what_the_brief_lists(uninterrupted):
    rec = _records(uninterrupted, "train")[0]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_gpu", "data_wait_s",
                "peak_memory_gib", "tokens"):
        assert isinstance(rec[key], (int, float)), key
    assert rec["mfu"] is None  # against a GPU's peak: meaningless on the CPU this ran on
    assert rec["tokens_per_s_per_gpu"] == pytest.approx(rec["tokens_per_s"] / 2)
    meta = json.loads((list_checkpoints(uninterrupted / "checkpoints")[-1] / "meta.json").read_text())
    assert meta["config"]["data"]["seq_len"] == 64 and meta["model_config"]["hidden_size"] == 64
    assert meta["world_size"] == 2 and meta["loader"]["step"] == 6 and meta["tokens"] == 6 * 512


def _assert_same_training(run: Path, reference: Path) -> None:
    losses = [r["loss"] for r in _records(run, "train")]
    assert losses == pytest.approx([r["loss"] for r in _records(reference, "train")], rel=2e-5)
    # AdamW is blind to a constant gradient factor, so equal losses alone would not catch a wrong
    # gradient scale (e.g. a micro-batch's gradient reduced twice, or world_size missing from the
    # loss scale); the gradient norm does.
    assert [r["grad_norm"] for r in _records(run, "train")] == pytest.approx(
        [r["grad_norm"] for r in _records(reference, "train")], rel=2e-5)


@pytest.mark.slow
def test_reshard_every_micro_batch_matches_once_per_step(tmp_path, dataset, uninterrupted):
    """parallel.reshard="forward" (gather and reduce-scatter every micro-batch) trains exactly as the
    default "step" (gradients accumulated unreduced over the step's 2 micro-batches, one reduce-scatter)."""
    run = tmp_path / "reshard-forward"
    _train(2, _overrides(run, dataset, **{"parallel.reshard": "forward", "eval.every_steps": 0}))
    _assert_same_training(run, uninterrupted)


@pytest.mark.slow
def test_hybrid_sharding_matches(tmp_path, dataset, uninterrupted):
    """4 processes as 2 replicas x 2 shards (HSDP's 2-D mesh) == 2 processes plain FSDP."""
    run = tmp_path / "hsdp"
    # micro_batch_size 1: grad_accum 2, so the cross-replica all-reduce is deferred to the last
    # micro-batch; reshard="backward" reduce-scatters within a replica every micro-batch.
    _train(4, _overrides(run, dataset, **{"parallel.dp_replicate": 2, "eval.every_steps": 0,
                                         "data.micro_batch_size": 1, "parallel.reshard": "backward"}))
    _assert_same_training(run, uninterrupted)
    assert _records(run, "train")[0]["tokens_per_s_per_gpu"] == pytest.approx(
        _records(run, "train")[0]["tokens_per_s"] / 4)


def test_export_hf_cli_matches_our_logits(tmp_path, uninterrupted):
    from transformers import LlamaForCausalLM

    from slimpack.cli import main
    from slimpack.train.model import Transformer, model_config

    out = tmp_path / "hf"
    assert main(["export-hf", str(uninterrupted), str(out)]) == 0  # a run directory: its newest checkpoint
    weights, _ = load_model_state_dict(list_checkpoints(uninterrupted / "checkpoints")[-1])
    ours = Transformer(model_config("tiny"), attention_backend="sdpa_ref")
    ours.load_state_dict(weights)
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 128_256, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours.logits(ids, torch.arange(40), torch.tensor([0, 40], dtype=torch.int32), 40)
        got = hf(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    shutil.rmtree(out)


def test_resume_with_another_model_preset_is_a_clear_error(tmp_path, dataset, uninterrupted):
    run = tmp_path / "other-preset"
    shutil.copytree(uninterrupted / "checkpoints", run / "checkpoints")
    args = [*_overrides(run, dataset, **{"model.preset": "small", "max_steps": 8}), "--resume", "auto"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "slimpack.train", *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "holds a different model" in proc.stderr and "resume with the preset" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_rollback_to_an_older_checkpoint_sets_newer_ones_aside(tmp_path, dataset):
    run = tmp_path / "rollback"
    _train(1, _overrides(run, dataset, **{"max_steps": 4, "checkpoint.every_steps": 2, "eval.every_steps": 0}))
    ckpts = run / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000002", "step_00000004"]
    # Roll back to step 2 and stop at 3 (as a pre-empted job would): a requeued `--resume auto` must
    # continue this trajectory (step 3), not jump to the abandoned step 4.
    _train(1, [*_overrides(run, dataset, **{"max_steps": 3, "eval.every_steps": 0}),
               "--resume", str(ckpts / "step_00000002")])
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000002", "step_00000003"]
    assert (ckpts / "step_00000004.abandoned" / "meta.json").is_file()
    # Rolled back past step 3 again, with step 3 already set aside once before: a second name.
    shutil.copytree(ckpts / "step_00000003", ckpts / "step_00000003.abandoned")
    _train(1, [*_overrides(run, dataset, **{"max_steps": 3, "eval.every_steps": 0}),
               "--resume", str(ckpts / "step_00000002")])
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000002", "step_00000003"]
    assert (ckpts / "step_00000003.abandoned1" / "meta.json").is_file()


def test_in_process_train_from_s3_leaves_no_loader_threads(tmp_path, dataset, s3_bucket):
    """`train()` called from Python (as the demo does) on a remote dataset (a real S3 API server on
    loopback) stops its loader's download threads and feeder when it returns."""
    import threading

    import fsspec
    import torch.distributed as dist

    from slimpack.train.config import load_train_config
    from slimpack.train.loop import train

    fsspec.filesystem("s3").put(str(dataset), f"{s3_bucket}/shards", recursive=True)
    sets = _overrides(tmp_path / "run", f"s3://{s3_bucket}/shards",
                      **{"max_steps": 2, "eval.every_steps": 0, "data.cache_dir": str(tmp_path / "cache")})
    cfg = load_train_config(None, sets[1::2])
    try:
        report = train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert report.end_step == 2 and len(report.losses) == 2
    assert any((tmp_path / "cache").rglob("*.mds*"))  # the shards did come through the S3 cache
    assert json.loads((tmp_path / "run" / "run.json").read_text())["run_id"]
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("slimpack-fetch", "slimpack-loader"))]
