"""Needle in a haystack: prompt construction, scoring, effective length, the command on a slimpack
checkpoint and on its Hugging Face export, and the one-line errors for bad inputs."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from slimpack.cli import main
from slimpack.eval.niah import (
    NEEDLE,
    NiahConfig,
    build_samples,
    effective_length,
    retrieved,
    run_niah,
)
from slimpack.train import checkpoint as ckpt
from slimpack.train.config import OptimSection
from slimpack.train.model import Transformer, model_config
from slimpack.train.optim import build_optimizer

TEXT = ("The quick brown fox jumps over the lazy dog while the river keeps flowing past old stone "
        "walls and quiet fields. ") * 40


@pytest.fixture(scope="module")
def haystack(llama3):
    return np.asarray(llama3.encoding.encode_ordinary(TEXT), dtype=np.int64)


def _samples(llama3, haystack, length, **kw):
    cfg = NiahConfig(lengths=(length,), samples=kw.pop("samples", 8), **kw)
    return build_samples(haystack, length, cfg, llama3.encoding.encode_ordinary, bos_id=llama3.bos_id), cfg


def test_samples_have_the_exact_length_and_one_needle_per_quarter(llama3, haystack):
    samples, _ = _samples(llama3, haystack, 300)
    for s in samples:
        assert len(s.tokens) == 300 and s.tokens[0] == llama3.bos_id
        assert len(set(s.keys)) == 4 and all(len(n) == 6 for n in s.numbers)
        text = llama3.decode(s.tokens[1:])
        for i, (key, number, depth) in enumerate(zip(s.keys, s.numbers, s.depths, strict=True)):
            assert NEEDLE.format(key=key, number=number).strip() in text
            assert i / 4 <= depth < (i + 1) / 4
        assert text.endswith(f"numbers for {s.keys[0]}, {s.keys[1]}, {s.keys[2]} and {s.keys[3]} mentioned "
                             "in the provided text are:")
        # Needles appear in key order, shallow to deep.
        positions = [text.index(f"for {k} is:") for k in s.keys]
        assert positions == sorted(positions)


def test_samples_depend_on_seed_and_length_only(llama3, haystack):
    a, _ = _samples(llama3, haystack, 256)
    b, _ = _samples(llama3, haystack, 256)
    c, _ = _samples(llama3, haystack, 256, seed=1)
    assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x.tokens, y.tokens) for x, y in zip(a, c, strict=True))


def test_too_short_length_and_haystack_are_refused(llama3, haystack):
    with pytest.raises(ValueError, match="length 60 is too short for 4 needles"):
        _samples(llama3, haystack, 60)
    with pytest.raises(ValueError, match="the haystack has 50 tokens but length 300 needs"):
        _samples(llama3, haystack[:50], 300)


def test_retrieved_counts_whole_numbers_only():
    assert retrieved(" 123456, 654321 and 1234567.", ["123456", "654321", "234567"]) == [True, True, False]


def test_effective_length_is_the_prefix_above_threshold():
    assert effective_length({128: 0.9, 256: 0.6, 384: 0.4, 512: 0.7}, 0.5) == 256
    assert effective_length({128: 0.2, 256: 0.9}, 0.5) == 0


def test_scoring_by_depth_with_an_answer_that_knows_the_shallow_half(llama3, haystack):
    """An answerer that reads the prompt and returns only the needles in the first half of the
    haystack: accuracy by depth is 1 above 50% and 0 below; 2 of 4 found -> every sample succeeds."""
    encode = llama3.encoding.encode_ordinary
    pattern = re.compile(r"magic number for \w+ is: (\d+)")

    def half_answer(prompts: np.ndarray, new: int) -> np.ndarray:
        out = []
        for p in prompts:
            found = pattern.findall(llama3.decode(p.tolist()))[:2]
            ids = encode(" " + ", ".join(found))[:new]
            out.append(ids + [llama3.eos_id] * (new - len(ids)))
        return np.array(out)

    cfg = NiahConfig(lengths=(200, 300), samples=6, depth_bins=4)
    report = run_niah(half_answer, llama3.decode, encode, haystack, cfg, bos_id=llama3.bos_id,
                      eos_ids=(llama3.eos_id,), model="half")
    assert report.accuracy == {200: 1.0, 300: 1.0} and report.effective_length == 300
    assert report.depth_accuracy[300] == [1.0, 1.0, 0.0, 0.0]
    assert report.mean_retrieved[200] == 2.0
    strict = run_niah(half_answer, llama3.decode, encode, haystack, dataclasses.replace(cfg, min_retrieved=3),
                      bos_id=llama3.bos_id, eos_ids=(llama3.eos_id,))
    assert strict.accuracy == {200: 0.0, 300: 0.0} and strict.effective_length == 0


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = model_config("tiny")
    torch.manual_seed(0)
    model = Transformer(cfg, attention_backend="sdpa_ref")
    opt = build_optimizer(model, OptimSection(), torch.device("cpu"))
    root = tmp_path_factory.mktemp("run") / "checkpoints"
    meta = {"tokens": 0, "model_config": dataclasses.asdict(cfg), "config": {"data": {"seq_len": 256}}}
    return ckpt.save_checkpoint(root, 5, model, opt, meta, keep_last=1)


@pytest.fixture(scope="module")
def haystack_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hay") / "hay.txt"
    path.write_text(TEXT)
    return path


def test_command_writes_report_and_heatmap(checkpoint, haystack_file, tmp_path, capsys):
    out = tmp_path / "niah.json"
    (checkpoint.parent.parent / "config.json").write_text("{}")  # as `slimpack train` leaves in RUN_DIR
    rc = main(["eval", "niah", str(checkpoint.parent.parent), "--haystack", str(haystack_file), "--samples", "3",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert sorted(report["accuracy"]) == ["128", "256"]  # 128-token steps up to the training length
    assert set(report) >= {"effective_length", "depth_accuracy", "examples", "config"}
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "effective length" in capsys.readouterr().out


def test_command_with_string_and_on_the_hf_export(checkpoint, haystack_file, tmp_path):
    pytest.importorskip("transformers")
    from slimpack.train.export import export_hf

    ours = tmp_path / "ours.json"
    assert main(["eval", "niah", str(checkpoint), "--haystack", str(haystack_file), "--samples", "2",
                 "--lengths", "150", "--out", str(ours), "--no-progress"]) == 0
    state_dict, _ = ckpt.load_model_state_dict(checkpoint)
    hf_dir = export_hf(state_dict, model_config("tiny"), tmp_path / "hf")
    theirs = tmp_path / "hf.json"
    assert main(["eval", "niah", str(hf_dir), "--haystack", str(haystack_file), "--samples", "2",
                 "--lengths", "150", "--out", str(theirs), "--no-progress"]) == 0
    # The same greedy answers from our KV-cache decoder and from transformers' generate.
    assert json.loads(ours.read_text())["examples"] == json.loads(theirs.read_text())["examples"]
    string = tmp_path / "string.json"
    assert main(["eval", "niah", str(checkpoint), "--haystack", str(haystack_file), "--samples", "2",
                 "--lengths", "150", "--string-shift", "64", "--string-window", "16", "--out", str(string),
                 "--no-progress"]) == 0
    assert json.loads(string.read_text())["string"] == {"shift": 64, "window": 16}


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    return err


def test_bad_inputs_get_one_line_errors(checkpoint, haystack_file, tmp_path, capsys):
    base = ["eval", "niah", str(checkpoint), "--samples", "2", "--out", str(tmp_path / "x.json"), "--no-progress"]
    assert "exceeds" in _error([*base, "--haystack", str(haystack_file), "--lengths", "1024"], capsys)
    short = tmp_path / "short.txt"
    short.write_text("too short a haystack")
    assert "give a longer --haystack" in _error([*base, "--haystack", str(short), "--lengths", "128"], capsys)
    assert "exactly one of --data" in _error(base, capsys)
    assert "neither a slimpack checkpoint" in _error(["eval", "niah", str(tmp_path), "--haystack",
                                                      str(haystack_file)], capsys)
    # A checkpoint whose meta.json describes another shape than its weights.
    meta = json.loads((checkpoint / "meta.json").read_text())
    other = tmp_path / "other" / checkpoint.name
    import shutil

    shutil.copytree(checkpoint, other)
    meta["model_config"]["intermediate_size"] = 128
    (other / "meta.json").write_text(json.dumps(meta))
    assert "do not fit the model" in _error(["eval", "niah", str(other), "--haystack", str(haystack_file),
                                             "--lengths", "128", "--no-progress"], capsys)
