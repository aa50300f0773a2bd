"""Metrics: the MFU formula on the paper model, and the JSONL log across a crash and resume."""

from __future__ import annotations

import json

from slimpack.train.metrics import MetricsLogger, mfu, model_flops_per_token
from slimpack.train.model import model_config


def _logger(run_dir, resume_step: int) -> MetricsLogger:
    return MetricsLogger(run_dir, config={}, run_id="r", use_wandb=False, wandb_mode="offline",
                         wandb_project="p", console_every=1000, resume_step=resume_step)


def test_resume_drops_a_torn_last_record_and_the_steps_to_redo(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"kind": "train", "step": s, "loss": 1.0}) for s in (1, 2, 3)]
    # Killed while writing step 4's record: no newline, not JSON.
    path.write_text("\n".join(lines) + "\n" + lines[0][:17])
    logger = _logger(tmp_path, resume_step=2)
    logger.log({"kind": "train", "step": 3, "max_steps": 9, "loss": 0.5})
    logger.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 1.0), (3, 0.5)]
    assert "metrics.jsonl:4: dropping a torn record" in capsys.readouterr().err
    # Resuming at the last step logged keeps every record, and the file stays valid JSONL.
    path.write_text(path.read_text() + '{"kind": "tr')
    _logger(tmp_path, resume_step=3).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_mfu_formula_on_the_paper_model():
    cfg = model_config("tinyllama-1.3b")
    n = cfg.num_params()
    assert n == 1_494_312_960
    per_token = model_flops_per_token(cfg, n, seq_len=2048)
    non_embedding = n - 128_256 * 2048
    assert per_token == 6 * non_embedding + 12 * 22 * 32 * 64 * 2048
    assert abs(mfu(10_000, per_token) - 10_000 * per_token / 989e12) < 1e-15


def test_console_line_shows_mfu_and_the_per_gpu_rate_only_on_gpus(tmp_path, capsys):
    from slimpack.log import configure_logging

    configure_logging()
    logger = MetricsLogger(tmp_path, config={}, run_id="r", use_wandb=False, wandb_mode="offline",
                           wandb_project="p", console_every=1)
    record = {"kind": "train", "max_steps": 2, "loss": 1.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0,
              "tokens_per_s_per_gpu": 500.0, "data_wait_s": 0.001, "peak_memory_gib": 1.0}
    logger.log({**record, "step": 1, "mfu": None})  # what the loop records on a CPU
    logger.log({**record, "step": 2, "mfu": 0.4})
    logger.close()
    cpu, gpu = [line for line in capsys.readouterr().err.splitlines() if "| loss" in line]
    assert "1,000 tok/s | data" in cpu and "mfu" not in cpu and "/gpu" not in cpu
    assert "1,000 tok/s (500/gpu) | mfu 40.0% | data" in gpu
