"""Proof on a real model (issue 11, item 6): the NIAH harness measures retrieval a model really learned.

No mock answers here: a 2-layer slimpack `Transformer` is trained on CPU, from random init, on prompts
built by the harness's own `build_samples` (one needle, one-digit numbers, a fixed repetitive
haystack tokenized by the Meta Llama 3 tokenizer), with the loss on the answer tokens only. Its
checkpoint goes through the real `slimpack eval niah` command. Retrieval is learnable here (attend to
the needle's digit and copy it), so at the trained lengths accuracy must sit far above chance (1 in 9
numbers); far beyond them (1024 and 2048 tokens), at relative distances whose rotary angles
training never saw, it must fall.

Two shortcuts keep a step cheap on a 2-core CPU, neither one touching what is evaluated:
- Only the ~76 token ids the corpus uses train their rows of the embedding and output matrices (the
  other 128K rows keep their random init, as unseen tokens would); the loss is still a softmax over
  all 128,256 ids. The trained rows are written back into the model before it is saved.
- A training step runs the model's own modules on a (prompts, length) batch with one attention call
  per layer: `sdpa_ref` loops over documents, and its backward for 64 prompts costs seconds here.
  Step 0 checks that this equals the model's `forward`; evaluation uses the model as saved (the
  KV-cache decoder), so any mismatch would show as failed retrieval.
Training prompts are `build_samples`' token ids, not `slimpack tokenize` shards of their text: the
builder tokenizes needle and question apart, so re-tokenizing a prompt's text merges the needle's
"." with the question's "\n" into one token and train and eval prompts would differ.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slimpack.cli import main
from slimpack.eval.niah import KEYS, NEEDLE, QUESTION_ONE, NiahConfig, build_samples
from slimpack.model.transformer import ModelConfig, Transformer, apply_rope, rope_cos_sin
from slimpack.train import checkpoint as ckpt

HAYSTACK = ("The quick brown fox jumps over the lazy dog while the river keeps flowing past old stone "
            "walls and quiet fields. ") * 200
TRAIN_LENGTHS = (48, 80)    # prompt lengths drawn uniformly from this range (41 is the shortest possible)
BEYOND = (512, 1024, 2048)  # evaluated far past training
STEPS, PROMPTS_PER_STEP, LR, WARMUP_STEPS = 300, 64, 3e-3, 20
EVAL_SAMPLES = 120  # per length: a standard error of at most 0.046 on an accuracy


def _forward_batched(model: Transformer, local_ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """(B, T) prompts of one length -> (B, T, D) final-normed hidden states, with the model's modules
    and one causal SDPA call per layer; input rows come from `embeddings` indexed by `local_ids`."""
    B, T = local_ids.shape
    cos, sin = rope_cos_sin(torch.arange(T), model.cfg.head_dim, model.cfg.rope_theta)  # (T, 1, Dh)
    h = F.embedding(local_ids, embeddings)  # (B, T, D)
    for layer in model.layers:
        att = layer.attention
        x = layer.attention_norm(h)
        q = apply_rope(att.wq(x).view(B, T, att.num_heads, att.head_dim), cos, sin)  # (B, T, H, Dh)
        k = apply_rope(att.wk(x).view(B, T, att.num_kv_heads, att.head_dim), cos, sin)
        v = att.wv(x).view(B, T, att.num_kv_heads, att.head_dim)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)  # (B, H, T, Dh)
        h = h + att.wo(out.transpose(1, 2).reshape(B, T, -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.norm(h)


def _train(llama3, haystack: np.ndarray) -> Transformer:
    encode = llama3.encoding.encode_ordinary
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=4,
                      max_seq_len=max(BEYOND))
    model = Transformer(cfg, attention_backend="sdpa_ref")
    model.tok_embeddings.weight.requires_grad_(False)
    model.output.weight.requires_grad_(False)
    # Every id a prompt or answer can hold: needles, questions (tokenized apart, as build_samples
    # does), answers and the haystack.
    texts = ([NEEDLE.format(key=k, number=d) for k in KEYS for d in range(10)]
             + [QUESTION_ONE.format(keys=k) for k in KEYS] + [f" {d}." for d in range(10)])
    used = torch.as_tensor(sorted({t for s in texts for t in encode(s)} | set(haystack.tolist())
                                  | {llama3.bos_id}))
    local = torch.full((cfg.vocab_size,), -1, dtype=torch.int64)
    local[used] = torch.arange(len(used))
    embeddings = torch.nn.Parameter(model.tok_embeddings.weight[used].clone())
    head = torch.nn.Parameter(model.output.weight[used].clone())
    params = [p for p in model.parameters() if p.requires_grad] + [embeddings, head]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(0)
    for step in range(STEPS):
        length = int(rng.integers(TRAIN_LENGTHS[0], TRAIN_LENGTHS[1] + 1))
        # Seeds 1.. : `slimpack eval niah` draws its prompts with seed 0, so none is a training prompt.
        niah = NiahConfig(lengths=(length,), protocol="keyed", samples=PROMPTS_PER_STEP, needles=1, digits=1,
                          min_retrieved=1, seed=1 + step)
        samples = build_samples(haystack, length, niah, encode, bos_id=llama3.bos_id)
        # The answer as the needle writes it: " ", the digit, "." (without the full stop the model
        # goes on with more digits, and " 37" does not retrieve 3).
        answers = np.array([encode(f" {s.numbers[0]}.") for s in samples])  # (B, 3)
        # Teacher forcing: the prompt, then every answer token but the last.
        ids = torch.as_tensor(np.concatenate([np.stack([s.tokens for s in samples]), answers[:, :-1]], axis=1))
        hidden = _forward_batched(model, local[ids], embeddings)  # (B, T, D)
        if step == 0:
            with torch.no_grad():
                B, T = ids.shape
                ref = model(ids.reshape(-1), torch.arange(T).repeat(B),
                            torch.arange(0, B * T + 1, T, dtype=torch.int32), T).view(B, T, -1)
            torch.testing.assert_close(hidden, ref)
        rows = hidden[:, length - 1:].reshape(-1, cfg.hidden_size)  # the answer positions only
        logits = (rows @ model.output.weight.T).index_copy(1, used, rows @ head.T)  # (3B, 128256)
        loss = F.cross_entropy(logits, torch.as_tensor(answers).reshape(-1))
        for group in opt.param_groups:
            group["lr"] = LR * min(1.0, (step + 1) / WARMUP_STEPS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        model.tok_embeddings.weight[used] = embeddings
        model.output.weight[used] = head
    return model.eval()


@pytest.mark.slow
def test_a_trained_model_retrieves_inside_its_training_length_and_fails_beyond(llama3, tmp_path):
    torch.set_num_threads(2)
    haystack_file = tmp_path / "haystack.txt"
    haystack_file.write_text(HAYSTACK)
    haystack = np.asarray(llama3.encoding.encode_ordinary(HAYSTACK), dtype=np.int64)
    model = _train(llama3, haystack)
    meta = {"tokens": 0, "model_config": dataclasses.asdict(model.cfg),
            "config": {"data": {"seq_len": TRAIN_LENGTHS[1]}}}
    ckpt.save_checkpoint(tmp_path / "run" / "checkpoints", STEPS, model, torch.optim.AdamW(model.parameters()),
                         meta, keep_last=1)

    lengths = (*TRAIN_LENGTHS, *BEYOND)
    assert main(["eval", "niah", str(tmp_path / "run"), "--protocol", "keyed", "--haystack", str(haystack_file),
                 "--needles", "1", "--digits", "1", "--min-retrieved", "1", "--lengths", ",".join(map(str, lengths)),
                 "--samples", str(EVAL_SAMPLES), "--device", "cpu", "--out", str(tmp_path / "niah"),
                 "--no-progress"]) == 0
    report = json.loads((tmp_path / "niah" / f"step_{STEPS:08d}.json").read_text())
    accuracy = {int(k): v for k, v in report["accuracy"].items()}
    # Chance is 1/9 (numbers 1..9). The trained model depends on the CPU's float kernels: at 60 samples
    # one 2-core box gave 1.0 at 48 and 80, then 0.90 at 512, 0.50 at 1024 and 0.38 at 2048; an AMD
    # EPYC without AVX-512 gave 0.83, 0.80, 0.63, 0.60, 0.47 (at 120 samples 0.74, 0.84, 0.66, 0.55,
    # 0.47: falls of 4.6 and 6.1 standard errors at 1024 and 2048). Either way retrieval holds a while
    # past training and then decays, so the test asks for that, in standard errors, not fixed gaps.
    trained = sum(accuracy[n] for n in TRAIN_LENGTHS) / len(TRAIN_LENGTHS)
    assert trained >= 0.6, accuracy

    def fall_in_standard_errors(length: int) -> float:
        far = accuracy[length]
        se = math.sqrt(trained * (1 - trained) / (EVAL_SAMPLES * len(TRAIN_LENGTHS))
                       + far * (1 - far) / EVAL_SAMPLES)
        return (trained - far) / max(se, 1e-9)

    assert fall_in_standard_errors(1024) >= 2 and fall_in_standard_errors(2048) >= 3, accuracy
