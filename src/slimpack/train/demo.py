"""The demo's training step: the real trainer on CPU on the demo shards, pre-empted, resumed, exported.

Runs `slimpack.train.loop.train` (FSDP2 over a one-process gloo group) on the "small" model with
256-token windows: half the steps, then a SIGTERM (what Slurm sends before a time limit: the trainer
saves a checkpoint and returns), then `--resume auto` for the rest, then `export-hf` and, where
transformers is installed, a check that Hugging Face's logits equal ours and that its tokenizer and
text generation run on the export. Small batches (512 tokens a
step) because every step pays for the 128,256-token vocabulary on two CPU cores.

The simulated pre-emption is the trainer's own SIGTERM (`debug_sigterm_after_step`); a SIGTERM or
Ctrl-C from outside stops the demo (DemoStopped) after the trainer has saved.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

DEMO_STEPS = 24


class DemoStopped(Exception):
    """A user's SIGTERM or Ctrl-C stopped a training leg (it saved a checkpoint first)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


def demo_overrides(shards: Path, run_dir: Path) -> list[str]:
    return [f'run_dir="{run_dir}"', f'data.path="{shards}"', f"max_steps={DEMO_STEPS}",
            "data.seq_len=256", "data.global_batch_tokens=512", "data.micro_batch_size=2",
            "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=3",
            f"checkpoint.every_steps={DEMO_STEPS // 3}", "checkpoint.keep_last=2",
            f"eval.every_steps={DEMO_STEPS // 2}", "eval.sequences=8", "log.every_steps=4"]


def _train(overrides: list[str]) -> Any:
    import torch.distributed as dist

    from slimpack.train.config import load_train_config
    from slimpack.train.loop import train

    configs = Path(__file__).resolve().parents[3] / "configs" / "train" / "debug-cpu.toml"
    # The installed package may lack configs/: the overrides alone then define the run.
    cfg = load_train_config(configs if configs.exists() else None,
                            ["device=cpu", "model.preset=small", "model.attention_backend=sdpa_ref",
                             "parallel.mixed_precision=false", "log.wandb=false", *overrides])
    try:
        report = train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print(report.summary(), flush=True)
    if report.stopped_by_signal and not report.stop_simulated:
        raise DemoStopped(report.stop_signal)
    return report


def step_train(ctx: dict[str, Any]) -> None:
    run_dir = ctx["out"] / "train"
    if run_dir.exists():  # the demo's own run from an earlier `slimpack demo --out` into this directory:
        shutil.rmtree(run_dir)  # the first leg starts fresh (resume=none refuses existing checkpoints)
    overrides = demo_overrides(ctx["shards"], run_dir)
    print(f"-- train {DEMO_STEPS // 2} of {DEMO_STEPS} steps, then SIGTERM (pre-emption)", flush=True)
    first = _train([*overrides, "checkpoint.resume=none", f"debug_sigterm_after_step={DEMO_STEPS // 2}"])
    if not first.stopped_by_signal:
        raise RuntimeError("the trainer did not stop on SIGTERM")
    print("-- resume from the newest checkpoint", flush=True)
    second = _train([*overrides, "checkpoint.resume=auto"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    if [r["step"] for r in records if r["kind"] == "train"] != list(range(1, DEMO_STEPS + 1)):
        raise RuntimeError(f"metrics hold steps {[r['step'] for r in records if r['kind'] == 'train']}")
    head, tail = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"loss: first 3 steps {head:.3f}, last 3 steps {tail:.3f} (uniform over 128,256 tokens: 11.762); "
          f"val loss {second.val_loss:.3f}", flush=True)
    if not tail < head - 1.0:
        raise RuntimeError(f"the loss did not fall: {losses}")

    from slimpack.cli import main as slimpack_main

    hf_dir = ctx["out"] / "hf"
    if slimpack_main(["export-hf", str(run_dir), str(hf_dir)]) != 0:
        raise RuntimeError("export-hf failed")
    _compare_with_transformers(run_dir, hf_dir)


def _compare_with_transformers(run_dir: Path, hf_dir: Path) -> None:
    try:
        import transformers
        from transformers import LlamaForCausalLM
    except ImportError:
        print("transformers is not installed: skipping the logits comparison of the export")
        return
    import torch

    if not sys.stderr.isatty():  # its weight-loading bar, like ours, only on a terminal
        transformers.utils.logging.disable_progress_bar()

    from slimpack.model.checkpoint_files import latest_checkpoint, load_model_state_dict
    from slimpack.model.transformer import ModelConfig, Transformer

    weights, meta = load_model_state_dict(latest_checkpoint(run_dir / "checkpoints"))
    ours = Transformer(ModelConfig(**meta["model_config"]), attention_backend="sdpa_ref")
    ours.load_state_dict(weights)
    hf = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (64,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours.logits(ids, torch.arange(64), torch.tensor([0, 64], dtype=torch.int32), 64)
        b = hf(input_ids=ids[None]).logits[0]
    err = (a - b).abs().max().item()
    print(f"transformers LlamaForCausalLM loads {hf_dir}: max |logit difference| vs ours {err:.2e}")
    if err > 1e-4:
        raise RuntimeError(f"exported model disagrees with ours by {err}")

    from transformers import AutoTokenizer

    from slimpack.tokenize.tokenizer import Llama3Tokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prompt = "def add(a, b):"
    ids = tokenizer(prompt, return_tensors="pt")
    if ids["input_ids"][0].tolist() != Llama3Tokenizer().encode_document(prompt).tolist()[:-1]:
        raise RuntimeError(f"the exported tokenizer's ids for {prompt!r} differ from slimpack's")
    with torch.no_grad():
        out = hf.generate(**ids, max_new_tokens=16)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    print(f"AutoTokenizer loads {hf_dir} (same ids as slimpack); greedy generation: {text!r}")
