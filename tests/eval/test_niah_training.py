"""The trainer's periodic needle sweep (eval.niah_every_tokens): one process, the real loop, a tiny
model on shards tokenized here; it writes RUN_DIR/eval/niah/step_NNNNNNNN.json and a metrics record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.slow  # about a minute on 2 cores: tokenize, a trainer process, two sweeps
def test_training_writes_a_niah_sweep_every_n_tokens(tmp_path, sentence_shards):
    run = tmp_path / "run"
    settings = {"run_dir": f'"{run}"', "device": '"cpu"', "max_steps": 4, "model.preset": '"tiny"',
                "model.attention_backend": '"sdpa_ref"', "parallel.mixed_precision": "false",
                "data.path": f'"{sentence_shards}"', "data.seq_len": 256, "data.global_batch_tokens": 512,
                "data.micro_batch_size": 2, "optim.warmup_steps": 1, "checkpoint.every_steps": 0,
                "eval.every_steps": 0, "log.wandb": "false", "eval.niah_every_tokens": 1024,
                "eval.niah_samples": 2, "eval.niah_length_step": 128}
    args = [x for k, v in settings.items() for x in ("--set", f"{k}={v}")]
    proc = subprocess.run([sys.executable, "-m", "slimpack.train", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # 512 tokens a step: the 1024-token marks fall after steps 2 and 4.
    files = sorted(p.name for p in (run / "eval" / "niah").glob("*.json"))
    assert files == ["step_00000002.json", "step_00000004.json"]
    sweep = json.loads((run / "eval" / "niah" / "step_00000004.json").read_text())
    assert sweep["step"] == 4 and sweep["tokens"] == 2048
    # The paper protocol: 128 answer tokens reserved, so of 128 and 256 only 256 holds a prompt.
    assert sweep["config"]["protocol"] == "paper" and sweep["config"]["max_new_tokens"] == 128
    assert set(sweep["accuracy"]) == {"256"} and sweep["examples"]["256"]["prompt_tokens"] > 128
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    niah = [r for r in records if r["kind"] == "niah"]
    assert [r["step"] for r in niah] == [2, 4] and niah[1]["niah_accuracy"] == sweep["accuracy"]
    # `slimpack eval niah` on the final checkpoint (the same step) with the same samples and
    # haystack gives the same report: the training sweep is the command's measurement.
    import torch

    from slimpack.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trainer ran (OMP_NUM_THREADS=1): the same float sums, bit for bit
    try:
        assert main(["eval", "niah", str(run), "--data", str(sentence_shards), "--samples", "2",
                     "--device", "cpu", "--no-progress", "--out", str(tmp_path / "cli")]) == 0
    finally:
        torch.set_num_threads(threads)
    cli = json.loads((tmp_path / "cli" / "step_00000004.json").read_text())
    assert cli["effective_length"] == sweep["effective_length"] and cli["accuracy"] == sweep["accuracy"]
    assert cli["examples"] == sweep["examples"] and cli["config"] == sweep["config"]
