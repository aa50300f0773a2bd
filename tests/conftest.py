"""Shared fixtures: the real-text corpora every test may use.

`shared_data` is real SlimPajama web text (a directory of `*.jsonl.zst` files in SlimPajama's
layout) named by the environment variable SLIMPACK_WEB_TEXT; the repository ships none, so tests
that need it skip, saying how to run them, where it is not set. `demo_corpus` is built from
Python's own text and exists everywhere.
`train_data` is a tiny tokenized dataset and `tiny_run` a tiny model trained on it (run
directory with checkpoints, ledger and loss-by-position records).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WEB_TEXT_ENV = "SLIMPACK_WEB_TEXT"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    value = os.environ.get(WEB_TEXT_ENV)
    if not value:
        pytest.skip(f"needs real web text: set {WEB_TEXT_ENV} to a directory of SlimPajama *.jsonl.zst files")
    path = Path(value)
    if not path.is_dir():
        pytest.fail(f"{WEB_TEXT_ENV}={value} is not a directory; point it at SlimPajama *.jsonl.zst files")
    return path


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slimpack.demo.corpus import build_corpus

    out = tmp_path_factory.mktemp("demo-corpus")
    build_corpus(out)
    return out


@pytest.fixture(scope="session")
def llama3():
    from slimpack.tokenize.tokenizer import Llama3Tokenizer

    return Llama3Tokenizer()


@pytest.fixture(scope="session")
def meta_tokenizer():
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


def _tree_digest(root: Path, exclude: tuple[str, ...] = ("reports",)) -> dict[str, str]:
    """sha256 of every file under root by relative name, skipping per-run reports."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] not in exclude}


@pytest.fixture(scope="session")
def tree_digest() -> Callable[..., dict[str, str]]:
    return _tree_digest


@pytest.fixture
def s3_bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real S3 API server (moto's server mode) on 127.0.0.1 with one bucket; AWS_ENDPOINT_URL
    and dummy credentials point boto3 and s3fs at it. No mocks of boto or fsspec."""
    import boto3
    import fsspec
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    fsspec.filesystem("s3").clear_instance_cache()
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="slimpack-test")
        yield "slimpack-test"
    finally:
        fsspec.filesystem("s3").clear_instance_cache()
        server.stop()


_WORDS = ["the", "model", "reads", "packed", "documents", "and", "learns", "which", "token", "follows",
          "in", "every", "sequence", "of", "stream", "while", "gradients", "flow", "through", "shards"]


@pytest.fixture(scope="session")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~8K train tokens in documents of 6-121 tokens (the real tokenize job over word salad); a
    validation split of 12 documents of which the first 8 hold at least 72 tokens."""
    from slimpack.tokenize.job import TokenizeConfig, run_tokenize

    root = tmp_path_factory.mktemp("train-data")
    rng = random.Random(1)
    for split, words in (("train", [rng.randrange(5, 120) for _ in range(120)]),
                         ("validation", [rng.randrange(70, 150) for _ in range(8)] + [5, 9, 20, 30])):
        lines = []
        for n in words:
            start = rng.randrange(len(_WORDS))
            text = " ".join(_WORDS[(start + i) % len(_WORDS)] for i in range(n))
            lines.append(json.dumps({"text": text, "meta": {"redpajama_set_name": "Synthetic"}}))
        path = root / "corpus" / split / "chunk1" / f"example_{split}_0.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
    report = run_tokenize([str(root / "corpus")], str(root / "shards"), TokenizeConfig(block_tokens=512),
                          workers=1, progress=False)
    assert report.ok, report.summary()
    return root / "shards"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, train_data: Path) -> Path:
    """`python -m slimpack.train` (one process, CPU): the tiny model, 64-token windows, 6 steps,
    checkpoints and evaluations (with loss by position in 4 buckets) every 3 steps."""
    run = tmp_path_factory.mktemp("tiny-run") / "run"
    sets = {"run_dir": f'"{run}"', "device": '"cpu"', "max_steps": 6, "model.preset": '"tiny"',
            "model.attention_backend": '"sdpa_ref"', "parallel.mixed_precision": "false",
            "data.path": f'"{train_data}"', "data.seq_len": 64, "data.global_batch_tokens": 256,
            "data.micro_batch_size": 2, "optim.lr": 3e-3, "optim.min_lr": 3e-4, "optim.warmup_steps": 2,
            "checkpoint.every_steps": 3, "checkpoint.keep_last": 1, "eval.every_steps": 3,
            "eval.sequences": 4, "eval.position_buckets": 4, "log.wandb": "false"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "slimpack.train", *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


@pytest.fixture(scope="session")
def sentence_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small tokenized dataset (train and validation) of sentences over a 16-word vocabulary: what
    the trainer's needle sweep needs (the paper protocol grows its haystack a sentence, split on ".",
    at a time)."""
    from slimpack.tokenize.config import TokenizeConfig
    from slimpack.tokenize.job import run_tokenize

    words = ["the", "river", "carries", "stones", "past", "old", "walls", "and", "quiet", "fields", "while",
             "birds", "sing", "over", "green", "hills"]
    root = tmp_path_factory.mktemp("sentences")
    rng = random.Random(0)
    for split, n_docs in (("train", 40), ("validation", 12)):
        path = root / "corpus" / split / "chunk1" / f"example_{split}_0.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        docs = [" ".join(rng.choice(words) + ("." if rng.random() < 0.1 else "") for _ in range(rng.randrange(40, 200)))
                for _ in range(n_docs)]
        path.write_text("".join(json.dumps({"text": t, "meta": {"redpajama_set_name": "Synthetic"}}) + "\n"
                                for t in docs))
    report = run_tokenize([str(root / "corpus")], str(root / "shards"), TokenizeConfig(block_tokens=512),
                          workers=1, progress=False)
    assert report.ok, report.summary()
    return root / "shards"
