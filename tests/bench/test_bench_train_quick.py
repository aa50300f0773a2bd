"""`slimpack bench train --quick` runs end to end on CPU: checks pass, every configuration measures.

The GPU run exercises the same code with the 1.3B preset, varlen attention and compile; this proves
the script (data, FSDP2 build, our step, the Hugging Face step, checks, JSON, table) before it
reaches a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.slow
def test_bench_train_quick(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    prof = tmp_path / "profile"
    proc = subprocess.run([sys.executable, "-m", "slimpack", "bench", "train", "--quick", "--json", str(out),
                           "--profile", str(prof)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["checks"]["attention"]["ok"] and result["checks"]["logits_vs_hf"]["ok"]
    # fp32 on CPU: our logits equal Hugging Face's to float precision.
    assert result["checks"]["logits_vs_hf"]["fp32"]["max_abs_err"] < 1e-4
    # The GPU path's bf16 comparisons run too (with the reference attention standing in for varlen).
    assert result["checks"]["attention"]["dtype"] == "torch.bfloat16"
    assert set(result["checks"]["logits_vs_hf"]["bf16"]) == {"ours_sdpa_ref_vs_fp32", "hf_sdpa_vs_fp32"}
    names = [r["name"] for r in result["runs"]]
    assert names == ["ours-128", "ours-256", "hf-128-eager", "titan-128-eager", "ours-128-chunk64"]
    for r in result["runs"]:
        assert r["tokens_per_s"] > 0 and r["timed_steps"] == 2 and r["mfu"] is None  # no MFU on a CPU
        # ln(128256) at init: a real loss (torchtitan initialises its output layer wider: about 12.25).
        assert r["last_loss"] == pytest.approx(11.76, abs=0.5 if r["kind"] != "titan" else 1.0)
        # Two micro-batches per step under the default reshard="step": the accumulating path runs.
        # torchtitan keeps its own cadence (its trainer's), as the peer a user would run.
        assert r["grad_accum"] == 2 and r["world_size"] == 1
        assert r["reshard"] == ("step" if r["kind"] != "titan" else "torchtitan's (forward; reduce every micro-batch)")
        # Document masking: ours always; torchtitan's flex path on CUDA only (no flex backward on CPU).
        assert r["document_masking"] == (r["kind"] == "ours")
        assert 0 <= r["data_wait_seconds"] < r["timed_seconds"] and r["first_step_seconds"] > 0
        assert r["data_stall_seconds"] is None  # GPU idle time: measured on CUDA only
        # The ledger's host time is measured for our model (the loop counts it), not for Hugging Face's.
        # The bar the benchmark promises is 0.5% of step time. On a CPU the step is ~1000x slower
        # than on a GPU, so passing here only shows the measurement is wired; the GPU table
        # (BENCHMARKS.md) is where the bar is really met or not.
        if r["kind"] == "ours":
            assert r["ledger_host_seconds_per_step"] > 0 and r["ledger_fraction"] < 0.005
        else:
            assert r["ledger_host_seconds_per_step"] is None
        # One profiled step per configuration: a Chrome trace and the kernel table.
        assert (prof / r["profile"]["trace"]).stat().st_size > 0
        assert (prof / f"{r['name']}-w1.kernels.txt").read_text().strip()
    assert set(result["speedup_vs_titan"]) == {"ours-128/titan-128-eager"}
    # The loss kernel's chunk size is a speed candidate only: the same data trains to the same loss.
    runs = {r["name"]: r for r in result["runs"]}
    assert runs["ours-128-chunk64"]["loss_chunk_tokens"] == 64 and runs["ours-128"]["loss_chunk_tokens"] == 2048
    assert runs["ours-128-chunk64"]["last_loss"] == pytest.approx(runs["ours-128"]["last_loss"], rel=1e-5)
    assert set(result["speedup_vs_default"]) == {"ours-128-chunk64/ours-128"}
    assert proc.stdout.splitlines()[-1].startswith("checks: attention ok, logits_vs_hf ok")


@pytest.mark.slow
def test_bench_train_under_torchrun_reports_per_gpu_figures(tmp_path):
    """Two gloo ranks on CPU, demo data through the real loader: rank 0 tokenizes once and the other
    rank reads its shards, each rank gets its own share, and only rank 0 writes the report."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "slimpack", "bench", "train", "--quick", "--data", "demo", "--num-workers", "0",
                           "--no-checks", "--only", "ours-128", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["checks"] == {}
    assert result["data"]["source"].startswith("demo corpus via PackedLoader")
    (run,) = result["runs"]
    assert run["world_size"] == 2 and run["tokens_per_s_all_gpus"] == pytest.approx(2 * run["tokens_per_s"])
    assert run["last_loss"] == pytest.approx(11.76, abs=0.5)  # the global mean, not one rank's share
    assert proc.stdout.count("bench train on 2 x CPU") == 1  # one table, from rank 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_data_stall_counts_only_the_wait_the_gpu_sat_idle():
    """The events around a host-side wait time the GPU's idle part of it: nothing while queued work
    covers the wait, all of it once the queue has drained."""
    from slimpack.bench.train import _recorded_event

    device = torch.device("cuda")

    def stalled(busy_cycles: int) -> float:
        torch.cuda.synchronize()
        torch.cuda._sleep(busy_cycles)  # queued GPU work (a spin kernel)
        before = _recorded_event(device)
        time.sleep(0.05)  # the host waits 50 ms "for data"
        after = _recorded_event(device)
        torch.cuda.synchronize()
        return before.elapsed_time(after) / 1e3

    assert stalled(0) == pytest.approx(0.05, abs=0.02)  # an idle GPU waits the whole 50 ms
    assert stalled(2_000_000_000) < 0.005  # ~1 s of queued work hides the wait
