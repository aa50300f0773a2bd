"""Schedule endpoints and warm-up, decay groups, gradient accumulation, the shipped presets."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from slimpack.model.transformer import Transformer, model_config
from slimpack.train.config import OptimSection, TrainConfig, load_train_config
from slimpack.train.optim import build_optimizer, lr_at, param_groups

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "train"
PAPER = {"lr": 4e-4, "min_lr": 4e-5, "warmup_steps": 2000, "max_steps": 238_418}


def test_warmup_is_linear_and_reaches_peak_on_its_last_step():
    assert lr_at(0, **PAPER) == pytest.approx(4e-4 / 2000)
    assert lr_at(999, **PAPER) == pytest.approx(4e-4 * 1000 / 2000)
    assert lr_at(1999, **PAPER) == pytest.approx(4e-4)
    diffs = [lr_at(s + 1, **PAPER) - lr_at(s, **PAPER) for s in range(0, 1999)]
    assert max(diffs) == pytest.approx(min(diffs)) == pytest.approx(4e-4 / 2000)


def test_cosine_starts_at_peak_ends_at_min_and_stays_there():
    assert lr_at(2000, **PAPER) == pytest.approx(4e-4)
    mid = 2000 + (238_418 - 2000) // 2
    assert lr_at(mid, **PAPER) == pytest.approx((4e-4 + 4e-5) / 2, rel=1e-4)
    assert lr_at(238_418, **PAPER) == pytest.approx(4e-5)
    assert lr_at(300_000, **PAPER) == pytest.approx(4e-5)
    values = [lr_at(s, **PAPER) for s in range(2000, 238_419, 997)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert lr_at(2001, **PAPER) < 4e-4


def test_no_warmup():
    assert lr_at(0, lr=1.0, min_lr=0.1, warmup_steps=0, max_steps=10) == 1.0
    assert lr_at(10, lr=1.0, min_lr=0.1, warmup_steps=0, max_steps=10) == pytest.approx(0.1)
    half = lr_at(5, lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=10)
    assert half == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_decay_groups_exclude_norms_and_embedding_by_default():
    model = Transformer(model_config("tiny"))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, OptimSection())
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "tok_embeddings.weight" in no_decay_names and "norm.weight" in no_decay_names
    assert all("norm" in n or "tok_embeddings" in n for n in no_decay_names)
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "output.weight" in decay_names and "layers.0.attention.wq.weight" in decay_names
    assert len(decay_names) + len(no_decay_names) == len(names)
    everything = param_groups(model, OptimSection(decay_norms=True, decay_embeddings=True))
    assert len(everything[0]["params"]) == len(names) and not everything[1]["params"]


def test_optimizer_hyperparameters():
    model = Transformer(model_config("tiny"))
    opt = build_optimizer(model, OptimSection(), torch.device("cpu"))
    g = opt.param_groups[0]
    assert g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 and g["weight_decay"] == 0.1


def test_grad_accum_is_derived_and_refuses_what_does_not_divide():
    cfg = TrainConfig()
    assert cfg.grad_accum(16) == 4_194_304 // (16 * 4 * 2048)
    with pytest.raises(ValueError, match="not divisible"):
        cfg.grad_accum(3)


def test_paper_presets_keep_16k_token_micro_batches_and_gather_once_per_step():
    two = load_train_config(CONFIGS / "paper-2k.toml")
    four = load_train_config(CONFIGS / "paper-4k.toml")
    for cfg, seq in ((two, 2048), (four, 4096)):
        assert cfg.data.seq_len == seq and cfg.data.global_batch_tokens == 4_194_304
        assert cfg.total_tokens == 10**12 and cfg.steps == 238_418
        assert cfg.optim.lr == 4e-4 and cfg.optim.min_lr == 4e-5 and cfg.optim.warmup_steps == 2000
        assert cfg.model.preset == "tinyllama-1.3b"
        # 16,384-token micro-batches (8 x 2K, 4 x 4K: both fit 80 GB without activation
        # checkpointing), FSDP2 communicating once per optimiser step.
        assert cfg.data.micro_batch_size * seq == 16_384 and not cfg.parallel.activation_checkpointing
        assert cfg.parallel.reshard == "step" and cfg.parallel.compile
    for gpus in (8, 16, 32):
        assert four.grad_accum(gpus) == two.grad_accum(gpus)
    assert two.grad_accum(16) == 16


def test_debug_cpu_preset_and_overrides():
    cfg = load_train_config(CONFIGS / "debug-cpu.toml", ["optim.lr=1e-3", "data.seq_len=128"])
    assert cfg.device == "cpu" and not cfg.parallel.mixed_precision
    assert cfg.optim.lr == 1e-3 and cfg.data.seq_len == 128 and cfg.data.micro_batch_size == 1
    # The README's command takes no --set: the config reads what `slimpack demo` writes by default,
    # keeps the real vocabulary, and still accumulates gradients over micro-steps.
    from slimpack.cli import build_parser

    shipped = load_train_config(CONFIGS / "debug-cpu.toml")
    demo_out = build_parser().parse_args(["demo"]).out
    assert Path(shipped.data.path) == Path(demo_out) / "shards"
    assert model_config(shipped.model.preset).vocab_size == 128_256 and shipped.grad_accum(1) == 2
    with pytest.raises(ValueError, match="unknown key"):
        load_train_config(CONFIGS / "debug-cpu.toml", ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="min_lr"):
        load_train_config(None, ["optim.min_lr=1.0"])


def test_misspelt_device_or_optimizer_implementation_is_refused_not_silently_replaced():
    # init_distributed treats anything but "cuda"/"auto" as CPU, build_optimizer anything but
    # "fused"/"foreach" as the slow for-loop AdamW: a typo must fail, not train on the wrong path.
    for key, bad, hint in (("device", "gpu", "auto, cuda or cpu"), ("device", "cuda:0", "auto, cuda or cpu"),
                           ("optim.implementation", "fuse", "auto, fused, foreach"),
                           ("parallel.reshard", "after_forward", "step, backward, forward")):
        with pytest.raises(ValueError, match=hint):
            load_train_config(None, [f"{key}={bad!r}".replace("'", '"')])


def test_slurm_script_gives_ranks_time_to_save_after_sigterm():
    # Slurm sends SIGTERM --signal's lead time before the limit; the pre-emption save of a 1.3B model
    # must fit in it. srun starts the ranks itself: torchrun would SIGKILL them
    # TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30 s) after forwarding SIGTERM and turn their 75 into 1.
    import re

    script = (CONFIGS / "slurm_multinode.sh").read_text()
    lead_s = int(re.search(r"^#SBATCH --signal=TERM@(\d+)$", script, re.M).group(1))
    assert lead_s >= 120
    assert not re.search(r"^[^#]*\btorchrun\b", script, re.M)


def test_non_positive_global_batch_tokens_is_a_clear_config_error():
    # 0 passed the divisibility check and then divided total_tokens by zero (a bare
    # ZeroDivisionError traceback from `slimpack train`); a negative one blamed max_steps.
    for bad in (0, -8192):
        with pytest.raises(ValueError, match=r"global_batch_tokens=-?\d+ must be positive"):
            load_train_config(None, [f"data.global_batch_tokens={bad}"])


def test_grad_clip_norm_zero_is_refused_since_it_would_zero_every_gradient():
    # Many trainers read 0 as "no clipping"; clip_grad_norm_(max_norm=0) instead multiplies every
    # gradient by 0, and the run would train nothing without a word.
    model = Transformer(model_config("tiny"))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.0)
    assert all(not p.grad.any() for p in model.parameters())
    for bad in ("0", "-1.0"):
        with pytest.raises(ValueError, match=r"grad_clip_norm=\S+ must be positive"):
            load_train_config(None, [f"optim.grad_clip_norm={bad}"])
