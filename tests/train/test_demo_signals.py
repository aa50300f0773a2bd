"""`slimpack demo`'s training step stops on a user's SIGTERM or Ctrl-C, in one line.

The demo pre-empts its own first training leg with the trainer's SIGTERM hook; a signal from outside
must not be taken for that simulation (it used to be: the demo went on to resume and finish). The
real `slimpack demo` command runs with only its train step, on shards tokenized here.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimpack.train.checkpoint import list_checkpoints

SRC = Path(__file__).resolve().parents[2] / "src"
WORDS = ["signals", "stop", "the", "demo", "after", "a", "checkpoint", "is", "saved", "by", "every", "rank"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from slimpack.tokenize.job import TokenizeConfig, run_tokenize

    root = tmp_path_factory.mktemp("demo-signals")
    rng = random.Random(0)
    # The demo's validation set is 8 windows of 256 tokens: the held-out split needs over 2,048.
    for split, n_docs in (("train", 100), ("validation", 60)):
        path = root / "corpus" / split / "chunk1" / f"example_{split}_0.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randrange(40, 160))),
                                            "meta": {"redpajama_set_name": "Synthetic"}}) + "\n"
                                for _ in range(n_docs)))
    report = run_tokenize([str(root / "corpus")], str(root / "shards"), TokenizeConfig(block_tokens=512),
                          workers=1, progress=False)
    assert report.ok, report.summary()
    return root / "shards"


# The real CLI with the demo's steps cut to "train" (the earlier ones build what the fixture built).
_ONLY_TRAIN = ("import sys, slimpack.demo.steps as d, slimpack.cli as c; "
               "d.STEPS = [s for s in d.STEPS if s[0] == 'train']; "
               "sys.exit(c.main(['demo', '--out', sys.argv[1]]))")


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_users_signal_stops_the_demo(tmp_path, shards, sig, status):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "shards").symlink_to(shards)
    proc = subprocess.Popen([sys.executable, "-c", _ONLY_TRAIN, str(out)], text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"})
    metrics = out / "train" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    try:
        while not (metrics.exists() and metrics.read_text().count('"kind": "train"') >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "the demo never reached step 2"
            time.sleep(0.2)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()  # a no-op when it has exited; never leave a demo running after a failure
    assert proc.returncode == status, stderr[-3000:]
    assert stderr.splitlines()[-1] == (f"slimpack demo: stopped by {signal.Signals(sig).name} "
                                       f"(a run of `slimpack demo` starts over)")
    assert "Traceback" not in stderr
    assert "resume from the newest checkpoint" not in stdout  # the second leg never started
    [saved] = list_checkpoints(out / "train" / "checkpoints")
    assert json.loads((saved / "meta.json").read_text())["step"] < 12  # before the demo's own SIGTERM
