"""Needle in a haystack: the paper protocol's prompts against a re-implementation of the paper's
script (Meta's tokenizer counting), both protocols' scoring, accuracies from a scripted answerer
through the real command, the command on a slimpack checkpoint, its run's checkpoints and its
Hugging Face export, and the one-line errors for bad inputs."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil

import numpy as np
import pytest
import torch

from slimpack.cli import main
from slimpack.eval import engines
from slimpack.eval.niah import (
    NEEDLE,
    NiahConfig,
    build_samples,
    default_lengths,
    effective_length,
    keyed_found,
    paper_found,
)
from slimpack.model.transformer import Transformer, model_config
from slimpack.train import checkpoint as ckpt
from slimpack.train.config import OptimSection
from slimpack.train.optim import build_optimizer

TEXT = ("The quick brown fox jumps over the lazy dog while the river keeps flowing past old stone "
        "walls and quiet fields. ") * 40


def _demo_text(sentences: int = 600) -> str:
    """Real English with varied sentences: Python's own documentation, as the demo corpus uses."""
    from slimpack.demo.corpus import iter_corpus

    parts, count = [], 0
    for _, _, text in iter_corpus():
        parts.append(text)
        count += text.count(".")
        if count > sentences:
            return "\n\n".join(parts)
    raise AssertionError("the demo corpus is shorter than expected")


# ----------------------------------------------------------------------------- paper protocol


def _script_prompts(text: str, test_length: int, samples: int, count) -> tuple[list[str], list[str]]:
    """The paper's `niah/test_niah_llama.py`, rule for rule (one process per length: random.seed(42),
    four needles drawn once, then per sample four depths and a linear scan over the sentences)."""
    task = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
            "I will quiz you about the important information there.\n")
    question = "\n\nWhat are the magic numbers mentioned in the provided text?\nThe numbers are"
    rnd = random.Random(42)
    keys = [str(rnd.randint(100000, 1000000)) for _ in range(4)]
    needles = [f" One of the magic number is: {keys[i]}. " for i in range(4)]
    ctx_len = test_length - 128
    prompts = []
    for _ in range(samples):
        depths = [j * (0.99 / 4) + rnd.uniform(0, 0.99 / 4) for j in range(4)]
        text_list, res = text.split("."), []
        for i in range(len(text_list)):
            context = ""
            places = [0] + [int(d * len(res)) for d in depths]
            for j in range(1, 5):
                context += ".".join(res[places[j - 1]:places[j]]) + ". " + needles[j - 1]
            context += ". ".join(res[places[-1]:]) + ". \n" + question
            if count(context) + count(task) > ctx_len:
                if context[0] == ".":
                    context = context[1:]
                prompts.append(task + context)
                break
            res.append(text_list[i])
    return prompts, keys


@pytest.mark.parametrize("length", [256, 512, 1024, 1536])
def test_paper_prompts_equal_the_scripts_construction(llama3, meta_tokenizer, length):
    text = _demo_text()

    def count(s: str) -> int:  # the script's `tokenizer(prompt).input_ids.size(1)`: BOS included
        return len(meta_tokenizer.encode(s, bos=True, eos=False))

    want, numbers = _script_prompts(text, length, 6, count)
    cfg = NiahConfig(lengths=(length,), samples=6)
    got = build_samples(text, length, cfg, llama3.encoding.encode_ordinary, bos_id=llama3.bos_id)
    for sample, prompt in zip(got, want, strict=True):
        assert sample.tokens.tolist() == meta_tokenizer.encode(prompt, bos=True, eos=False)
        assert sample.numbers == numbers  # the same four numbers in every sample and at every length
        assert len(sample.tokens) > length - 128  # the first prompt over L - 128 (by up to a sentence)
        assert [int(d * 4 / 0.99) for d in sample.depths] == [0, 1, 2, 3]
    assert len({tuple(s.depths) for s in got}) == 6  # depths are drawn per sample


def test_paper_haystack_too_short_is_refused(llama3):
    with pytest.raises(ValueError, match="too short for length 2048: give a longer --haystack"):
        build_samples(TEXT, 2048, NiahConfig(lengths=(2048,), samples=1), llama3.encoding.encode_ordinary,
                      bos_id=llama3.bos_id)
    with pytest.raises(ValueError, match="length 128 leaves no prompt budget after 128 answer tokens"):
        build_samples(TEXT, 128, NiahConfig(lengths=(128,), samples=1), llama3.encoding.encode_ordinary,
                      bos_id=llama3.bos_id)


