"""The tokenization job: determinism across workers and nodes, restart after SIGKILL, failures,
block layout, merge and the manifest."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard

from slimpack.shards import schema
from slimpack.shards.invariants import sample_problems
from slimpack.shards.mds import MDSDataset
from slimpack.tokenize.config import TokenizeConfig
from slimpack.tokenize.job import run_tokenize
from slimpack.tokenize.merge import MergeError, fingerprint, merge_dataset
from slimpack.tokenize.nodes import node_from_env

SMALL = TokenizeConfig(block_tokens=4096, shard_size_limit=1 << 17)


def _run(inputs, out, **kw):
    return run_tokenize([str(i) for i in inputs], str(out), kw.pop("cfg", SMALL), progress=False, **kw)


def test_workers_and_nodes_give_identical_bytes(demo_corpus: Path, tmp_path: Path, tree_digest):
    one = _run([demo_corpus], tmp_path / "one", workers=1)
    two = _run([demo_corpus], tmp_path / "two", workers=2)
    n0 = _run([demo_corpus], tmp_path / "nodes", workers=1, node_rank=0, num_nodes=2)
    assert not n0.merged and "not complete" in n0.merge_note
    n1 = _run([demo_corpus], tmp_path / "nodes", workers=1, node_rank=1, num_nodes=2)
    assert one.ok and two.ok and n1.merged
    assert set(n0.parts_done).isdisjoint(n1.parts_done)
    ref = tree_digest(tmp_path / "one")
    assert any(k.endswith(".mds.zstd") for k in ref) and schema.MANIFEST_FILENAME in ref
    assert tree_digest(tmp_path / "two") == ref
    assert tree_digest(tmp_path / "nodes") == ref


def test_rerun_skips_complete_parts_and_merge_is_idempotent(demo_corpus: Path, tmp_path: Path, tree_digest):
    out = tmp_path / "out"
    first = _run([demo_corpus], out, workers=2)
    before = tree_digest(out)
    again = _run([demo_corpus], out, workers=2)
    assert again.parts_done == [] and sorted(again.parts_skipped_complete) == sorted(first.parts_done)
    merge_dataset(str(out))
    assert tree_digest(out) == before


def test_shards_hold_whole_documents_in_blocks(demo_corpus: Path, tmp_path: Path, llama3):
    out = tmp_path / "out"
    report = _run([demo_corpus], out, workers=2)
    manifest = json.loads((out / schema.MANIFEST_FILENAME).read_text())
    ds = MDSDataset(out)
    sample_tokens = np.load(out / schema.SAMPLE_TOKENS_FILENAME, allow_pickle=False)
    assert len(ds) == manifest["samples"] == len(sample_tokens)
    docs = tokens = 0
    for k, sample in enumerate(ds):
        cu = sample["cu_seqlens"]
        assert sample_problems(sample["tokens"], cu, bos_id=128000, eos_id=128001, vocab_size=128256,
                               doc_sources=sample["doc_sources"]) == []
        assert len(sample["tokens"]) == sample_tokens[k]
        lengths = np.diff(cu)
        # A block stops growing once it reaches the target; a long document stands alone.
        assert lengths[:-1].sum() < SMALL.block_tokens or len(lengths) == 1 or lengths[-1] >= SMALL.block_tokens
        docs += len(lengths)
        tokens += int(cu[-1])
    assert (docs, tokens) == (manifest["documents"], manifest["tokens"]) == (report.documents, report.tokens)
    per_source = sum(s["tokens"] for s in manifest["per_source"].values())
    assert per_source == tokens
    assert manifest["vocab_size"] == 128_256 and manifest["tokenizer"]["sha256"] == llama3.sha256
    assert manifest["config"]["block_tokens"] == SMALL.block_tokens


def test_document_ids_round_trip_to_text(tmp_path: Path, llama3):
    texts = [f"doc {i}: " + "lorem ipsum " * (i * 37 % 500 + 1) for i in range(200)]
    src = tmp_path / "in" / "docs.jsonl"
    src.parent.mkdir()
    src.write_text("".join(json.dumps({"text": t, "meta": {"redpajama_set_name": "S"}}) + "\n" for t in texts))
    _run([src.parent], tmp_path / "out", workers=1)
    got = []
    for sample in MDSDataset(tmp_path / "out"):
        cu = sample["cu_seqlens"]
        got += [llama3.decode(sample["tokens"][a + 1:b - 1]) for a, b in itertools.pairwise(cu)]
        assert set(sample["doc_sources"].tolist()) == {schema.source_id("S")}
    assert got == texts


def test_bad_records_counted_and_failed_part_isolated(tmp_path: Path):
    inp = tmp_path / "in"
    inp.mkdir()
    good = [json.dumps({"text": f"text {i}"}) for i in range(50)]
    (inp / "a.jsonl").write_text("\n".join(good[:10] + ["{broken", json.dumps({"text": ""})] + good[10:]) + "\n")
    raw = ("\n".join(good * 200) + "\n").encode()
    data = zstandard.ZstdCompressor().compress(raw)
    (inp / "b.jsonl.zst").write_bytes(data[: len(data) // 2])
    (inp / "c.jsonl").write_text("\n".join(good) + "\n")
    report = _run([inp], tmp_path / "out", workers=2)
    assert not report.ok and not report.merged
    assert list(report.parts_failed) == ["b.jsonl.zst"]
    assert "truncated at compressed byte offset" in report.parts_failed["b.jsonl.zst"]
    assert "FAILED part b.jsonl.zst" in report.summary()
    assert sorted(report.parts_done) == ["a.jsonl", "c.jsonl"]
    assert report.skipped_records == {"empty_text": 1, "invalid_json": 1}
    assert {(e["reason"], e["line"]) for e in report.bad_examples} == {("invalid_json", 11), ("empty_text", 12)}
    assert not (tmp_path / "out" / "parts" / "b.jsonl.zst").exists()
    fail = _run([inp / "a.jsonl"], tmp_path / "strict", cfg=TokenizeConfig(on_bad_record="fail"))
    assert "a.jsonl:11: invalid_json" in fail.parts_failed["a.jsonl"]


def test_cli_exit_status_and_json_report(tmp_path: Path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "ok.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    cmd = [sys.executable, "-m", "slimpack", "tokenize", str(inp), "--out", str(tmp_path / "o"),
           "--no-progress", "--json", str(tmp_path / "r.json")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "r.json").read_text())["documents"] == 1
    (inp / "bad.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    done = subprocess.run(cmd[:5] + ["--out", str(tmp_path / "o2"), "--no-progress"],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "FAILED part bad.jsonl.gz" in done.stdout


def test_sigkill_mid_run_then_rerun_is_byte_identical(demo_corpus: Path, tmp_path: Path, tree_digest):
    # Many small inputs make the kill land between and inside parts.
    inp = tmp_path / "in"
    for r in range(3):
        shutil.copytree(demo_corpus, inp / f"copy{r}")
    ref = _run([inp], tmp_path / "ref", workers=2)
    assert ref.ok
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "slimpack", "tokenize", str(inp), "--out", str(out), "--workers", "2",
           "--no-progress", "--block-tokens", str(SMALL.block_tokens),
           "--set", f"tokenize.shard_size_limit={SMALL.shard_size_limit}"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(out.glob("parts/**/stats.json"))) < 3:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("parts/**/stats.json")))
    assert 0 < done_before < len(ref.parts_done), "the kill should land mid-run"
    assert not (out / schema.MANIFEST_FILENAME).exists()
    rerun = _run([inp], out, workers=2)
    assert rerun.ok and rerun.merged and len(rerun.parts_skipped_complete) == done_before
    assert tree_digest(out) == tree_digest(tmp_path / "ref")


def test_merge_refuses_incomplete_parts(demo_corpus: Path, tmp_path: Path):
    out = tmp_path / "out"
    _run([demo_corpus], out, workers=2)
    stats = next(out.glob("parts/**/stats.json"))
    stats.unlink()
    with pytest.raises(MergeError, match=r"no stats\.json"):
        merge_dataset(str(out))


def test_node_rank_from_environment(monkeypatch):
    for var in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_PROCID", "SLURM_NTASKS", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert node_from_env(None, None) == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert node_from_env(None, None) == (3, 8)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert node_from_env(None, None) == (1, 4)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "6")
    assert node_from_env(None, None) == (5, 6)
    assert node_from_env(2, 3) == (2, 3)
    with pytest.raises(ValueError, match="outside"):
        node_from_env(3, 3)


def test_out_that_is_an_existing_file_is_refused_up_front(tmp_path: Path, capsys):
    from slimpack.cli import main

    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    with pytest.raises(ValueError, match=r"notes\.txt is an existing file"):
        _run([inp], out)
    assert main(["tokenize", str(inp), "--out", str(out), "--no-progress"]) == 2
    assert "--out" in capsys.readouterr().err
    assert out.read_text() == "keep me"


def test_rerun_redoes_a_complete_part_whose_shard_was_lost(demo_corpus: Path, tmp_path: Path, tree_digest):
    out = tmp_path / "out"
    first = _run([demo_corpus], out, workers=1)
    before = tree_digest(out)
    shards = sorted((out / "parts").rglob("shard.*.mds*"))
    lost, cut = shards[0], shards[-1]
    lost.unlink()  # deleted
    cut.write_bytes(cut.read_bytes()[:-10])  # truncated
    again = _run([demo_corpus], out, workers=1)
    redone = {lost.parent.relative_to(out / "parts").as_posix(), cut.parent.relative_to(out / "parts").as_posix()}
    assert again.ok and again.merged and set(again.parts_done) == redone
    assert sorted(again.parts_skipped_complete + again.parts_done) == sorted(first.parts_done)
    assert tree_digest(out) == before


def test_merge_names_the_config_key_that_differs_and_ignores_the_bad_record_policy(tmp_path: Path):
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("a", "b", "c"):
        (inp / f"{name}.jsonl").write_text(json.dumps({"text": f"text {name}"}) + "\n")
    out = tmp_path / "out"
    files = [inp / "a.jsonl", inp / "b.jsonl"]
    # Nodes run with different bad-record policies: the parts' bytes do not depend on it.
    assert not _run(files, out, node_rank=0, num_nodes=2).merged
    strict = TokenizeConfig(block_tokens=SMALL.block_tokens, shard_size_limit=SMALL.shard_size_limit,
                            on_bad_record="fail")
    assert _run(files, out, cfg=strict, node_rank=1, num_nodes=2).merged
    # A part tokenized with another block size is refused, naming the key and both values.
    _run([inp / "c.jsonl"], tmp_path / "c", cfg=TokenizeConfig(block_tokens=123))
    shutil.copytree(tmp_path / "c" / "parts" / "c.jsonl", out / "parts" / "c.jsonl")
    with pytest.raises(MergeError, match=r"block_tokens: 4096 in part a\.jsonl, 123 in part c\.jsonl"):
        merge_dataset(str(out))


def test_rerun_without_an_input_does_not_merge_its_stale_part(tmp_path: Path):
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("a", "b"):
        (inp / f"{name}.jsonl").write_text(json.dumps({"text": f"text {name}"}) + "\n")
    out = tmp_path / "out"
    assert _run([inp], out).merged
    (inp / "b.jsonl").unlink()  # the user drops an input and rebuilds
    with pytest.raises(MergeError, match=r"b\.jsonl.*not among the inputs"):
        _run([inp], out)
    manifest = json.loads((out / schema.MANIFEST_FILENAME).read_text())
    assert sorted(manifest["parts"]) == ["a.jsonl", "b.jsonl"]  # the old merge, untouched
    merge_dataset(str(out))  # merging every part present stays possible, explicitly


def test_num_nodes_without_a_rank_is_refused_not_rank_zero_everywhere(monkeypatch):
    for var in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_PROCID", "SLURM_NTASKS", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    # Every node would take rank 0's parts and write the same part directories at once.
    with pytest.raises(ValueError, match="--node-rank"):
        node_from_env(None, 4)
    assert node_from_env(None, 1) == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert node_from_env(None, 8) == (3, 8)  # the rank still comes from the environment
    assert node_from_env(1, None) == (1, 8)



def test_fingerprint_covers_each_parts_split(tmp_path: Path):
    inp = tmp_path / "in"
    for split in ("train", "validation"):
        (inp / split).mkdir(parents=True)
        (inp / split / "a.jsonl").write_text(json.dumps({"text": f"a {split} document"}) + "\n")
    out = tmp_path / "out"
    assert _run([inp], out, workers=1).merged
    index = json.loads((out / schema.INDEX_FILENAME).read_text())
    manifest = json.loads((out / schema.MANIFEST_FILENAME).read_text())
    splits = {p: v["split"] for p, v in manifest["parts"].items()}
    assert splits == {"train/a.jsonl": "train", "validation/a.jsonl": "validation"}
    sha = manifest["tokenizer"]["sha256"]
    assert fingerprint(index["shards"], sha, splits) == manifest["fingerprint"]
    # The same shard bytes with the held-out part moved into train: another dataset for the loader.
    moved = {**splits, "validation/a.jsonl": "train"}
    assert fingerprint(index["shards"], sha, moved) != manifest["fingerprint"]


def test_a_reader_library_error_fails_only_its_part(tmp_path: Path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "good.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    (inp / "broken.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    report = _run([inp], tmp_path / "out", workers=1)
    assert report.parts_done == ["good.jsonl"] and list(report.parts_failed) == ["broken.parquet"]
    assert not report.ok and "FAILED part broken.parquet" in report.summary()


def test_a_part_whose_every_record_lacks_the_text_field_fails_naming_the_fields(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.table({"content": ["first document", "second"], "id": [1, 2]}), inp / "a.parquet")
    (inp / "b.jsonl").write_text("".join(json.dumps({"body": f"doc {i}", "meta": {}}) + "\n" for i in range(3)))
    report = _run([inp], tmp_path / "out")
    assert not report.ok and not report.merged and report.parts_done == []
    a, b = report.parts_failed["a.parquet"], report.parts_failed["b.jsonl"]
    assert "all 2 records were skipped as missing_text" in a and "'text'" in a
    assert "content, id" in a and "--set tokenize.text_field=" in a
    assert "all 3 records were skipped as missing_text" in b and "body, meta" in b and "--set tokenize.text_field=" in b
    assert not (tmp_path / "out" / schema.MANIFEST_FILENAME).exists()
    # The fix the message names works.
    fixed = _run([inp / "a.parquet"], tmp_path / "fixed", cfg=TokenizeConfig(text_field="content"))
    assert fixed.ok and fixed.merged and fixed.documents == 2


def _file_size_limit(limit: int):
    """preexec_fn: the process may not grow any file past `limit` bytes. A write past it fails in
    the kernel with EFBIG (SIGXFSZ ignored), as a write to a full disk fails with ENOSPC: a real
    failed write, reaching the same `OSError` paths, on any Linux machine and without root."""
    import resource

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_merge_that_cannot_write_fails_cleanly_and_a_later_merge_completes(tmp_path: Path, tree_digest):
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("a", "b"):
        (inp / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name} {i} " * 50}) + "\n" for i in range(40)))
    out = tmp_path / "out"
    assert _run([inp], out).merged
    merged = tree_digest(out)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    for name in (schema.SAMPLE_TOKENS_FILENAME, schema.INDEX_FILENAME, schema.MANIFEST_FILENAME):
        (out / name).unlink()
    # Every part is complete, so tokenize only merges, and no merged file fits.
    done = subprocess.run([sys.executable, "-m", "slimpack", "tokenize", str(inp), "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, env=env,
                          preexec_fn=_file_size_limit(64))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "2 already complete" in done.stdout  # the job's report, as for a failed part
    assert f"merge FAILED: {out}: could not write {schema.SAMPLE_TOKENS_FILENAME} (File too large)" in done.stdout
    assert f"slimpack shards merge {out}" in done.stdout
    # No partial or temporary file left: only the list of inputs, written by the first run.
    assert [p.name for p in out.iterdir() if p.is_file()] == [schema.INPUTS_FILENAME]
    assert _run([inp], out).merged and tree_digest(out) == merged

    # A re-merge that replaces sample_tokens.npy but cannot write index.json: the old manifest no
    # longer describes the files, so it goes, and the dataset reads as unmerged until a merge completes.
    npy_bytes = (out / schema.SAMPLE_TOKENS_FILENAME).stat().st_size
    done = subprocess.run([sys.executable, "-m", "slimpack", "shards", "merge", str(out)], capture_output=True,
                          text=True, env=env, preexec_fn=_file_size_limit(npy_bytes))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("slimpack shards merge: error: ")
    assert f"could not write {schema.INDEX_FILENAME}" in done.stderr
    assert not (out / schema.MANIFEST_FILENAME).exists()
    from slimpack.shards.validate import validate_dataset

    assert "slimpack shards merge" in validate_dataset(out).unusable
    merge_dataset(str(out))
    assert tree_digest(out) == merged


def test_merge_after_a_failed_part_records_the_input_and_validate_reports_it(tmp_path: Path, capsys):
    from slimpack.cli import main
    from slimpack.shards.validate import validate_dataset

    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("a", "c"):
        (inp / f"{name}.jsonl").write_text(json.dumps({"text": f"text {name}"}) + "\n")
    whole = zstandard.ZstdCompressor().compress(("".join(
        json.dumps({"text": f"b {i} " * 40}) + "\n" for i in range(300))).encode())
    (inp / "b.jsonl.zst").write_bytes(whole[: len(whole) // 2])  # truncated: its part fails
    out = tmp_path / "out"
    report = _run([inp], out)
    assert list(report.parts_failed) == ["b.jsonl.zst"] and not report.merged

    # Merging the parts there are is allowed, but says which input is missing, and records it.
    assert main(["shards", "merge", str(out)]) == 1
    said = capsys.readouterr().out
    assert f"input {inp / 'b.jsonl.zst'} has no complete part" in said and "re-run `slimpack tokenize`" in said
    inputs = json.loads((out / schema.MANIFEST_FILENAME).read_text())["inputs"]
    assert inputs["a.jsonl"] == {"path": str(inp / "a.jsonl"), "split": "train", "state": "complete"}
    assert inputs["b.jsonl.zst"]["state"] == "failed" and "truncated" in inputs["b.jsonl.zst"]["error"]
    result = validate_dataset(out)
    missing = [f for f in result.findings if f.check == "input"]
    assert result.exit_status == 1 and len(missing) == 1, result.summary()
    assert str(inp / "b.jsonl.zst") in missing[0].message and missing[0].part == "b.jsonl.zst"
    assert "slimpack tokenize" in missing[0].hint

    # The input repaired, a re-run redoes only its part and the dataset is whole.
    (inp / "b.jsonl.zst").write_bytes(whole)
    again = _run([inp], out)
    assert again.parts_done == ["b.jsonl.zst"] and again.merged
    assert validate_dataset(out).ok
    inputs = json.loads((out / schema.MANIFEST_FILENAME).read_text())["inputs"]
    assert {v["state"] for v in inputs.values()} == {"complete"} and len(inputs) == 3


def _small_inputs(inp: Path, files: int = 8, docs: int = 150) -> Path:
    """`files` JSONL inputs of varied real-looking text, a few hundred KB in all."""
    from slimpack.demo.corpus import iter_corpus

    texts = [text[:3000] for _, _, text in itertools.islice(iter_corpus(), files * docs)]
    inp.mkdir()
    for f in range(files):
        (inp / f"part{f:02d}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in texts[f * docs:(f + 1) * docs]))
    return inp


def _tokenize_cmd(inputs: list[Path], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "slimpack", "tokenize", *map(str, inputs), "--out", str(out), "--no-progress",
            "--block-tokens", str(SMALL.block_tokens), "--set", f"tokenize.shard_size_limit={SMALL.shard_size_limit}",
            *extra]


def test_a_part_completed_by_another_run_is_never_removed(tmp_path: Path, tree_digest):
    from slimpack.shards.validate import validate_dataset
    from slimpack.tokenize import pool as job
    from slimpack.tokenize.readers import discover

    inp = _small_inputs(tmp_path / "in", files=2, docs=40)
    out = tmp_path / "out"
    # Run A tokenizes and merges. Run B planned part00 while A was still writing it, and its worker
    # reaches part00 only now: it must find the part complete, not clear it and write it again.
    assert _run([inp], out).merged
    merged = tree_digest(out)
    files = sorted(p for p in (out / "parts" / "part00.jsonl").iterdir())
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in files]
    job._init_worker(None)
    item = next(i for i in discover([str(inp)])[0] if i.part == "part00.jsonl")
    result = job._run_part(item, SMALL, str(out), None)
    assert result == {"part": "part00.jsonl", "complete": True}
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in files] == before
    assert tree_digest(out) == merged and validate_dataset(out).ok


def test_concurrent_runs_and_nodes_on_one_out_give_the_single_run_bytes(tmp_path: Path, tree_digest):
    inp = _small_inputs(tmp_path / "in", files=6, docs=60)
    ref = _run([inp], tmp_path / "ref", workers=1)
    assert ref.ok and ref.merged
    # The same job started twice at once, and the two nodes of one job at once.
    procs = [subprocess.Popen(_tokenize_cmd([inp], tmp_path / "twice", "--workers", "2"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    procs += [subprocess.Popen(_tokenize_cmd([inp], tmp_path / "nodes", "--node-rank", str(r), "--num-nodes", "2"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stdout + stderr
    assert tree_digest(tmp_path / "twice") == tree_digest(tmp_path / "ref")
    assert tree_digest(tmp_path / "nodes") == tree_digest(tmp_path / "ref")


def test_a_run_waits_for_a_part_another_live_run_holds_but_not_for_a_killed_one(tmp_path: Path, tree_digest):
    import select

    inp = _small_inputs(tmp_path / "in", files=2, docs=40)
    assert _run([inp], tmp_path / "ref").merged
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom slimpack.storage import Root\n"
         "from slimpack.tokenize.lock import part_lock as _part_lock\n"
         "with _part_lock(Root(sys.argv[1]), 'part00.jsonl'):\n    print('locked', flush=True)\n    time.sleep(300)",
         str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        run = subprocess.Popen(_tokenize_cmd([inp], out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        said, deadline = b"", time.monotonic() + 60
        while b"waiting for it" not in said and time.monotonic() < deadline and run.poll() is None:
            if select.select([run.stderr], [], [], 0.5)[0]:
                said += os.read(run.stderr.fileno(), 4096)
        assert f"part part00.jsonl is being written by {os.uname().nodename} pid {holder.pid}".encode() in said, said
        assert run.poll() is None and not (out / "parts" / "part00.jsonl").exists()  # untouched while held
    finally:
        holder.kill()  # as SIGKILL on a node: the kernel drops its lock, nothing is left stale
        holder.wait()
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stdout + stderr
    assert tree_digest(out) == tree_digest(tmp_path / "ref")
    assert not list((out / "parts").glob("*.lock"))


def test_the_part_lock_excludes_across_processes_though_its_file_is_removed_on_release(tmp_path: Path):
    # Read-modify-write of a counter under the lock from 4 processes: a lost update would mean two
    # holders at once (the race the retry on a removed lock file closes).
    script = ("import sys\nfrom pathlib import Path\nfrom slimpack.storage import Root\n"
              "from slimpack.tokenize.lock import part_lock as _part_lock\n"
              "counter = Path(sys.argv[1]) / 'counter'\n"
              "for _ in range(200):\n"
              "    with _part_lock(Root(sys.argv[1]), 'p.jsonl'):\n"
              "        counter.write_text(str(int(counter.read_text()) + 1))\n")
    (tmp_path / "counter").write_text("0")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stderr=subprocess.DEVNULL)
             for _ in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    assert (tmp_path / "counter").read_text() == "800"
    assert not list((tmp_path / "parts").iterdir())  # no lock file left behind
