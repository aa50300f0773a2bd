"""`slimpack bench checkpoint --quick` runs end to end on CPU (tiny model, one gloo rank): the GPU
run (`torchrun ... -m slimpack bench checkpoint`, BENCHMARKS.md) is the same code with the 1.3B model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.slow
def test_bench_checkpoint_quick(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "slimpack", "bench", "checkpoint", "--quick", "--repeats", "2",
                           "--dir", str(tmp_path / "ckpt"), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    c, g = result["checkpoint"], result["gc"]
    assert result["ok"] and result["model_preset"] == "tiny" and result["world_size"] == 1
    assert c["bytes"] > 100e6 and c["files"] == 2  # fp32 weights and AdamW's moments: __0_0.distcp, .metadata
    assert len(c["sync_save_s"]) == len(c["async_stall_s"]) == len(c["verify_s"]) == 2
    # The first async save (it allocates the host buffers) is timed apart from the two compared.
    assert 0 < c["async_first_stall_s"] <= c["async_first_total_s"]
    assert "first async save" in proc.stdout
    # What async saving promises: training waits for a host copy, not for the write.
    assert c["async_stall_median_s"] < c["sync_save_median_s"] <= c["async_total_median_s"] * 3
    assert c["verify_gb_per_s"] > 0 and g["tracked_objects"] > 0 and g["collect_median_s"] > 0
    assert not any((tmp_path / "ckpt").iterdir())  # its checkpoints are deleted at the end
    assert proc.stdout.splitlines()[-1] == "medians of 2 repeats, slowest rank"
