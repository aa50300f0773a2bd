"""The real trainer in real processes on CPU (gloo, FSDP2, tiny model, shards tokenized here).

- resume: 6 steps uninterrupted == 3 steps, SIGTERM (save, exit 75 on every rank), `--resume auto`,
  3 steps: every loss bitwise, the validation losses, the final parameters and the position-frequency
  ledger exactly; an interrupted save left lying around is ignored; a truncated newest checkpoint is
  named, set aside, and the run resumes from the one before it, still bitwise.
- ledger: the 2-process run's ledger (each rank counts its micro-batches, summed in the step's
  all-reduce) equals the count over the same steps' micro-batches of a 1-rank loader.
- signals: a real SIGTERM to the ranks mid-run (what Slurm sends) saves and exits 75, Ctrl-C saves
  and exits 130, one line and no traceback; configs/train/slurm_multinode.sh requeues a pre-empted
  job and the requeued one resumes (Slurm's two commands stood in for).
- world size: two processes (micro-batch 2, grad_accum 2) and four as hybrid sharding (2 replicas
  x 2 shards, micro-batch 1, grad_accum 2, the cross-node all-reduce once per step) see the same
  tokens per step and give the same losses (up to float summation order): the loss normalisation
  and FSDP's gradient reduction, output projection included, are right. FSDP2's communication
  cadence (`parallel.reshard`: once per step, the default, or every micro-batch) changes neither
  losses nor gradient norms. (The one-process launch, `python -m slimpack.train` without torchrun,
  runs in the demo and in tests/bench/test_bench_train_quick.py.)
- export: `slimpack export-hf` on the final checkpoint loads in transformers with our logits.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from slimpack.train.checkpoint import list_checkpoints, load_model_state_dict, verify_checkpoint

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
WORDS = ["the", "model", "reads", "packed", "documents", "and", "learns", "which", "token", "follows",
         "in", "every", "sequence", "of", "stream", "while", "gradients", "flow", "through", "shards"]


def _write_corpus(root: Path) -> None:
    rng = random.Random(0)
    for split, n_docs in (("train", 120), ("validation", 16)):
        lines = []
        for _ in range(n_docs):
            start = rng.randrange(len(WORDS))
            text = " ".join(WORDS[(start + i) % len(WORDS)] for i in range(rng.randrange(5, 120)))
            lines.append(json.dumps({"text": text, "meta": {"redpajama_set_name": "Synthetic"}}))
        path = root / split / "chunk1" / f"example_{split}_0.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from slimpack.tokenize.job import TokenizeConfig, run_tokenize

    root = tmp_path_factory.mktemp("train-data")
    _write_corpus(root / "corpus")
    report = run_tokenize([str(root / "corpus")], str(root / "shards"), TokenizeConfig(block_tokens=512),
                          workers=1, progress=False)
    assert report.ok, report.summary()
    return root / "shards"


def _overrides(run_dir: Path, data: Path, **extra: object) -> list[str]:
    values = {"run_dir": str(run_dir), "device": "cpu", "max_steps": 6, "model.preset": "tiny",
              "model.attention_backend": "sdpa_ref", "parallel.mixed_precision": "false",
              "data.path": str(data), "data.seq_len": 64, "data.global_batch_tokens": 512,
              "data.micro_batch_size": 2, "optim.lr": 3e-3, "optim.min_lr": 3e-4, "optim.warmup_steps": 2,
              "checkpoint.every_steps": 0, "eval.every_steps": 3, "eval.sequences": 4, "eval.position_buckets": 4,
              "log.wandb": "false",
              **extra}
    out = []
    for k, v in values.items():
        out += ["--set", f"{k}={json.dumps(v) if isinstance(v, str) and v not in ('true', 'false') else v}"]
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}


def _train(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    env = _env()
    if nproc == 1:
        cmd = [sys.executable, "-m", "slimpack.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "slimpack.train", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def _start_ranks(nproc: int, args: list[str]) -> list[subprocess.Popen]:
    """`nproc` trainer processes with the environment configs/train/slurm_multinode.sh gives them
    through srun (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), no torchrun in between: each rank's
    own exit status is seen (torchrun reports any non-zero one as its own failure, status 1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(nproc):
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # pipes could fill and block
        proc = subprocess.Popen([sys.executable, "-m", "slimpack.train", *args], stdout=out, stderr=err,
                                env={**_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
                                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        proc.files = (out, err)
        procs.append(proc)
    return procs


def _finish(procs: list[subprocess.Popen], status: int) -> tuple[str, str]:
    """Wait for every rank; all must exit `status`. Returns rank 0's (stdout, stderr)."""
    for p in procs:
        p.wait(timeout=300)
    outs = []
    for p in procs:
        for f in p.files:
            f.seek(0)
        outs.append((p.files[0].read(), p.files[1].read()))
    codes = [p.returncode for p in procs]
    assert codes == [status] * len(procs), f"exit statuses {codes}:\n" + "\n".join(o + e[-3000:] for o, e in outs)
    return outs[0]


def _wait_for_step(run_dir: Path, step: int, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if (run_dir / "metrics.jsonl").exists() and any(r["step"] >= step for r in _records(run_dir, "train")):
            return
        time.sleep(0.2)
    raise AssertionError(f"the trainer never reached step {step}")


def _long_run(run_dir: Path, dataset: Path) -> subprocess.Popen:
    """`slimpack train` started on a run far longer than any test waits for (its output piped)."""
    args = _overrides(run_dir, dataset, **{"max_steps": 10_000, "eval.every_steps": 0})
    return subprocess.Popen([sys.executable, "-m", "slimpack", "train", *args], env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dataset) -> Path:
    run = tmp_path_factory.mktemp("runs") / "uninterrupted"
    _train(2, _overrides(run, dataset))
    return run


@pytest.mark.slow
def test_resume_after_sigterm_is_bitwise_identical(tmp_path, dataset, uninterrupted):
    run = tmp_path / "resumed"
    first, _ = _finish(_start_ranks(2, _overrides(run, dataset, debug_sigterm_after_step=3)), 75)
    assert "stopped by SIGTERM" in first
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000003"]
    assert [r["step"] for r in _records(run, "train")] == [1, 2, 3]
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    # A later save that was killed half-way must be ignored (and cleaned up by the next save).
    broken = run / "checkpoints" / "step_00000005.tmp"
    broken.mkdir()
    (broken / ".metadata").write_bytes(b"torn")

    second = _train(2, [*_overrides(run, dataset), "--resume", "auto"])
    # Logged on stderr, once: the logging filter drops rank 1's copy.
    assert second.stderr.count("resumed from") == 1 and "step_00000003" in second.stderr
    assert second.stderr.count("model tiny:") == 1
    assert not broken.exists()
    assert json.loads((run / "run.json").read_text())["run_id"] == run_id

    ref, got = _records(uninterrupted, "train"), _records(run, "train")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]  # bitwise: JSON floats round-trip
    assert [r["lr"] for r in got] == [r["lr"] for r in ref]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in ref]
    val = [r["val_loss"] for r in _records(run, "eval")]
    assert val == [r["val_loss"] for r in _records(uninterrupted, "eval")] and len(val) == 2
    by_position = [r["val_loss_by_position"] for r in _records(run, "eval")]
    assert by_position == [r["val_loss_by_position"] for r in _records(uninterrupted, "eval")]
    assert ref[-1]["loss"] < ref[0]["loss"]

    a, meta_a = load_model_state_dict(list_checkpoints(uninterrupted / "checkpoints")[-1])
    b, meta_b = load_model_state_dict(list_checkpoints(run / "checkpoints")[-1])
    assert meta_a["step"] == meta_b["step"] == 6 and meta_a["loader"] == meta_b["loader"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # The ledger: restored from step 3's checkpoint and continued, equal to the uninterrupted one.
    assert meta_a["position_frequency"] == meta_b["position_frequency"]  # same steps and length
    pf_a = np.load(list_checkpoints(uninterrupted / "checkpoints")[-1] / "position_frequency.npy")
    pf_b = np.load(list_checkpoints(run / "checkpoints")[-1] / "position_frequency.npy")
    assert pf_a.dtype == pf_b.dtype == np.int64 and pf_a.tolist() == pf_b.tolist()
    assert [r["pf_last"] for r in got] == [r["pf_last"] for r in ref]
    assert sorted(p.name for p in (run / "position_frequency").iterdir()) == ["step_00000003.npy",
                                                                             "step_00000006.npy"]


def test_metrics_record_what_the_brief_lists(uninterrupted):
    rec = _records(uninterrupted, "train")[0]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_gpu", "data_wait_s",
                "peak_memory_gib", "tokens"):
        assert isinstance(rec[key], (int, float)), key
    assert rec["mfu"] is None  # against a GPU's peak: meaningless on the CPU this ran on
    assert rec["tokens_per_s_per_gpu"] == pytest.approx(rec["tokens_per_s"] / 2)
    meta = json.loads((list_checkpoints(uninterrupted / "checkpoints")[-1] / "meta.json").read_text())
    assert meta["config"]["data"]["seq_len"] == 64 and meta["model_config"]["hidden_size"] == 64
    assert meta["world_size"] == 2 and meta["loader"]["step"] == 6 and meta["tokens"] == 6 * 512
    # Both ranks' data files carry a checksum (each rank hashed its own; rank 0 gathered them).
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(meta["files"])


@pytest.mark.slow
def test_resume_auto_past_a_truncated_newest_checkpoint_is_bitwise_identical(tmp_path, dataset, uninterrupted):
    run = tmp_path / "truncated"
    _finish(_start_ranks(2, _overrides(run, dataset, **{"checkpoint.every_steps": 2,
                                                        "debug_sigterm_after_step": 4})), 75)
    ckpts = run / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000002", "step_00000004"]
    data = ckpts / "step_00000004" / "__1_0.distcp"  # rank 1's file: the record came through the gather
    data.write_bytes(data.read_bytes()[:1000])  # a node died mid-copy, a disk filled up
    proc = _train(2, [*_overrides(run, dataset), "--resume", "auto"])
    assert "step_00000004 is corrupt: __1_0.distcp has 1,000 bytes" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"set aside corrupt {ckpts / 'step_00000004'}" in proc.stderr  # log records: stderr
    assert f"resumed from {ckpts / 'step_00000002'}" in proc.stderr
    assert (ckpts / "step_00000004.corrupt" / "__1_0.distcp").stat().st_size == 1000  # kept for the user
    ref, got = _records(uninterrupted, "train"), _records(run, "train")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in ref]
    a, _ = load_model_state_dict(list_checkpoints(uninterrupted / "checkpoints")[-1])
    b, _ = load_model_state_dict(list_checkpoints(ckpts)[-1])
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_real_sigterm_to_every_rank_saves_and_exits_75(tmp_path, dataset):
    run = tmp_path / "sigterm"
    procs = _start_ranks(2, _overrides(run, dataset, **{"max_steps": 10_000, "eval.every_steps": 0}))
    try:
        _wait_for_step(run, 1, procs)
        for p in procs:  # Slurm's --signal=TERM@secs reaches every task of the job step
            p.send_signal(signal.SIGTERM)
        out, err = _finish(procs, 75)
    finally:
        for p in procs:
            p.kill()  # a no-op when it has exited
    assert "stopped by SIGTERM (checkpoint saved" in out and "Traceback" not in err
    [saved] = list_checkpoints(run / "checkpoints")
    assert json.loads((saved / "meta.json").read_text())["step"] == _records(run, "train")[-1]["step"] < 10_000


def _tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds, by DCP key: the weights ("model.") and the optimiser state
    ("optim.": AdamW's moments and step counters), in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    state = {key: torch.empty(md.size, dtype=md.properties.dtype)
             for key, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    return state


def _meta(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "meta.json").read_text())


@pytest.mark.slow
def test_a_nonfinite_step_is_skipped_and_leaves_weights_optimizer_and_schedule_bitwise_unchanged(tmp_path, dataset):
    # The state before step 3: a run stopped (SIGTERM, saved) at the end of step 2.
    before = tmp_path / "before"
    _finish(_start_ranks(2, _overrides(before, dataset, debug_sigterm_after_step=2)), 75)
    # Step 3 made NaN (rank 0's loss; the gradient reduction carries it to rank 1) and a SIGTERM in
    # the same step: the step is skipped and the run saves what it has, still step 2.
    run = tmp_path / "poisoned"
    _, err = _finish(_start_ranks(2, _overrides(run, dataset, debug_nonfinite_step=3, debug_sigterm_after_step=3)), 75)
    assert err.count("step 3: non-finite loss nan (gradient norm nan); skipped") == 1 and "Traceback" not in err
    [a], [b] = list_checkpoints(before / "checkpoints"), list_checkpoints(run / "checkpoints")
    assert a.name == b.name == "step_00000002"
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb) and any(k.startswith("optim.state.") and k.endswith(".step") for k in ta)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # weights, moments, AdamW's step counters
    assert _meta(b)["schedule"] == _meta(a)["schedule"] and _meta(b)["tokens"] == _meta(a)["tokens"]
    assert _meta(b)["position_frequency"] == _meta(a)["position_frequency"]  # the ledger counts trained tokens
    assert _meta(b)["loader"]["step"] == _meta(a)["loader"]["step"] + 1  # the batch was consumed
    [skipped] = _records(run, "skipped")
    assert (skipped["step"], skipped["batch"], skipped["loss"], skipped["skipped_steps"]) == (3, 3, "nan", 1)

    # The run goes on from the state saved after the skip, bitwise as a run that never stopped.
    full = tmp_path / "poisoned-uninterrupted"
    _train(2, _overrides(full, dataset, debug_nonfinite_step=3))
    _train(2, [*_overrides(run, dataset), "--resume", "auto"])
    ref, got = _records(full, "train"), _records(run, "train")
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3, 4, 5, 6]
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in got] == [(r["loss"], r["grad_norm"], r["lr"]) for r in ref]
    assert [r["skipped_steps"] for r in got] == [0, 0, 1, 1, 1, 1]
    assert [(r["step"], r["batch"]) for r in _records(run, "skipped")] == [(3, 3)]  # kept across the resume
    assert _meta(list_checkpoints(full / "checkpoints")[-1])["loader"]["step"] == 7
    a, b = _tensors(list_checkpoints(full / "checkpoints")[-1]), _tensors(list_checkpoints(run / "checkpoints")[-1])
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_too_many_nonfinite_steps_in_a_row_stop_with_status_4_and_save_nothing(tmp_path, dataset):
    run = tmp_path / "diverged"
    sets = {"checkpoint.every_steps": 2, "eval.every_steps": 0, "debug_nonfinite_step": 3, "debug_nonfinite_times": 3}
    _, err = _finish(_start_ranks(2, _overrides(run, dataset, **sets)), 4)
    assert "Traceback" not in err and err.count("non-finite loss") == 3
    assert err.strip().splitlines()[-1] == (
        "slimpack.train: error: 3 non-finite steps in a row (the last: step 3, loss nan, gradient norm nan); none "
        f"was applied and nothing was saved: resume from {run / 'checkpoints' / 'step_00000002'} with a lower "
        "optim.lr or another seed, or roll back with --resume PATH")
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000002"]
    assert [(r["step"], r["consecutive"]) for r in _records(run, "skipped")] == [(3, 1), (3, 2), (3, 3)]


