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
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.slow
def test_bench_train_quick(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "slimpack", "bench", "train", "--quick", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["checks"]["attention"]["ok"] and result["checks"]["logits_vs_hf"]["ok"]
    # fp32 on CPU: our logits equal Hugging Face's to float precision.
    assert result["checks"]["logits_vs_hf"]["fp32"]["max_abs_err"] < 1e-4
    # The GPU path's bf16 comparisons run too (with the reference attention standing in for varlen).
    assert result["checks"]["attention"]["dtype"] == "torch.bfloat16"
    assert set(result["checks"]["logits_vs_hf"]["bf16"]) == {"ours_sdpa_ref_vs_fp32", "hf_sdpa_vs_fp32"}
    names = [r["name"] for r in result["runs"]]
    assert names == ["ours-128", "ours-256", "hf-128-eager"]
    for r in result["runs"]:
        assert r["tokens_per_s"] > 0 and r["timed_steps"] == 2 and r["mfu"] > 0
        assert r["last_loss"] == pytest.approx(11.76, abs=0.5)  # ln(128256) at init: a real loss
    assert proc.stdout.splitlines()[-1].startswith("checks: attention ok, logits_vs_hf ok")
