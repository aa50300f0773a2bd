"""Metrics: the MFU formula on the paper model, and the JSONL log across a crash and resume."""

from __future__ import annotations

import json

from slimpack.model.transformer import model_config
from slimpack.train.metrics import MetricsLogger, mfu, model_flops_per_token


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


def test_peak_flops_come_from_the_device_name_and_an_unknown_gpu_has_none():
    from slimpack.train.metrics import peak_flops_for

    names = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
             "NVIDIA H200": 989e12, "NVIDIA GH200 480GB": 989e12, "NVIDIA A100-SXM4-80GB": 312e12,
             "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA B200": 2250e12}
    assert {name: peak_flops_for(name) for name in names} == names
    assert peak_flops_for("NVIDIA GeForce RTX 3090") is None  # MFU null, never a wrong number


def test_a_loss_spike_is_a_loss_above_k_times_the_running_median():
    from slimpack.train.metrics import LossSpikes

    spikes = LossSpikes(factor=3.0, window=3, history=[9.0, 2.0])  # a resumed run's last losses
    assert spikes.check(2.5) == (False, None)  # the window fills with this one
    assert spikes.check(6.0) == (False, 2.5)  # median of 9, 2, 2.5: 6 is not above 7.5
    assert spikes.check(7.6) == (True, 2.5)  # median of 2, 2.5, 6 is 2.5: 7.6 is above 7.5
    assert spikes.check(7.0) == (False, 6.0)


def test_a_resume_keeps_a_skipped_steps_record_by_its_loader_position(tmp_path):
    """A skipped step has no step of its own: its record carries the loader position after its batch,
    and a resume keeps it only if the checkpoint was saved after that batch."""
    path = tmp_path / "metrics.jsonl"
    records = [{"kind": "train", "step": 1}, {"kind": "train", "step": 2},
               {"kind": "skipped", "step": 3, "batch": 3}, {"kind": "train", "step": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    saved_after_the_skip = MetricsLogger(tmp_path, config={}, run_id="r", use_wandb=False, wandb_mode="offline",
                                         wandb_project="p", console_every=1000, resume_step=2, resume_batch=3)
    saved_after_the_skip.close()
    assert [json.loads(line)["kind"] for line in path.read_text().splitlines()] == ["train", "train", "skipped"]
    assert len(saved_after_the_skip.previous) == 4  # what Goodput.resume reads: dropped records too
    _logger(tmp_path, resume_step=2).close()  # saved before it (no loader position given: by step)
    assert [json.loads(line)["kind"] for line in path.read_text().splitlines()] == ["train", "train"]
