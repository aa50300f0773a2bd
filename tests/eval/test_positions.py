"""`slimpack eval positions` on a tiny trained checkpoint against a per-document reference, its
errors for bad input, and the training loop's loss-by-position evaluation."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slimpack.cli import main
from slimpack.train.checkpoint import latest_checkpoint, load_model_state_dict


def _validation_documents(data: Path, min_tokens: int) -> list[np.ndarray]:
    """Validation documents of at least `min_tokens`, in index order, with the plain MDS reader."""
    from slimpack.shards import schema
    from slimpack.shards.mds import MDSDataset

    manifest = json.loads((data / schema.MANIFEST_FILENAME).read_text())
    ds = MDSDataset(data)
    docs = []
    for i, shard in enumerate(ds.shards):
        part = shard.basename.split("/shard.")[0][len("parts/"):]
        if manifest["parts"][part]["split"] != "validation":
            continue
        for k in range(int(ds.shard_starts[i]), int(ds.shard_starts[i + 1])):
            s = ds[k]
            cu = s["cu_seqlens"]
            docs += [s["tokens"][a:b].astype(np.int64) for a, b in itertools.pairwise(cu)
                     if b - a >= min_tokens]
    return docs


def test_loss_by_position_equals_each_document_alone(tiny_run: Path, train_data: Path, tmp_path: Path) -> None:
    from slimpack.model.transformer import ModelConfig, Transformer

    out = tmp_path / "positions"
    assert main(["eval", "positions", str(tiny_run), "--data", str(train_data), "--max-documents", "3",
                 "--per-batch", "2", "--buckets", "4", "--device", "cpu", "--out", str(out)]) == 0
    rec = json.loads((out / "step_00000006.json").read_text())
    assert (out / "step_00000006.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rec["seq_len"] == 64 and rec["split"] == "validation" and rec["tokens"] == 6 * 256
    docs = _validation_documents(train_data, 65)
    assert rec["documents"] == 3 and rec["documents_long_enough"] == len(docs) == 8
    assert rec["count"] == [3] * 64  # every position averages the same documents
    assert [(b["start"], b["end"]) for b in rec["buckets"]] == [(0, 16), (16, 32), (32, 48), (48, 64)]

    weights, meta = load_model_state_dict(latest_checkpoint(tiny_run / "checkpoints"))
    model = Transformer(ModelConfig(**meta["model_config"]), attention_backend="sdpa_ref")
    model.load_state_dict(weights)
    losses = []
    with torch.no_grad():
        for doc in docs[:3]:
            ids = torch.from_numpy(doc[:65])
            logits = model.logits(ids[:-1], torch.arange(64), torch.tensor([0, 64], dtype=torch.int32), 64)
            losses.append(torch.nn.functional.cross_entropy(logits.float(), ids[1:], reduction="none"))
    want = torch.stack(losses).double().mean(0)
    np.testing.assert_allclose(rec["mean_loss"], want.numpy(), rtol=1e-5)
    # The trained model predicts better once it has read some of the document.
    assert rec["buckets"][-1]["loss"] < rec["buckets"][0]["loss"]


def _dense_string_forward(model, ids: torch.Tensor, string) -> torch.Tensor:
    """Logits of one document through the model's own modules with attention from the dense STRING
    reference (every query-key pair rotated by its remapped position, the logit scale and the
    paper's inclusive diagonal; held row by row to the paper code's rules in test_string_attention)."""
    from slimpack.model.string_attention import string_attention_dense

    n, cfg = len(ids), model.cfg
    cu = torch.tensor([0, n], dtype=torch.int32)
    h = model.tok_embeddings(ids)
    for layer in model.layers:
        att = layer.attention
        x = layer.attention_norm(h)
        q = att.wq(x).view(n, att.num_heads, att.head_dim)
        k = att.wk(x).view(n, att.num_kv_heads, att.head_dim)
        v = att.wv(x).view(n, att.num_kv_heads, att.head_dim)
        out = string_attention_dense(q, k, v, cu, string=string, rope_theta=cfg.rope_theta)  # None: plain RoPE
        h = h + att.wo(out.reshape(n, -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h)).float()


def test_string_flags_evaluate_through_remapped_positions(tiny_run: Path, train_data: Path, tmp_path: Path) -> None:
    """`--string-shift S --string-window W` (the paper's scale and diagonal by default; `auto`: S =
    int(R x L)): each document's loss equals a model-level forward whose attention is the dense STRING
    reference. The scale changes every position; with it off, positions below S are untouched."""
    from slimpack.model.string_attention import StringConfig
    from slimpack.model.transformer import ModelConfig, Transformer

    args = ["eval", "positions", str(tiny_run), "--data", str(train_data), "--max-documents", "2",
            "--buckets", "4", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--string-shift", "24", "--string-window", "4", "--out", str(tmp_path / "string")]) == 0
    assert main([*args, "--string-shift", "auto", "--string-ratio", "0.375", "--string-window", "4",
                 "--string-scale", "1", "--string-diagonal", "exclusive", "--out", str(tmp_path / "unscaled")]) == 0
    plain, rec, unscaled = (json.loads((tmp_path / d / "step_00000006.json").read_text())
                            for d in ("plain", "string", "unscaled"))
    assert plain["string"] is None
    assert rec["string"]["shift"] == 24 and rec["string"]["window"] == 4 and rec["string"]["overlap"] is True
    assert unscaled["string"]["shift"] == "auto" and unscaled["string"]["shift_by_length"] == {"64": 24}

    weights, meta = load_model_state_dict(latest_checkpoint(tiny_run / "checkpoints"))
    model = Transformer(ModelConfig(**meta["model_config"]), attention_backend="sdpa_ref")
    model.load_state_dict(weights)
    docs = [torch.from_numpy(d[:65]) for d in _validation_documents(train_data, 65)[:2]]
    for record, string in ((rec, StringConfig(24, 4)), (unscaled, StringConfig(24, 4, scale=1.0, overlap=False)),
                           (plain, None)):
        with torch.no_grad():
            losses = [torch.nn.functional.cross_entropy(_dense_string_forward(model, ids[:-1], string), ids[1:],
                                                        reduction="none") for ids in docs]
        np.testing.assert_allclose(record["mean_loss"], torch.stack(losses).double().mean(0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(unscaled["mean_loss"][:24], plain["mean_loss"][:24], rtol=1e-5)
    assert not np.allclose(unscaled["mean_loss"][24:], plain["mean_loss"][24:], rtol=1e-5)
    assert not np.allclose(rec["mean_loss"][1:24], plain["mean_loss"][1:24], rtol=1e-5)  # the paper's scale


def test_bad_inputs_are_one_line_errors(tiny_run: Path, train_data: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    base = ["eval", "positions", str(tiny_run), "--data", str(train_data), "--out", str(tmp_path), "--device", "cpu"]
    cases = [
        (["--seq-len", "600"], "--seq-len 600 is beyond this model's maximum of 512 positions"),
        (["--split", "test"], "has no 'test' split (it has ['train', 'validation'])"),
        (["--seq-len", "400"], "no document of split 'validation' holds 401 tokens"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    # A checkpoint whose meta.json describes another model than its weights.
    src = latest_checkpoint(tiny_run / "checkpoints")
    other = tmp_path / "checkpoints" / src.name
    other.mkdir(parents=True)
    for path in src.iterdir():
        if path.name != "meta.json":
            (other / path.name).symlink_to(path)
    meta = json.loads((src / "meta.json").read_text())
    meta["model_config"]["hidden_size"] = 128
    (other / "meta.json").write_text(json.dumps(meta))
    assert main(["eval", "positions", str(other), "--data", str(train_data), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "weights do not fit the model its meta.json describes" in err and "Traceback" not in err


def test_training_evaluation_records_loss_by_position(tiny_run: Path) -> None:
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        rec = json.loads((tiny_run / "eval" / "positions" / f"step_{r['step']:08d}.json").read_text())
        assert rec["source"].startswith("training evaluation")
        assert r["val_loss_by_position"] == [b["loss"] for b in rec["buckets"]] and len(rec["buckets"]) == 4
        # Token-weighted over all positions the buckets give back the validation loss.
        total = sum(b["loss"] * b["tokens"] for b in rec["buckets"]) / sum(b["tokens"] for b in rec["buckets"])
        assert total == pytest.approx(r["val_loss"], rel=1e-5)
        assert sum(b["tokens"] for b in rec["buckets"]) == r["val_tokens"]