@pytest.mark.slow
def test_a_rank_that_stops_fails_the_job_within_the_step_timeout(tmp_path, dataset):
    """After the first step the process groups wait parallel.step_timeout_s for a collective, not
    the 30 minutes of start-up: a rank that stops (SIGSTOP: alive, silent) ends the job with 75."""
    run = tmp_path / "hung"
    procs = _start_ranks(2, _overrides(run, dataset, **{"max_steps": 10_000, "eval.every_steps": 0,
                                                        "parallel.step_timeout_s": 5}))
    try:
        _wait_for_step(run, 2, procs)
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        procs[0].wait(timeout=120)
        waited = time.monotonic() - stopped
    finally:
        for p in procs:
            p.kill()  # a stopped process dies of SIGKILL too
    procs[0].files[1].seek(0)
    err = procs[0].files[1].read()
    assert procs[0].returncode == 75, err[-3000:]
    assert waited < 60 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        "slimpack.train: error: a collective waited more than parallel.step_timeout_s=5 s for another rank")


@pytest.mark.slow
def test_goodput_gc_and_what_ran_are_recorded_across_a_restart(tmp_path, dataset):
    run = tmp_path / "goodput"
    sets = {"max_steps": 4, "checkpoint.every_steps": 2, "eval.every_steps": 2, "train.gc_every_steps": 2}
    first = _train(1, _overrides(run, dataset, **sets))
    [start] = _records(run, "start")
    env = start["environment"]
    assert env["attention_backend"] == "sdpa_ref" and env["torch"] == torch.__version__ and env["world_size"] == 1
    assert {"cuda", "cudnn", "nccl", "device", "gpus", "git_sha", "slimpack"} <= set(env)
    assert start["config"]["train"]["gc_every_steps"] == 2 and start["gc"]["frozen"] > 0
    assert start["mfu_note"].startswith("MFU is against a GPU's bf16 peak")
    meta = _meta(list_checkpoints(run / "checkpoints")[-1])
    assert meta["environment"] == env and meta["config"]["train"]["gc_every_steps"] == 2
    assert "running slimpack" in first.stderr and "attention_backend sdpa_ref" in first.stderr
    train = _records(run, "train")
    assert [r["counted_s"] for r in train] == [0.0, *[r["step_time_s"] for r in train[1:]]]  # step 1: compile
    assert [r["lost_s"]["gc"] > 0 for r in train] == [False, False, True, True]  # collected after steps 2, 4
    assert train[0]["lost_s"]["compile"] == train[0]["step_time_s"] and train[0]["lost_s"]["startup"] > 0
    assert train[2]["lost_s"]["eval"] > 0 and train[2]["lost_s"]["checkpoint"] > 0  # after step 2's
    last = train[-1]
    assert last["goodput"] == pytest.approx(sum(r["counted_s"] for r in train) / last["wall_s"])
    assert 0 < last["goodput"] < 1 and "goodput " in first.stdout
    # Rolled back to step 2: steps 3 and 4 are run again, their first run's time lost.
    _train(1, [*_overrides(run, dataset, **sets), "--resume", str(run / "checkpoints" / "step_00000002")])
    starts, again = _records(run, "start"), _records(run, "train")
    assert [s["step"] for s in starts] == [0, 2] and [r["step"] for r in again] == [1, 2, 3, 4]
    assert starts[1]["wall_s"] > last["wall_s"]
    assert starts[1]["lost_s"]["recomputed"] == pytest.approx(sum(r["counted_s"] for r in train[2:]))
    assert again[-1]["goodput"] == pytest.approx(sum(r["counted_s"] for r in again) / again[-1]["wall_s"])