def test_scoring_paper_by_substring_keyed_by_whole_number():
    numbers = ["123456", "654321", "234567", "111111"]
    answer = " 1234567,\n\n 654321 and\tsome text"
    assert paper_found(answer, numbers) == [True, True, True, False]  # "234567" is inside "1234567"
    assert keyed_found(answer, numbers) == [False, True, False, False]


def test_effective_length_is_the_prefix_above_threshold():
    assert effective_length({128: 0.9, 256: 0.6, 384: 0.4, 512: 0.7}, 0.5) == 256
    assert effective_length({128: 0.2, 256: 0.9}, 0.5) == 0


# ----------------------------------------------------------------------------- keyed protocol


@pytest.fixture(scope="module")
def haystack(llama3):
    return np.asarray(llama3.encoding.encode_ordinary(TEXT), dtype=np.int64)


def _keyed(llama3, haystack, length, **kw):
    cfg = NiahConfig(lengths=(length,), protocol="keyed", samples=kw.pop("samples", 8), **kw)
    return build_samples(haystack, length, cfg, llama3.encoding.encode_ordinary, bos_id=llama3.bos_id)


def test_keyed_samples_have_the_exact_length_and_one_needle_per_quarter(llama3, haystack):
    for s in _keyed(llama3, haystack, 300):
        assert len(s.tokens) == 300 and s.tokens[0] == llama3.bos_id
        assert len(set(s.keys)) == 4 and all(len(n) == 6 for n in s.numbers)
        text = llama3.decode(s.tokens[1:])
        for i, (key, number, depth) in enumerate(zip(s.keys, s.numbers, s.depths, strict=True)):
            assert NEEDLE.format(key=key, number=number).strip() in text
            assert i / 4 <= depth < (i + 1) / 4
        assert text.endswith(f"numbers for {s.keys[0]}, {s.keys[1]}, {s.keys[2]} and {s.keys[3]} mentioned "
                             "in the provided text are:")
        positions = [text.index(f"for {k} is:") for k in s.keys]
        assert positions == sorted(positions)


def test_keyed_samples_depend_on_seed_and_length_only(llama3, haystack):
    a, b = _keyed(llama3, haystack, 256), _keyed(llama3, haystack, 256)
    c = _keyed(llama3, haystack, 256, seed=1)
    assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x.tokens, y.tokens) for x, y in zip(a, c, strict=True))
    with pytest.raises(ValueError, match="length 60 is too short for 4 needles"):
        _keyed(llama3, haystack, 60)
    with pytest.raises(ValueError, match="the haystack has 50 tokens but length 300 needs"):
        _keyed(llama3, haystack[:50], 300)


# ----------------------------------------------------------------------------- the command


def _scripted_engine(llama3, *, knows_below: int, pattern: str, answer_first: int):
    """A model stand-in that reads each prompt and answers the first `answer_first` needle numbers it
    finds, but only in prompts shorter than `knows_below` tokens (beyond: a wrong number)."""
    needle = re.compile(pattern)

    def generate(prompts, new, string):
        out = []
        for p in prompts:
            found = needle.findall(llama3.decode(p.tolist()))[:answer_first] if len(p) < knows_below else ["999"]
            ids = llama3.encoding.encode_ordinary(" " + ", ".join(found) + ".")[:new]
            out.append(ids + [llama3.eos_id, 17, 17])  # after EOS: ignored
        return out

    return engines.Engine("scripted", 1 << 20, None, generate)


@pytest.mark.parametrize("protocol,pattern", [("paper", r"magic number is: (\d+)"),
                                              ("keyed", r"magic number for \w+ is: (\d+)")])
