"""Shared fixtures: the real-text corpora every test may use.

`shared_data` is real SlimPajama web text (a directory of `*.jsonl.zst` files in SlimPajama's
layout) named by the environment variable SLIMPACK_WEB_TEXT; the repository ships none, so tests
that need it skip, saying how to run them, where it is not set. `demo_corpus` is built from
Python's own text and exists everywhere.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

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
    from slimpack.demo import build_corpus

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