@pytest.mark.slow
def test_ctrl_c_during_train_saves_and_exits_130_in_one_line(tmp_path, dataset):
    run = tmp_path / "ctrl-c"
    proc = _long_run(run, dataset)
    try:
        _wait_for_step(run, 1, [proc])
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()  # a no-op when it has exited
    assert proc.returncode == 130, err[-3000:]
    assert "stopped by SIGINT (checkpoint saved" in out and "Traceback" not in err
    assert "Ctrl-C: saving a checkpoint" in err
    assert len(list_checkpoints(run / "checkpoints")) == 1


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once_in_one_line(tmp_path, dataset):
    # The second Ctrl-C goes as soon as the trainer has said it handled the first. It must land
    # before the save at the end of that step is done; on a loaded box this test's process may be
    # scheduled too late (once seen: the save done, the run stopped by the first Ctrl-C alone), so
    # such an attempt is not the case under test and is run again.
    for attempt in range(3):
        run = tmp_path / f"ctrl-c-twice-{attempt}"
        proc = _long_run(run, dataset)
        try:
            _wait_for_step(run, 1, [proc])
            proc.send_signal(signal.SIGINT)
            seen = []
            for line in proc.stderr:  # until the first is handled: a save is asked for at the step's end
                seen.append(line)
                if "Ctrl-C: saving a checkpoint" in line:
                    proc.send_signal(signal.SIGINT)
                    break
            out, err = proc.communicate(timeout=240)
            err = "".join(seen) + err
        finally:
            proc.kill()
        if "saved checkpoint" not in err:
            break
    assert proc.returncode == 130, err[-3000:]
    assert "Ctrl-C: saving a checkpoint" in err and "Traceback" not in err
    assert err.rstrip().splitlines()[-1] == "slimpack train: interrupted" and "stopped by" not in out
    assert "saved checkpoint" not in err  # aborted before any save completed or was reported
    for saved in list_checkpoints(run / "checkpoints"):  # a save whose thread finished anyway is whole
        verify_checkpoint(saved)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_before_the_training_loop_stops_at_once_without_saving(tmp_path, dataset, sig):
    """README: a signal during start-up (model build, checkpoint load) stops at once without saving:
    Ctrl-C as one line and status 130, SIGTERM by its default action (the loop's handler is not in
    place yet; under the Slurm script the task shell ignores it)."""
    run = tmp_path / "early"
    proc = _long_run(run, dataset)
    try:
        deadline = time.monotonic() + 120
        while not (run / "run.json").exists() and time.monotonic() < deadline:  # train() has started
            time.sleep(0.01)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert not (run / "metrics.jsonl").exists() or not _records(run, "train")  # no step ran
    assert not list_checkpoints(run / "checkpoints")
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and err.rstrip().splitlines()[-1] == "slimpack train: interrupted"
        assert "Traceback" not in err
    else:
        assert proc.returncode == -signal.SIGTERM


