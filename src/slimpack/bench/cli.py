"""`slimpack bench ...`: the benchmarks' command lines.

Every benchmark's flags are defined here and its module is imported only when that benchmark runs
(`_runner`), so `slimpack bench --help` and each benchmark's `--help` import nothing heavy and work
in the core install, without torch; a benchmark that needs a missing extra fails in one line
(`slimpack.extras`).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable


def _runner(name: str) -> Callable[[argparse.Namespace], int]:
    """The handler of `slimpack bench NAME`: imports `slimpack.bench.NAME` and calls its `main`."""

    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(f"slimpack.bench.{name}").main(args)

    return run


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (figures for BENCHMARKS.md)")
    bench_sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    for add in (_add_tokenize, _add_validate, _add_loader, _add_model, _add_train, _add_ledger, _add_niah,
                _add_checkpoint, _add_durable):
        add(bench_sub)


def _add_tokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenize", help="end-to-end tokenize vs raw tiktoken, 1 and 2 processes")
    p.add_argument("input", nargs="?", help="directory of *.jsonl[.zst|.gz] files (default: the demo corpus)")
    p.add_argument("--repeat", type=int, default=16, help="copies of the input to process")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--pathological-only", action="store_true",
                   help="only time the 1 MB / 2 MB single-character and all-space inputs")
    p.set_defaults(func=_runner("tokenize"))


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="shards validate throughput (MB/s per process) vs decompress-only")
    p.add_argument("input", nargs="?", help="directory of *.jsonl[.zst|.gz] files (default: the demo corpus)")
    p.add_argument("--repeat", type=int, default=26, help="distinct copies of each input (default 26)")
    p.add_argument("--block-tokens", type=int, default=65_536,
                   help="tokens per sample of the built dataset (default 65,536, the shard default)")
    p.add_argument("--runs", type=int, default=5, help="timed runs; the best is reported")
    p.add_argument("--json", help="write the figures here")
    p.set_defaults(func=_runner("validate"))


def _add_loader(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loader", help="packed loader: throughput, 627B-token index scale, training-loop wait")
    p.add_argument("--data", help="a merged dataset (default: the demo corpus, tokenized)")
    p.add_argument("--min-tokens", type=int, default=200_000_000, help="tokens packed for throughput")
    p.add_argument("--sim-steps", type=int, default=24, help="steps of the training-loop simulation")
    p.add_argument("--skip", action="append", default=[], choices=["throughput", "scale", "train"])
    p.add_argument("--json", help="write the figures here")
    p.set_defaults(func=_runner("loader"))


def _add_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="GPU: chunked loss, attention backends, 1.3B step vs HF")
    p.add_argument("--preset", default="tinyllama-1.3b")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--mean-doc-tokens", type=int, default=700, help="mean synthetic document length")
    p.add_argument("--chunk-tokens", type=int, default=2048)
    p.add_argument("--only", choices=("loss", "attention", "step"), action="append",
                   help="run only these parts (repeatable)")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline of the step")
    p.add_argument("--compile", action="store_true",
                   help="step: torch.compile each decoder layer of both models")
    p.add_argument("--json", help="write the figures here")
    p.set_defaults(func=_runner("model"))


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="training throughput per GPU (ours vs Hugging Face; torchrun for "
                                     "several GPUs) and GPU correctness checks")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, a few steps")
    p.add_argument("--data", choices=("demo", "synthetic"), default=None,
                   help="packed batches from the demo corpus through the real loader (GPU default) or "
                        "synthetic documents (--quick default)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps (compile happens here)")
    p.add_argument("--timed-steps", type=int, default=None, help="timed optimiser steps per configuration")
    p.add_argument("--grad-accum", type=int, default=None,
                   help="micro-batches per optimiser step (default: --tokens-per-gpu-step worth)")
    p.add_argument("--tokens-per-gpu-step", type=int, default=4_194_304 // 16,
                   help="tokens per GPU per optimiser step when --grad-accum is not given (default 262144: "
                        "the paper's 4M-token batch over 16 GPUs)")
    p.add_argument("--reshard", choices=("step", "backward", "forward"), default="step",
                   help="FSDP2 gather/reduce cadence (parallel.reshard), the same for both models")
    p.add_argument("--profile", metavar="DIR",
                   help="after timing, profile one 2-micro-batch step per configuration: Chrome trace "
                        "and kernel table in DIR, GPU time per kernel family in the JSON")
    p.add_argument("--num-workers", type=int, default=4,
                   help="loader worker processes for the demo data (the paper configs use 4)")
    p.add_argument("--attention", default="auto", help="our model's attention backend (train.attention)")
    p.add_argument("--no-checks", action="store_true", help="skip the correctness checks (scaling runs)")
    p.add_argument("--only", help="comma-separated configuration names to run")
    p.add_argument("--time-budget-s", type=float, default=330,
                   help="start no configuration after this many seconds (default 330: the whole run then "
                        "ends within ~7 minutes; checks and six compiled configurations took 213 s on an H200)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak per GPU for MFU (default: by the GPU's name, train.metrics."
                        "PEAK_BF16_TFLOPS, e.g. 989 for H100/H200 SXM; MFU null for a GPU not listed)")
    p.set_defaults(func=_runner("train"))


def _add_ledger(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ledger", help="host time of the position-frequency ledger per step (CPU)")
    p.add_argument("--seq-len", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--global-batch-tokens", type=int, default=4_194_304)
    p.add_argument("--micro-batch-size", type=int, default=8, help="windows per micro-batch (default 8)")
    p.add_argument("--repeats", type=int, default=5, help="best of N (default 5)")
    p.add_argument("--json", help="write the figures here")
    p.set_defaults(func=_runner("ledger"))


def _add_niah(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("niah", help="GPU: needle sweep throughput vs HF generate, STRING's cost, checks")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, 2 lengths, 4 samples")
    p.add_argument("--preset", default="tinyllama-1.3b")
    p.add_argument("--lengths", help="comma-separated (default: 256..2048 by 128; 128 leaves no prompt room)")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--hf-samples", type=int, default=25, help="samples per length for the HF baseline")
    p.add_argument("--string-samples", type=int, default=100, help="samples per length for STRING's cost")
    p.add_argument("--protocol", choices=("paper", "keyed"), default="paper")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: the protocol's (paper 128; --quick 16)")
    p.add_argument("--string-shift", type=int, default=0, help="default 0: auto, int(ratio x each prompt budget)")
    p.add_argument("--string-ratio", type=float, default=0.5)
    p.add_argument("--string-window", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=131_072, help="tokens per prefill chunk")
    p.add_argument("--json", help="write the figures here")
    p.set_defaults(func=_runner("niah"))


def _add_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="checkpoint stall (sync vs async), checksum cost and GC pauses "
                                          "of the trainer (torchrun for several GPUs)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model")
    p.add_argument("--dir", help="where the checkpoints are written (default: a temporary directory)")
    p.add_argument("--repeats", type=int, default=3, help="saves of each kind (default 3)")
    p.set_defaults(func=_runner("checkpoint"))


def _add_durable(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("durable", help="cost of durable writes (fsync) on tokenize, merge and checkpoint")
    p.add_argument("--input", help="tokenize input directory (default: the demo corpus, built here)")
    p.add_argument("--dir", default=".", help="where to write: the disk measured (default: here)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each setting; medians (default 3)")
    p.add_argument("--json", help="write the figures here")
    p.set_defaults(func=_runner("durable"))