def test_accuracy_from_a_scripted_answerer_through_the_command(llama3, tmp_path, monkeypatch, capsys,
                                                               protocol, pattern):
    """Through `slimpack eval niah`: an answerer that knows the two shallowest needles of prompts
    under 800 tokens. Every sample below 800 succeeds (2 of 4), none above; by depth, the two
    shallow quarters are found, the deep ones not; with --min-retrieved 3 nothing succeeds."""
    haystack = tmp_path / "essays.json"
    haystack.write_text(json.dumps({"text": _demo_text()}))
    monkeypatch.setattr(engines, "open_engine", lambda *a, **k: _scripted_engine(
        llama3, knows_below=800, pattern=pattern, answer_first=2))
    base = ["eval", "niah", "scripted-model", "--haystack", str(haystack), "--protocol", protocol,
            "--lengths", "384,512,1024,1536", "--samples", "5", "--no-progress", "--out", str(tmp_path / "out")]
    assert main(base) == 0
    report = json.loads((tmp_path / "out" / "niah.json").read_text())
    # paper prompts hold a little over L - 128 tokens, keyed prompts exactly L: 1024 is over 800 either way
    assert report["accuracy"] == {"384": 1.0, "512": 1.0, "1024": 0.0, "1536": 0.0}
    assert report["effective_length"] == 512
    assert report["mean_retrieved"]["384"] == 2.0 and report["mean_retrieved"]["1024"] == 0.0
    by_depth = report["depth_accuracy"]["384"]  # 10 bins; None where no needle fell (5 samples)
    assert set(by_depth[:4]) <= {1.0, None} and 1.0 in by_depth[:4]  # the shallow needles: found
    assert set(by_depth[5:]) <= {0.0, None} and 0.0 in by_depth[5:]  # the deep ones: not
    assert report["config"]["protocol"] == protocol
    assert report["config"]["max_new_tokens"] == (128 if protocol == "paper" else 18)
    ex = report["examples"]["512"]
    assert ex["prompt_tokens"] > ex["budget"] if protocol == "paper" else ex["prompt_tokens"] == 512
    assert "effective length" in capsys.readouterr().out
    assert main([*base, "--min-retrieved", "3", "--out", str(tmp_path / "strict")]) == 0
    strict = json.loads((tmp_path / "strict" / "niah.json").read_text())
    assert set(strict["accuracy"].values()) == {0.0} and strict["effective_length"] == 0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with two checkpoints of a random tiny model (the second perturbed)."""
    cfg = model_config("tiny")
    torch.manual_seed(0)
    model = Transformer(cfg, attention_backend="sdpa_ref")
    opt = build_optimizer(model, OptimSection(), torch.device("cpu"))
    run = tmp_path_factory.mktemp("run")
    meta = {"model_config": dataclasses.asdict(cfg), "config": {"data": {"seq_len": 384}}}
    ckpt.save_checkpoint(run / "checkpoints", 5, model, opt, {**meta, "tokens": 5000}, keep_last=3)
    with torch.no_grad():
        model.output.weight.mul_(1.5)
    ckpt.save_checkpoint(run / "checkpoints", 9, model, opt, {**meta, "tokens": 9000}, keep_last=3)
    (run / "config.json").write_text("{}")  # as `slimpack train` leaves in RUN_DIR
    return run


@pytest.fixture(scope="module")
def haystack_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hay") / "hay.txt"
    path.write_text(_demo_text(300))
    return path


def test_command_on_a_run_its_checkpoints_and_the_hf_export(run_dir, haystack_file, tmp_path):
    pytest.importorskip("transformers")
    from slimpack.train.export import export_hf

    common = ["--haystack", str(haystack_file), "--samples", "2", "--max-new-tokens", "24", "--no-progress"]
    assert main(["eval", "niah", str(run_dir), *common]) == 0  # the newest, 128-token steps to 384
    out = run_dir / "eval" / "niah"
    assert sorted(p.name for p in out.iterdir()) == ["step_00000009.json", "step_00000009.png"]
    newest = json.loads((out / "step_00000009.json").read_text())
    assert newest["step"] == 9 and newest["tokens"] == 9000 and sorted(newest["accuracy"]) == ["128", "256", "384"]
    assert main(["eval", "niah", str(run_dir), "--every", "1", *common]) == 0  # every checkpoint
    assert sorted(p.name for p in out.glob("*.json")) == ["step_00000005.json", "step_00000009.json"]
    assert json.loads((out / "step_00000009.json").read_text())["examples"] == newest["examples"]

    # The same greedy answers (up to EOS) from our KV-cache decoder and from transformers' generate.
    step9 = run_dir / "checkpoints" / "step_00000009"
    state_dict, _ = ckpt.load_model_state_dict(step9)
    hf_dir = export_hf(state_dict, model_config("tiny"), tmp_path / "hf")
    assert main(["eval", "niah", str(hf_dir), *common, "--lengths", "256,384", "--out", str(tmp_path / "hf-out")]) == 0
    theirs = json.loads((tmp_path / "hf-out" / "niah.json").read_text())
    assert {k: v["answer"] for k, v in theirs["examples"].items()} == \
        {k: newest["examples"][k]["answer"] for k in ("256", "384")}


def test_string_auto_shift_per_length_and_its_answers(run_dir, haystack_file, llama3, tmp_path):
    """`--string-shift auto --string-ratio R`: S = int(R x (L - max_new_tokens)) per length, recorded;
    the answers are those of our decoder with that STRING configuration."""
    from slimpack.model.inference import greedy_generate
    from slimpack.model.string_attention import StringConfig

    args = ["eval", "niah", str(run_dir / "checkpoints" / "step_00000009"), "--haystack", str(haystack_file),
            "--samples", "2", "--max-new-tokens", "24", "--lengths", "256,384", "--no-progress",
            "--string-shift", "auto", "--string-ratio", "0.33", "--string-window", "16"]
    assert main(args) == 0
    report = json.loads((run_dir / "eval" / "niah-string" / "step_00000009.json").read_text())
    s = report["string"]
    assert s["shift"] == "auto" and s["ratio"] == 0.33 and s["window"] == 16 and s["overlap"] is True
    assert s["scale"] == pytest.approx(1.0693147) and s["shift_by_length"] == {"256": 76, "384": 118}
    model, _ = engines.load_slimpack_model(run_dir / "checkpoints" / "step_00000009", device=torch.device("cpu"))
    cfg = NiahConfig(lengths=(384,), samples=1, max_new_tokens=24)
    sample = build_samples(haystack_file.read_text(), 384, cfg, llama3.encoding.encode_ordinary,
                           bos_id=llama3.bos_id)[0]
    ids = greedy_generate(model, torch.as_tensor(sample.tokens)[None], 24, eos_ids=(llama3.eos_id,),
                          string=StringConfig(118, 16))[0].tolist()
    ids = ids[:ids.index(llama3.eos_id)] if llama3.eos_id in ids else ids
    assert report["examples"]["384"]["answer"] == llama3.decode(ids)


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and err.startswith("slimpack eval")
    return err


def test_bad_inputs_get_one_line_errors(run_dir, haystack_file, tmp_path, capsys):
    step = run_dir / "checkpoints" / "step_00000005"
    base = ["eval", "niah", str(step), "--samples", "2", "--out", str(tmp_path / "x"), "--no-progress"]
    assert "exceeds" in _error([*base, "--haystack", str(haystack_file), "--lengths", "1024"], capsys)
    short = tmp_path / "short.txt"
    short.write_text("too short a haystack.")
    assert "give a longer --haystack" in _error([*base, "--haystack", str(short), "--lengths", "256"], capsys)
    bad_json = tmp_path / "essays.json"
    bad_json.write_text(json.dumps({"content": "x"}))
    assert 'needs a string field "text"' in _error([*base, "--haystack", str(bad_json)], capsys)
    assert "exactly one of --data" in _error(base, capsys)
    assert "S >= 2" in _error([*base, "--haystack", str(haystack_file), "--string-shift", "1"], capsys)
    assert "neither a slimpack checkpoint" in _error(["eval", "niah", str(tmp_path), "--haystack",
                                                      str(haystack_file)], capsys)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    assert "STRING runs on slimpack checkpoints only" in _error(
        ["eval", "niah", str(hf_dir), "--haystack", str(haystack_file), "--string-shift", "64"], capsys)
    meta = json.loads((step / "meta.json").read_text())
    other = tmp_path / "other" / step.name
    shutil.copytree(step, other)
    meta["model_config"]["intermediate_size"] = 128
    (other / "meta.json").write_text(json.dumps(meta))
    assert "do not fit the model" in _error(["eval", "niah", str(other), "--haystack", str(haystack_file),
                                             "--lengths", "256", "--no-progress"], capsys)


def test_default_lengths_keep_only_those_that_hold_a_paper_prompt():
    """The paper's prompts hold L - max_new_tokens: a sweep's default lengths start above that reserve
    (`bench niah` once asked for 128 and stopped with an error on its first length)."""
    assert default_lengths(2048, protocol="paper") == tuple(range(256, 2049, 128))
    assert default_lengths(2048, protocol="paper", max_new_tokens=200) == tuple(range(256, 2049, 128))
    assert default_lengths(2048, protocol="paper", max_new_tokens=16) == tuple(range(128, 2049, 128))
    assert default_lengths(2048, protocol="keyed") == tuple(range(128, 2049, 128))
    assert default_lengths(128, protocol="paper") == (128,)  # none holds a prompt: the error names it
    for length in default_lengths(4096, 256, protocol="paper"):
        NiahConfig(lengths=(length,)).budget(length)  # raises where no budget is left