def test_a_ctrl_c_that_a_library_swallows_during_start_up_still_stops_the_run(tmp_path, dataset, monkeypatch):
    """pybind11 turns a KeyboardInterrupt raised while its extension module loads into an ImportError,
    and torch's optional imports catch that (seen with triton's): the Ctrl-C vanished and the run
    trained on. It is remembered and raised again before the first step; no step runs, nothing is
    saved, and the signal handlers are Python's again afterwards."""
    import torch.distributed as dist

    from slimpack.train import loop
    from slimpack.train.config import load_train_config

    real_build_model = loop.build_model

    def build_model_swallowing_ctrl_c(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands in a library's start-up ...
            time.sleep(5)
        except KeyboardInterrupt:  # ... which catches it
            pass
        return real_build_model(*args, **kwargs)

    monkeypatch.setattr(loop, "build_model", build_model_swallowing_ctrl_c)
    run = tmp_path / "run"
    cfg = load_train_config(None, _overrides(run, dataset, **{"max_steps": 2, "eval.every_steps": 0,
                                                              "checkpoint.save_final": "true"})[1::2])
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert not (run / "metrics.jsonl").exists() or not _records(run, "train")
    assert not list_checkpoints(run / "checkpoints")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


# Stand-ins for Slurm's commands (Slurm does not run here); see the test below.
SRUN = """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || { s=$?; if ((s > status)); then status=$s; fi; }; done
exit $status
"""
SCONTROL = """#!/bin/bash
case $1 in
  show) echo 127.0.0.1 ;;
  requeue) echo "requeue $2" >> "$SCONTROL_LOG" ;;
  *) exit 1 ;;
esac
"""


@pytest.mark.slow
def test_slurm_script_requeues_a_preempted_run_and_the_requeued_job_finishes(tmp_path, dataset):
    """configs/train/slurm_multinode.sh for real, with stand-ins for the two Slurm commands it calls:
    `srun` runs the task command as SLURM_NTASKS local processes with SLURM_PROCID/LOCALID set and
    exits with the highest status, as srun does; `scontrol` answers `show hostnames` and records
    `requeue`. Bash, the script, the trainer (2 gloo ranks) and its checkpoints are real."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "scontrol.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(SRC), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "2", "SLURM_SUBMIT_DIR": str(tmp_path),
           "MASTER_PORT": str(port), "SCONTROL_LOG": str(log)}
    run = tmp_path / "run"
    args = _overrides(run, dataset, **{"max_steps": 4, "eval.every_steps": 0})
    script = [str(REPO / "configs/train/slurm_multinode.sh"), str(REPO / "configs/train/debug-cpu.toml")]

    first = subprocess.run(["bash", *script, *args, "--set", "debug_sigterm_after_step=2"], env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 75, first.stdout[-3000:] + first.stderr[-3000:]
    assert log.read_text() == "requeue 4242\n"
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000002"]

    second = subprocess.run(["bash", *script, *args], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stderr and "step_00000002" in second.stderr
    assert log.read_text() == "requeue 4242\n"  # no second requeue
    assert list_checkpoints(run / "checkpoints")[-1].name == "step_00000004"
    assert not list(tmp_path.glob(".slimpack-*"))


def _wandb_history(path: Path) -> tuple[str, list[int]]:
    """(run id, history steps) of a `.wandb` file, read with wandb's own protobuf schema. The file is
    a ":W&B" header (7 bytes) and LevelDB-log records in 32 KiB blocks: checksum(4) length(2)
    type(1: full, 2: first, 3: middle, 4: last), data."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, run_id, steps = 7, b"", None, []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7 or data[pos + 6] == 0:  # a block's zero-filled tail
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "run":
                run_id = record.run.run_id
            elif record.WhichOneof("record_type") == "history":
                steps.append(record.history.step.num)
    return run_id, steps


@pytest.mark.slow
def test_wandb_offline_segments_of_a_resumed_run_share_its_id_and_continue_its_steps(tmp_path, dataset,
                                                                                     monkeypatch):
    """wandb ignores `resume` offline, so each segment is its own offline run directory; what the README
    promises is that they carry the run's id and continue its steps, and the printed `wandb sync --id`
    command names them all (it uploads a run's files in order of start time, as one run)."""
    run = tmp_path / "wandb"
    sets = {"max_steps": 4, "eval.every_steps": 0, "log.wandb": "true"}
    for key in [k for k in os.environ if k.startswith("WANDB_")]:  # the default: offline
        monkeypatch.delenv(key)
    _finish(_start_ranks(1, _overrides(run, dataset, **sets, debug_sigterm_after_step=2)), 75)
    proc = _train(1, [*_overrides(run, dataset, **sets), "--resume", "auto"])
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    segments = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(segments) == 2
    assert [_wandb_history(seg / f"run-{run_id}.wandb") for seg in segments] == [(run_id, [1, 2]), (run_id, [3, 4])]
    assert f"wandb sync --id {run_id} -p slimpack {run}/wandb/offline-run-*-{run_id}" in proc.stdout


def test_ledger_of_two_ranks_equals_one_rank_count(dataset, uninterrupted):
    from slimpack.pipeline import LoaderConfig, PackedLoader
    from slimpack.train.ledger import PositionLedger, step_segment_counts

    # The same global layout on one rank: 8 sequences of 64 per step in 4 micro-batches of 2.
    loader = PackedLoader(LoaderConfig(str(dataset), seq_len=64, global_batch_tokens=512, micro_batch_size=2))
    want = PositionLedger(64)
    for step in range(6):
        want.add_segments(step_segment_counts(loader.micro_batches(step), 64))
    final = list_checkpoints(uninterrupted / "checkpoints")[-1]
    got = np.load(final / "position_frequency.npy", allow_pickle=False)
    assert got.dtype == np.int64 and got.tolist() == want.frequency.tolist()
    recorded = json.loads((final / "meta.json").read_text())["position_frequency"]
    assert recorded["steps"] == 6 and recorded["windows"] == want.windows == 6 * 8  # summed over the ranks
    history = np.load(uninterrupted / "position_frequency" / "step_00000006.npy", allow_pickle=False)
    assert history.tolist() == want.frequency.tolist()
    last = _records(uninterrupted, "train")[-1]
    assert {k: last[k] for k in want.summary()} == want.summary()
    # f(0) counts the labels trained on: fewer than the tokens (each document's EOS label is masked).
    assert 0 < want.frequency[0] < 6 * 512


def _assert_same_training(run: Path, reference: Path) -> None:
    losses = [r["loss"] for r in _records(run, "train")]
    assert losses == pytest.approx([r["loss"] for r in _records(reference, "train")], rel=2e-5)
    # AdamW is blind to a constant gradient factor, so equal losses alone would not catch a wrong
    # gradient scale (e.g. a micro-batch's gradient reduced twice, or world_size missing from the
    # loss scale); the gradient norm does.
    assert [r["grad_norm"] for r in _records(run, "train")] == pytest.approx(
        [r["grad_norm"] for r in _records(reference, "train")], rel=2e-5)


@pytest.mark.slow
def test_reshard_every_micro_batch_matches_once_per_step(tmp_path, dataset, uninterrupted):
    """parallel.reshard="forward" (gather and reduce-scatter every micro-batch) trains exactly as the
    default "step" (gradients accumulated unreduced over the step's 2 micro-batches, one reduce-scatter)."""
    run = tmp_path / "reshard-forward"
    _train(2, _overrides(run, dataset, **{"parallel.reshard": "forward", "eval.every_steps": 0}))
    _assert_same_training(run, uninterrupted)


@pytest.mark.slow
def test_hybrid_sharding_matches(tmp_path, dataset, uninterrupted):
    """4 processes as 2 replicas x 2 shards (HSDP's 2-D mesh) == 2 processes plain FSDP."""
    run = tmp_path / "hsdp"
    # micro_batch_size 1: grad_accum 2, so the cross-replica all-reduce is deferred to the last
    # micro-batch; reshard="backward" reduce-scatters within a replica every micro-batch.
    _train(4, _overrides(run, dataset, **{"parallel.dp_replicate": 2, "eval.every_steps": 0,
                                         "data.micro_batch_size": 1, "parallel.reshard": "backward"}))
    _assert_same_training(run, uninterrupted)
    assert _records(run, "train")[0]["tokens_per_s_per_gpu"] == pytest.approx(
        _records(run, "train")[0]["tokens_per_s"] / 4)
    # The ledger: 4 ranks' counts summed in the step's all-reduce equal the 2-rank run's (which
    # test_ledger_of_two_ranks_equals_one_rank_count checks against a one-rank count).
    hsdp, plain = list_checkpoints(run / "checkpoints")[-1], list_checkpoints(uninterrupted / "checkpoints")[-1]
    assert np.load(hsdp / "position_frequency.npy").tolist() == np.load(plain / "position_frequency.npy").tolist()
    assert [r["pf_last"] for r in _records(run, "train")] == [r["pf_last"] for r in _records(uninterrupted, "train")]


def test_export_hf_cli_matches_our_logits(tmp_path, uninterrupted):
    from transformers import LlamaForCausalLM

    from slimpack.cli import main
    from slimpack.model.transformer import Transformer, model_config

    out = tmp_path / "hf"
    assert main(["export-hf", str(uninterrupted), str(out)]) == 0  # a run directory: its newest checkpoint
    weights, _ = load_model_state_dict(list_checkpoints(uninterrupted / "checkpoints")[-1])
    ours = Transformer(model_config("tiny"), attention_backend="sdpa_ref")
    ours.load_state_dict(weights)
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 128_256, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours.logits(ids, torch.arange(40), torch.tensor([0, 40], dtype=torch.int32), 40)
        got = hf(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    shutil.rmtree(out)


def test_export_hf_errors_are_one_line(tmp_path, uninterrupted, capsys):
    from slimpack.cli import main

    (tmp_path / "a-file").write_text("keep me")
    assert main(["export-hf", str(uninterrupted), str(tmp_path / "a-file")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'a-file'} is an existing file; pass a directory" in err and len(err.splitlines()) == 1
    assert (tmp_path / "a-file").read_text() == "keep me"
    # A bit-flipped checkpoint is named before anything is unpickled or exported.
    copy = tmp_path / "step_00000006"
    shutil.copytree(list_checkpoints(uninterrupted / "checkpoints")[-1], copy)
    raw = bytearray((copy / "__1_0.distcp").read_bytes())
    raw[len(raw) // 3] ^= 1
    (copy / "__1_0.distcp").write_bytes(raw)
    assert main(["export-hf", str(copy), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {copy} is corrupt: __1_0.distcp has xxh3_128" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "hf").exists()


def test_a_missing_config_file_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "slimpack", "train", "--config", str(tmp_path / "nope.toml")],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == (f"slimpack train: error: --config {tmp_path / 'nope.toml'}: no such file; pass a TOML "
                           f"file such as configs/train/debug-cpu.toml, or no --config for the defaults\n")


def test_resume_with_another_model_preset_is_a_clear_error(tmp_path, dataset, uninterrupted):
    run = tmp_path / "other-preset"
    shutil.copytree(uninterrupted / "checkpoints", run / "checkpoints")
    args = [*_overrides(run, dataset, **{"model.preset": "small", "max_steps": 8}), "--resume", "auto"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "slimpack.train", *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "holds a different model" in proc.stderr and "resume with the preset" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_rollback_to_an_older_checkpoint_sets_newer_ones_aside(tmp_path, dataset):
    run = tmp_path / "rollback"
    _train(1, _overrides(run, dataset, **{"max_steps": 4, "checkpoint.every_steps": 2, "eval.every_steps": 0}))
    ckpts = run / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000002", "step_00000004"]
    # Roll back to step 2 and stop at 3 (as a pre-empted job would): a requeued `--resume auto` must
    # continue this trajectory (step 3), not jump to the abandoned step 4.
    _train(1, [*_overrides(run, dataset, **{"max_steps": 3, "eval.every_steps": 0}),
               "--resume", str(ckpts / "step_00000002")])
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000002", "step_00000003"]
    assert (ckpts / "step_00000004.abandoned" / "meta.json").is_file()
    # The ledger history of the abandoned trajectory (step 4) is gone: the plots read only this one.
    history = sorted(p.name for p in (run / "position_frequency").iterdir())
    assert history == ["step_00000002.npy", "step_00000003.npy"]
    saved = np.load(ckpts / "step_00000003" / "position_frequency.npy")
    assert np.load(run / "position_frequency" / "step_00000003.npy").tolist() == saved.tolist()
    # Rolled back past step 3 again, with step 3 already set aside once before: a second name.
    shutil.copytree(ckpts / "step_00000003", ckpts / "step_00000003.abandoned")
    _train(1, [*_overrides(run, dataset, **{"max_steps": 3, "eval.every_steps": 0}),
               "--resume", str(ckpts / "step_00000002")])
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000002", "step_00000003"]
    assert (ckpts / "step_00000003.abandoned1" / "meta.json").is_file()


def test_in_process_train_from_s3_leaves_no_loader_threads(tmp_path, dataset, s3_bucket):
    """`train()` called from Python (as the demo does) on a remote dataset (a real S3 API server on
    loopback) stops its loader's download threads and feeder when it returns."""
    import threading

    import fsspec
    import torch.distributed as dist

    from slimpack.train.config import load_train_config
    from slimpack.train.loop import train

    fsspec.filesystem("s3").put(str(dataset), f"{s3_bucket}/shards", recursive=True)
    sets = _overrides(tmp_path / "run", f"s3://{s3_bucket}/shards",
                      **{"max_steps": 2, "eval.every_steps": 0, "data.cache_dir": str(tmp_path / "cache")})
    cfg = load_train_config(None, sets[1::2])
    try:
        report = train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert report.end_step == 2 and len(report.losses) == 2
    assert any((tmp_path / "cache").rglob("*.mds*"))  # the shards did come through the S3 cache
    assert json.loads((tmp_path / "run" / "run.json").read_text())["run_id"]
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("slimpack-fetch", "slimpack-loader"))]
