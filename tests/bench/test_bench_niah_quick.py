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
    # The sweep decoded exactly the paper protocol's prompts (rebuilt here) and 16 tokens for each
    # (random weights emit no EOS); prefill and decode times add up to no more than the sweep's.
    from slimpack.bench.niah import _haystack
    from slimpack.eval.niah import NiahConfig, build_samples
    from slimpack.tokenize.tokenizer import Llama3Tokenizer

    tok = Llama3Tokenizer()
    text = _haystack(tok.encoding.encode_ordinary, 4 * 256, "paper")
    cfg = NiahConfig(lengths=(128, 256), samples=4, max_new_tokens=16)
    prompts = [s for n in cfg.lengths for s in build_samples(text, n, cfg, tok.encoding.encode_ordinary,
                                                             bos_id=tok.bos_id)]
    sweep = res["sweep"]
    assert res["protocol"] == "paper" and sweep["samples"] == 4
    assert sweep["prefill_tokens"] == sum(len(s.tokens) for s in prompts)
    assert sweep["decode_tokens"] == 8 * 16 and sweep["generated_tokens"] == 8 * 16
    assert sweep["prefill_s"] + sweep["decode_s"] <= sweep["seconds"]
    assert res["hf"]["samples"] == 2 and res["hf"]["prompt_tokens"] == res["ours_at_hf_samples"]["prompt_tokens"]
    # STRING auto: S = int(0.5 x (L - 16)) per length, recorded; its cost is a ratio of two sweeps.
    assert res["string"]["shift"] == "auto" and res["string"]["window"] == 16
    cost = res["string_cost"]
    assert cost["time_ratio"] == pytest.approx(cost["string"]["seconds"] / cost["plain"]["seconds"])
    assert "STRING S=0.5L W=16 scale 1.0693 costs" in proc.stdout
