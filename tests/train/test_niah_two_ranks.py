"""The trainer's needle sweep (eval.niah_every_tokens) on two gloo ranks: the sweep gathers the full
state dict, a collective every rank joins, and rank 0 alone evaluates and writes, once. The
one-rank run is tests/eval/test_niah_training.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.slow
def test_training_niah_sweep_runs_on_two_ranks(tmp_path, sentence_shards):
    run = tmp_path / "run"
    settings = {"run_dir": f'"{run}"', "device": '"cpu"', "max_steps": 2, "model.preset": '"tiny"',
                "model.attention_backend": '"sdpa_ref"', "parallel.mixed_precision": "false",
                "data.path": f'"{sentence_shards}"', "data.seq_len": 256, "data.global_batch_tokens": 512,
                "data.micro_batch_size": 1, "optim.warmup_steps": 1, "checkpoint.every_steps": 0,
                "eval.every_steps": 0, "log.wandb": "false", "eval.niah_every_tokens": 1024,
                "eval.niah_samples": 2, "eval.niah_length_step": 128}
    args = [x for k, v in settings.items() for x in ("--set", f"{k}={v}")]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "slimpack.train", *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in (run / "eval" / "niah").glob("*.json")) == ["step_00000002.json"]
    sweep = json.loads((run / "eval" / "niah" / "step_00000002.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    [niah] = [r for r in records if r["kind"] == "niah"]
    assert niah["step"] == 2 and niah["niah_accuracy"] == sweep["accuracy"]
    assert set(sweep["accuracy"]) == {"256"}  # the paper protocol: 128 holds no prompt after 128 answer tokens
    assert proc.stderr.count("niah effective length") == 1  # rank 0's log line, once
    assert sweep["step"] == 2 and sweep["tokens"] == 1024 and isinstance(sweep["effective_length"], int)
