"""One rule for every command that reads a dataset: an unusable one exits 3 (exitcodes.UNUSABLE)
with one line prefixed by the full command, `slimpack shards inspect: error: ...`.

Each command meets each way a dataset directory can be unusable: missing, empty, tokenized but not
merged (parts only), and an index that is not JSON.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slimpack import exitcodes
from slimpack.cli import main

# command: its arguments, with DATA for the dataset, RUN for a trained run directory, TMP for scratch
COMMANDS = {
    "shards merge": ["DATA"],
    "shards validate": ["DATA", "--workers", "1"],
    "shards stats": ["DATA", "--workers", "1", "--seq-len", "64"],
    "shards inspect": ["DATA", "--sample", "0"],
    "pipeline digest": ["DATA", "--seq-len", "64", "--global-batch-tokens", "256", "--steps", "1"],
    "pipeline inspect": ["DATA", "--seq-len", "64", "--global-batch-tokens", "256", "--step", "0", "--no-decode"],
    "eval positions": ["RUN", "--data", "DATA", "--device", "cpu", "--max-documents", "2"],
    "eval niah": ["RUN", "--data", "DATA", "--device", "cpu", "--lengths", "64", "--samples", "1", "--no-progress"],
    "train": ["--set", "data.path=DATA", "--set", "run_dir=TMP/run", "--set", "device=cpu",
              "--set", "max_steps=1", "--set", "optim.warmup_steps=0", "--set", "model.preset=tiny",
              "--set", "model.attention_backend=sdpa_ref", "--set", "parallel.mixed_precision=false",
              "--set", "data.seq_len=64", "--set", "data.global_batch_tokens=64", "--set", "data.micro_batch_size=1",
              "--set", "log.wandb=false"],
}


# `shards merge` makes an unmerged dataset usable, and rewrites an unusable index from the parts.
MERGE_REPAIRS = ("not merged", "unusable index")


def _unusable(kind: str, good: Path, where: Path) -> Path:
    """A copy of the dataset `good` made unusable in one way."""
    if kind == "missing dir":
        return where / "no-such-dir"
    if kind == "empty dir":
        where.mkdir()
        return where
    shutil.copytree(good, where)
    if kind == "not merged":  # what tokenize leaves before its merge: the parts alone
        for name in ("index.json", "slimpack.json", "sample_tokens.npy"):
            (where / name).unlink()
    elif kind == "unusable index":
        (where / "index.json").write_text('{"version": 2, "shards": [')
    return where


@pytest.mark.parametrize("kind", ["missing dir", "empty dir", "not merged", "unusable index"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unusable_dataset_exits_3_with_one_line_naming_the_command(
        command: str, kind: str, train_data: Path, tiny_run: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    data = _unusable(kind, train_data, tmp_path / "dataset")
    argv = [a.replace("DATA", str(data)).replace("RUN", str(tiny_run)).replace("TMP", str(tmp_path))
            for a in COMMANDS[command]]
    capsys.readouterr()
    try:
        status = main([*command.split(), *argv])
    finally:
        if command == "train":  # in process: train's process group outlives its error (a CLI run exits)
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    err = capsys.readouterr().err
    if command == "shards merge" and kind in MERGE_REPAIRS:
        assert (status, err) == (exitcodes.OK, ""), err
        assert main(["shards", "validate", str(data), "--workers", "1"]) == exitcodes.OK
        return
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert (status, len(errors)) == (exitcodes.UNUSABLE, 1), err[-2000:]
    assert errors[0].startswith(f"slimpack {command}: error: "), errors
    assert "Traceback" not in err


@pytest.mark.parametrize("where", ["handler", "exec"])
def test_ctrl_c_exits_130_wherever_the_keyboard_interrupt_was_raised(tmp_path, where):
    """Ctrl-C is status 130 with one line. CPython marks a KeyboardInterrupt raised inside exec() of
    a string (dataclasses and torch build code that way) as unhandled even once caught, and
    `python -m` (torchrun's way in) then ends by SIGINT instead: `slimpack train` did so at random
    when Ctrl-C landed during start-up."""
    raise_it = "exec('raise KeyboardInterrupt')" if where == "exec" else "(_ for _ in ()).throw(KeyboardInterrupt)"
    (tmp_path / "interrupted.py").write_text(
        "import sys\nfrom slimpack.cli import run_handler\n"
        f"sys.exit(run_handler('slimpack x', lambda args: {raise_it}, None))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-m", "interrupted"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (exitcodes.INTERRUPTED, "slimpack x: interrupted\n")
