"""The `slimpack` command as a whole."""

import contextlib
import subprocess
import sys


def test_the_cli_starts_without_importing_torch():
    # CPU tokenization nodes run `slimpack tokenize` many times; torch costs a second each.
    code = "import sys, slimpack.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# Run in a fresh interpreter where the extras' packages cannot be imported: Python treats a None in
# sys.modules exactly as a package that is not installed (ModuleNotFoundError). CI proves the same
# in a real venv of `pip install .` alone (.ci/core-profile).
_CORE_ONLY = '''
import json, sys
for name in ("torch", "safetensors", "wandb", "transformers", "pyarrow", "datasets", "s3fs", "matplotlib"):
    sys.modules[name] = None

from slimpack.cli import main


def run(*argv):
    return main(list(argv))


if __name__ == "__main__":  # tokenize's spawned workers import this file
    corpus, shards = sys.argv[1:3]
    got = {
        "tokenize": run("tokenize", corpus, "--out", shards, "--block-tokens", "2048"),
        "validate": run("shards", "validate", shards, "--workers", "1", "--retokenize", "5"),
        "stats": run("shards", "stats", shards, "--workers", "1", "--seq-len", "512"),
        "inspect": run("shards", "inspect", shards, "--sample", "0", "--max-chars", "40"),
        "digest": run("pipeline", "digest", shards, "--seq-len", "512", "--global-batch-tokens", "4096",
                      "--steps", "2", "--world-size", "2"),
        "digest_no_dataset": run("pipeline", "digest", corpus, "--steps", "1"),
        "plots": run("shards", "stats", shards, "--plots", shards + "/plots"),
        "train": run("train", "--config", "none.toml"),
        "parquet": run("tokenize", corpus + "/../parquet", "--out", shards + "-pq"),
        "s3": run("tokenize", corpus, "--out", "s3://bucket/out"),
    }
    from slimpack.pipeline import LoaderConfig, PackedLoader
    from slimpack.extras import MissingExtraError

    loader = PackedLoader(LoaderConfig(shards, seq_len=512, global_batch_tokens=4096, micro_batch_size=4))
    mb = next(iter(loader))[0]
    got["batch"] = {k: [type(v).__module__, str(getattr(v, "dtype", ""))] for k, v in mb.items()}
    import numpy as np

    np.savez(shards + "/batch.npz", **mb)
    try:
        PackedLoader(LoaderConfig(shards, seq_len=512, global_batch_tokens=4096, micro_batch_size=4,
                                  num_workers=1))
    except MissingExtraError as err:
        got["workers"] = str(err)
    got["torch_imported"] = sys.modules["torch"] is not None
    print(json.dumps(got))
'''


def test_cpu_tools_run_without_the_extras(tmp_path):
    import itertools
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from slimpack.demo.corpus import iter_corpus

    corpus = tmp_path / "corpus"
    docs = list(itertools.islice(iter_corpus(), 120))
    for name, chunk in (("train/a.jsonl", docs[:50]), ("train/b.jsonl", docs[50:100]),
                        ("validation/c.jsonl", docs[100:])):
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        (corpus / name).write_text("".join(json.dumps({"text": text, "meta": {"redpajama_set_name": source}}) + "\n"
                                           for _, source, text in chunk))
    (tmp_path / "parquet").mkdir()
    pq.write_table(pa.table({"text": ["a parquet document"]}), tmp_path / "parquet" / "x.parquet")
    script = tmp_path / "core_only.py"
    script.write_text(_CORE_ONLY)
    proc = subprocess.run([sys.executable, str(script), str(corpus), str(tmp_path / "shards")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert not got["torch_imported"]
    # The CPU tools work, with their usual exit statuses ...
    assert [got[k] for k in ("tokenize", "validate", "stats", "inspect", "digest")] == [0, 0, 0, 0, 0]
    assert got["digest_no_dataset"] == 3  # exitcodes.UNUSABLE: a directory that is no dataset
    assert "OK: no findings" in proc.stdout and "5 documents re-tokenized" in proc.stdout
    # ... the loader packs numpy batches, and each extra that is missing is one line naming it.
    assert got["batch"] == {"input_ids": ["numpy", "int64"], "labels": ["numpy", "int64"],
                            "position_ids": ["numpy", "int64"], "cu_seqlens": ["numpy", "int32"],
                            "max_seqlen": ["builtins", ""]}
    # The same values as the torch tensors of the full install.
    from slimpack.pipeline import LoaderConfig, PackedLoader

    want = next(iter(PackedLoader(LoaderConfig(str(tmp_path / "shards"), seq_len=512, global_batch_tokens=4096,
                                               micro_batch_size=4))))[0]
    with np.load(tmp_path / "shards" / "batch.npz") as numpy_batch:
        assert set(numpy_batch) == set(want)
        assert all(np.array_equal(numpy_batch[k], np.asarray(want[k])) for k in want)
    assert got["workers"] == "needs torch: pip install 'slimpack[train]'"
    assert [got[k] for k in ("plots", "train", "parquet", "s3")] == [2, 2, 2, 2]
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert errors == [
        "slimpack pipeline digest: error: " + f"{tmp_path / 'corpus'}/slimpack.json: missing; point at a merged "
        "slimpack dataset (`slimpack tokenize ... --out DIR` writes one)",
        "slimpack shards stats: error: needs matplotlib: pip install 'slimpack[plots]'",
        "slimpack train: error: needs torch: pip install 'slimpack[train]'",
        "slimpack tokenize: error: needs pyarrow: pip install 'slimpack[parquet]'",
        "slimpack tokenize: error: needs s3fs: pip install 'slimpack[s3]'",
    ]
    # stderr is a pipe here, as in a batch job's log file: no progress bar is drawn into it.
    assert "%|" not in proc.stderr and "\r" not in proc.stderr


def test_tokenize_draws_its_progress_bar_on_a_terminal_only(tmp_path):
    import fcntl
    import json
    import os
    import pty
    import struct
    import termios
    import threading
    from pathlib import Path

    corpus = tmp_path / "corpus" / "train"
    corpus.mkdir(parents=True)
    (corpus / "a.jsonl").write_text(json.dumps({"text": "A line of text. " * 500}) + "\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}

    def tokenize(out: str, stderr: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "slimpack", "tokenize", str(corpus.parent), "--out",
                               str(tmp_path / out)], stdout=subprocess.PIPE, stderr=stderr, env=env, timeout=120)

    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal's size
    drawn: list[bytes] = []

    def read() -> None:  # keep the terminal drained; EIO once the child and we closed it
        with contextlib.suppress(OSError):
            while data := os.read(master, 4096):
                drawn.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert tokenize("on-a-terminal", terminal).returncode == 0
    os.close(terminal)
    reader.join(10)
    os.close(master)
    assert b"tokenize: 100%" in b"".join(drawn)
    piped = tokenize("into-a-file", subprocess.PIPE)
    assert piped.returncode == 0 and b"%|" not in piped.stderr
