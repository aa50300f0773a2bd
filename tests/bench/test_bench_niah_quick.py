"""`slimpack bench niah --quick` runs end to end on CPU: its checks pass and every part reports.

The GPU run is the same code with the 1.3B preset, bf16 and the fused kernels; this proves the
script (checks, our sweep, the HF baseline on the export, STRING's cost, JSON) before a GPU sees it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.slow  # about a minute on 2 shared cores
def test_bench_niah_quick(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "slimpack", "bench", "niah", "--quick", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["ok"] and res["checks"]["cache"]["fp32"]["tokens_equal"] and res["checks"]["string"]["ok"]
    assert res["checks"]["string"]["max_abs_err"] < 1e-4
    sweep = res["sweep"]
    assert sweep["prefill_tokens"] == 4 * (128 + 256) and sweep["decode_tokens"] > 0
    assert res["hf"]["samples"] == 2 and res["hf"]["tokens_per_s"] > 0
    assert res["string_cost"]["time_ratio"] > 0
    assert "STRING (S=64, W=16)" in proc.stdout
