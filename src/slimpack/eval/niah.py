"""`slimpack eval niah CHECKPOINT`: needle in a haystack, the paper's effective-context-length probe.

    slimpack eval niah RUN_DIR/checkpoints/step_00010000 --data SHARDS [--lengths 128,256,...]
    slimpack eval niah HF_DIR --haystack essays.txt --string-shift 682 --string-window 128

The protocol of arXiv 2410.18745 (section 3, appendix A.2): for each length L, `samples` prompts of
exactly L tokens, each hiding `needles` (4) six-digit numbers under distinct keys, one at a random
depth inside each of `needles` equal slices of the haystack (one per quarter); the model answers by
greedy decoding, and a sample succeeds when at least `min_retrieved` (2) of its numbers appear in
the answer. A prompt is

    <|begin_of_text|> haystack ... NEEDLE_1 ... haystack ... NEEDLE_4 ... haystack QUESTION

    NEEDLE:   " The special magic number for {key} is: {number}."
    QUESTION: "\\nWhat are the special magic numbers for {k1}, {k2}, {k3} and {k4} mentioned in the
              provided text? The special magic numbers for {k1}, {k2}, {k3} and {k4} mentioned in
              the provided text are:"      (one needle: "What is the special magic number for ... is:")

Needles go in at token boundaries of the haystack (text tokens with document boundaries and special
tokens removed): from the dataset's validation split (`--data`), or any text file (`--haystack`).
Everything random (keys, numbers, depths, haystack windows) comes from a generator seeded by
(seed, length), so a length's samples are the same whatever other lengths run.

The effective length is the longest tested length up to which every length's accuracy is at least
`threshold` (default 0.5; the paper does not state its threshold). Accuracy per needle depth (10
bins) per length is the heatmap (the paper's figure 4). Output: a JSON report and a PNG beside it.
The model is a slimpack checkpoint (our KV-cache decoder, `eval/inference.py`, with optional STRING)
or a Hugging Face Llama directory (transformers `generate`, offline; no STRING), tokenized with
slimpack's Llama 3 tokenizer either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Distinct one-token keys (each " word" is a single Llama 3 token).
KEYS = ("apple", "river", "violin", "tiger", "silver", "garden", "rocket", "pepper", "castle", "forest",
        "candle", "mirror", "dragon", "island", "hammer", "orange", "pencil", "rabbit", "winter", "bridge",
        "copper", "eagle", "lemon", "marble", "ocean", "planet", "shadow", "thunder", "velvet", "wolf")
NEEDLE = " The special magic number for {key} is: {number}."
QUESTION_ONE = ("\nWhat is the special magic number for {keys} mentioned in the provided text? "
                "The special magic number for {keys} mentioned in the provided text is:")
QUESTION_MANY = ("\nWhat are the special magic numbers for {keys} mentioned in the provided text? "
                 "The special magic numbers for {keys} mentioned in the provided text are:")
FIRST_SPECIAL_ID = 128_000  # Llama 3: ids from here on are special tokens, never haystack text


@dataclass(frozen=True)
class NiahConfig:
    lengths: tuple[int, ...]
    samples: int = 500          # prompts per length
    needles: int = 4
    min_retrieved: int = 2      # a sample succeeds when at least this many numbers are in the answer
    digits: int = 6
    threshold: float = 0.5      # a length is effective when this fraction of its samples succeed
    depth_bins: int = 10
    max_new_tokens: int = 0     # 0: enough for the answer (see `answer_tokens`)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) <= 0:
            raise ValueError(f"niah lengths must be positive token counts; got {self.lengths}")
        if not 1 <= self.needles <= len(KEYS):
            raise ValueError(f"niah needles={self.needles}: choose 1..{len(KEYS)}")
        if not 1 <= self.min_retrieved <= self.needles:
            raise ValueError(f"niah min_retrieved={self.min_retrieved} must lie in 1..needles={self.needles}")
        if not 1 <= self.digits <= 12 or self.samples <= 0:
            raise ValueError("niah digits must lie in 1..12 and samples must be positive")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"niah threshold={self.threshold} must lie in (0, 1]")

    @property
    def answer_tokens(self) -> int:
        """Greedy steps: per number its digits (3 a token) plus a space and a separator, and 2 spare."""
        if self.max_new_tokens:
            return self.max_new_tokens
        return self.needles * (-(-self.digits // 3) + 2) + 2


@dataclass
class Sample:
    tokens: np.ndarray          # (length,) int64: the prompt
    keys: list[str]
    numbers: list[str]
    depths: list[float]         # each needle's position in the haystack, 0 (start) .. 1 (end)


def _join_keys(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


def build_samples(haystack: np.ndarray, length: int, cfg: NiahConfig, encode: Callable[[str], list[int]],
                  *, bos_id: int) -> list[Sample]:
    """`cfg.samples` prompts of exactly `length` tokens; deterministic in (cfg.seed, length)."""
    rng = np.random.default_rng([cfg.seed, length])
    out = []
    for _ in range(cfg.samples):
        keys = [KEYS[i] for i in rng.choice(len(KEYS), cfg.needles, replace=False)]
        low = 10 ** (cfg.digits - 1)
        numbers = [str(low + int(n)) for n in rng.choice(9 * low, cfg.needles, replace=False)]
        needles = [encode(NEEDLE.format(key=k, number=n)) for k, n in zip(keys, numbers, strict=True)]
        question = encode((QUESTION_ONE if cfg.needles == 1 else QUESTION_MANY).format(keys=_join_keys(keys)))
        budget = length - 1 - sum(map(len, needles)) - len(question)
        if budget < cfg.needles:
            raise ValueError(f"length {length} is too short for {cfg.needles} needles and the question "
                             f"({length - budget + cfg.needles} tokens at least); drop it from --lengths")
        if len(haystack) < budget:
            raise ValueError(f"the haystack has {len(haystack):,} tokens but length {length} needs "
                             f"{budget:,}; give a longer --haystack file (or more --data), or shorter lengths")
        start = int(rng.integers(0, len(haystack) - budget + 1))
        hay = haystack[start:start + budget]
        # One needle inside each of cfg.needles equal slices of the haystack (the paper's quarters).
        cuts = [int(rng.integers(i * budget // cfg.needles, (i + 1) * budget // cfg.needles))
                for i in range(cfg.needles)]
        pieces: list[Any] = [[bos_id]]
        prev = 0
        for cut, needle in zip(cuts, needles, strict=True):
            pieces += [hay[prev:cut], needle]
            prev = cut
        pieces += [hay[prev:], question]
        tokens = np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces])
        out.append(Sample(tokens, keys, numbers, [c / budget for c in cuts]))
    return out


def retrieved(answer: str, numbers: Sequence[str]) -> list[bool]:
    """Which numbers appear in the answer as whole numbers (not inside a longer run of digits)."""
    return [re.search(rf"(?<!\d){n}(?!\d)", answer) is not None for n in numbers]


def effective_length(accuracy: dict[int, float], threshold: float) -> int:
    """The longest length up to which every tested length reaches `threshold` (0 if the first fails)."""
    best = 0
    for length in sorted(accuracy):
        if accuracy[length] < threshold:
            break
        best = length
    return best


@dataclass
class NiahReport:
    model: str
    config: dict[str, Any]
    string: dict[str, int] | None
    accuracy: dict[int, float] = field(default_factory=dict)          # share of samples that succeed
    mean_retrieved: dict[int, float] = field(default_factory=dict)    # numbers found per sample
    depth_accuracy: dict[int, list[float | None]] = field(default_factory=dict)  # per needle, by depth bin
    examples: dict[int, dict[str, Any]] = field(default_factory=dict)
    effective_length: int = 0
    seconds: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("accuracy", "mean_retrieved", "depth_accuracy", "examples"):
            d[key] = {str(k): v for k, v in d[key].items()}
        return d

    def summary(self) -> str:
        rows = " ".join(f"{length}:{acc:.2f}" for length, acc in sorted(self.accuracy.items()))
        string = (f" with STRING (shift {self.string['shift']}, window {self.string['window']})"
                  if self.string else "")
        c = self.config
        return (f"niah {self.model}{string}: {c['samples']} samples x {len(self.accuracy)} lengths, "
                f"{c['needles']} needles, success = at least {c['min_retrieved']} retrieved\n"
                f"accuracy by length {rows}\n"
                f"effective length {self.effective_length} (accuracy >= {c['threshold']} up to it); "
                f"{self.seconds:.1f} s")


def run_niah(generate: Callable[[np.ndarray, int], np.ndarray], decode: Callable[[Sequence[int]], str],
             encode: Callable[[str], list[int]], haystack: np.ndarray, cfg: NiahConfig, *, bos_id: int,
             eos_ids: Sequence[int] = (), model: str = "", string: dict[str, int] | None = None,
             progress: bool = False) -> NiahReport:
    """Build, answer and score every length's samples. `generate(prompts (B, L), n) -> (B, n)` ids."""
    from tqdm import tqdm

    report = NiahReport(model=model, config=asdict(cfg), string=string)
    t0 = time.perf_counter()
    # Build every length's samples first: a too-short length or haystack fails before any decoding.
    samples = {length: build_samples(haystack, length, cfg, encode, bos_id=bos_id) for length in cfg.lengths}
    for length in tqdm(cfg.lengths, desc="niah lengths", disable=not progress):
        prompts = np.stack([s.tokens for s in samples[length]])
        answers = generate(prompts, cfg.answer_tokens)
        report.prompt_tokens += prompts.size
        report.generated_tokens += answers.size
        hits = np.zeros(cfg.depth_bins)
        seen = np.zeros(cfg.depth_bins)
        found = []
        for i, (sample, ids) in enumerate(zip(samples[length], answers.tolist(), strict=True)):
            stops = [j for j, t in enumerate(ids) if t in eos_ids]
            text = decode(ids[:stops[0]] if stops else ids)
            got = retrieved(text, sample.numbers)
            found.append(sum(got))
            for depth, ok in zip(sample.depths, got, strict=True):
                b = min(int(depth * cfg.depth_bins), cfg.depth_bins - 1)
                seen[b] += 1
                hits[b] += ok
            if i == 0:
                report.examples[length] = {"keys": sample.keys, "numbers": sample.numbers, "answer": text}
        report.accuracy[length] = float(np.mean([n >= cfg.min_retrieved for n in found]))
        report.mean_retrieved[length] = float(np.mean(found))
        report.depth_accuracy[length] = [float(h / s) if s else None for h, s in zip(hits, seen, strict=True)]
    report.effective_length = effective_length(report.accuracy, cfg.threshold)
    report.seconds = time.perf_counter() - t0
    return report


def write_heatmap(report: NiahReport, path: str | Path) -> Path:
    """Length x depth heatmap of needle retrieval (the paper's figure 4): red 0, green 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(report.depth_accuracy)
    grid = np.array([[np.nan if a is None else a for a in report.depth_accuracy[n]] for n in lengths]).T
    bins = grid.shape[0]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(lengths) + 2), 4.5))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=60, fontsize=8)
    ax.set_yticks(range(bins), [f"{100 * (b + 0.5) / bins:.0f}%" for b in range(bins)], fontsize=8)
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("needle depth")
    if report.effective_length:
        ax.axvline(lengths.index(report.effective_length) + 0.5, color="black", linestyle="--", linewidth=1)
    string = f", STRING S={report.string['shift']} W={report.string['window']}" if report.string else ""
    ax.set_title(f"needle retrieval: {report.model}{string}\neffective length {report.effective_length}",
                 fontsize=9)
    fig.colorbar(im, ax=ax, label="needles retrieved")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- haystacks


def _paragraph_break(encode: Callable[[str], list[int]]) -> list[int]:
    return encode("\n\n")


def text_haystack(path: str | Path, encode: Callable[[str], list[int]]) -> np.ndarray:
    """Tokens of a text file (UTF-8; undecodable bytes replaced)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--haystack {path}: no such file; give a UTF-8 text file")
    return np.asarray(encode(path.read_text(encoding="utf-8", errors="replace")), dtype=np.int64)


def dataset_haystack(path: str, encode: Callable[[str], list[int]], *, split: str = "validation",
                     tokens: int, cache_dir: str | None = None) -> np.ndarray:
    """About `tokens` text tokens from a shard dataset's split, documents in index order, special
    tokens (BOS/EOS) dropped and documents separated by a paragraph break. Shards are hash-checked."""
    from slimpack.pipeline.index import load_index
    from slimpack.pipeline.store import ShardStore

    index = load_index(path)
    store = ShardStore(index, cache_dir=cache_dir, cache_limit_bytes=1 << 34, decoded_cache_bytes=1 << 28)
    sep = np.asarray(_paragraph_break(encode), dtype=np.int64)
    parts, total = [], 0
    try:
        for sample_id in index.split_samples(split):
            ids, cu = store.sample(int(sample_id))
            for a, b in itertools.pairwise(cu.tolist()):
                doc = ids[a:b].astype(np.int64)
                doc = doc[doc < FIRST_SPECIAL_ID]
                if len(doc):
                    parts += [doc, sep]
                    total += len(doc) + len(sep)
            if total >= tokens:
                break
    finally:
        store.close()
    if not parts:
        raise ValueError(f"{path}: split {split!r} holds no text tokens to build a haystack from; "
                         f"give --haystack FILE or another --split")
    return np.concatenate(parts)


# ----------------------------------------------------------------------------- models


@dataclass
class Engine:
    """A loaded model: a name, its longest usable prompt, and batched greedy generation."""

    name: str
    max_length: int
    train_length: int | None
    generate: Callable[[np.ndarray, int], np.ndarray]


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def slimpack_engine(model: Any, *, name: str, train_length: int | None, string: Any = None,
                    batch_samples: int = 0, prefill_tokens: int = 65_536) -> Engine:
    """An Engine over a slimpack `Transformer` already on its device (eval mode)."""
    import torch

    from slimpack.eval.inference import greedy_generate

    device = model.tok_embeddings.weight.device

    def generate(prompts: np.ndarray, new: int) -> np.ndarray:
        step = batch_samples or len(prompts)
        outs = []
        for b0 in range(0, len(prompts), step):
            batch = torch.as_tensor(prompts[b0:b0 + step], device=device)
            outs.append(greedy_generate(model, batch, new, string=string, chunk_tokens=prefill_tokens).cpu())
        return torch.cat(outs).numpy()

    return Engine(name, model.cfg.max_seq_len, train_length, generate)


def load_slimpack_model(path: str | Path, *, device: Any, dtype: Any, backend: str = "auto") -> tuple[Any, dict]:
    """A checkpoint directory (or a run directory: its newest checkpoint) as an eval-mode Transformer."""
    import dataclasses

    from slimpack.train.checkpoint import load_model_state_dict, resolve_checkpoint
    from slimpack.train.model import ModelConfig, Transformer

    path = resolve_checkpoint(path)
    state_dict, meta = load_model_state_dict(path)
    cfg = ModelConfig(**meta["model_config"])
    model = Transformer(cfg, attention_backend=backend)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line or "Missing" in line
                      or "Unexpected" in line), str(err).splitlines()[0])
        raise ValueError(f"{path}: the checkpoint's weights do not fit the model its meta.json describes "
                         f"({dataclasses.asdict(cfg)}): {first}; evaluate the checkpoint its run wrote, "
                         f"unedited") from None
    meta["path"] = str(path)
    return model.to(device=device, dtype=dtype).eval(), meta


def hf_engine(path: str | Path, *, device: Any, dtype: Any, batch_samples: int = 0) -> Engine:
    """A Hugging Face Llama directory through transformers' own `generate` (greedy, KV cache)."""
    import torch
    import transformers

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ValueError(f"{path}/config.json has model_type {config.get('model_type')!r}; eval niah reads "
                         f"Llama models (slimpack export-hf output or another LlamaForCausalLM)")
    if config.get("vocab_size", 0) < FIRST_SPECIAL_ID + 256:
        raise ValueError(f"{path}: vocab_size {config.get('vocab_size')} is smaller than Llama 3's 128,256; "
                         f"prompts use slimpack's Llama 3 tokenizer, so the model must share its vocabulary")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model = model.to(device).eval()

    def generate(prompts: np.ndarray, new: int) -> np.ndarray:
        step = batch_samples or len(prompts)
        outs = []
        for b0 in range(0, len(prompts), step):
            ids = torch.as_tensor(prompts[b0:b0 + step], device=device)
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                     min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
            outs.append(out[:, ids.shape[1]:].cpu())
        return torch.cat(outs).numpy()

    return Engine(f"{path.name} (transformers)", int(config.get("max_position_embeddings", 0)) or 1 << 30,
                  None, generate)


def check_lengths(lengths: Sequence[int], engine: Engine, where: str) -> None:
    too_long = [n for n in lengths if n > engine.max_length]
    if too_long:
        raise ValueError(f"length {max(too_long)} exceeds {where}'s maximum of {engine.max_length} tokens "
                         f"(max_seq_len); pass --lengths up to {engine.max_length}")


def default_lengths(max_length: int, step: int = 128) -> tuple[int, ...]:
    return tuple(range(step, max_length + 1, step)) or (max_length,)


# ----------------------------------------------------------------------------- command


def run_command(args: argparse.Namespace) -> int:
    import torch

    from slimpack.tokenize.tokenizer import Llama3Tokenizer

    if (args.data is None) == (args.haystack is None):
        raise ValueError("give exactly one of --data DIR (its validation split) or --haystack FILE")
    string = string_from_args(args)
    device = _device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "fp32": torch.float32,
             "bf16": torch.bfloat16}[args.dtype]
    path = Path(args.checkpoint)
    slimpack_dir = (path / "meta.json").is_file() or (path / "checkpoints").is_dir()  # a run dir has config.json too
    if not slimpack_dir and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is neither a slimpack checkpoint (meta.json), a run directory "
                                f"(checkpoints/) nor a Hugging Face directory (config.json)")
    if not slimpack_dir:
        if string is not None:
            raise ValueError(f"{path} is a Hugging Face directory: STRING runs on slimpack checkpoints only "
                             f"(drop --string-shift, or evaluate the slimpack checkpoint it was exported from)")
        engine = hf_engine(path, device=device, dtype=dtype, batch_samples=args.batch_samples)
    else:
        model, meta = load_slimpack_model(path, device=device, dtype=dtype, backend=args.attention_backend)
        train_length = (meta.get("config") or {}).get("data", {}).get("seq_len")
        engine = slimpack_engine(model, name=f"{Path(meta['path']).parent.parent.name}/{Path(meta['path']).name}",
                                 train_length=train_length, string=string, batch_samples=args.batch_samples)
    if args.lengths:
        lengths = tuple(int(x) for x in args.lengths.split(","))
    else:
        lengths = default_lengths(args.max_length or engine.train_length or engine.max_length, args.length_step)
    check_lengths(lengths, engine, str(path))
    cfg = NiahConfig(lengths=lengths, samples=args.samples, needles=args.needles,
                     min_retrieved=args.min_retrieved, digits=args.digits, threshold=args.threshold,
                     seed=args.seed, max_new_tokens=args.max_new_tokens)
    tok = Llama3Tokenizer()
    encode = tok.encoding.encode_ordinary
    if args.haystack:
        haystack = text_haystack(args.haystack, encode)
    else:
        haystack = dataset_haystack(args.data, encode, split=args.split, tokens=8 * max(lengths))
    report = run_niah(engine.generate, tok.decode, encode, haystack, cfg, bos_id=tok.bos_id,
                      eos_ids=(tok.eos_id,), model=engine.name,
                      string=asdict(string) if string else None, progress=not args.no_progress)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    png = write_heatmap(report, out.with_suffix(".png"))
    print(report.summary())
    print(f"report {out}; heatmap {png}", file=sys.stdout)
    return 0


def add_string_arguments(p: argparse.ArgumentParser) -> None:
    """--string-shift / --string-window, shared with other evaluations (`StringConfig` from them)."""
    p.add_argument("--string-shift", type=int, default=0, metavar="S",
                   help="STRING: use relative distances d >= S as d - S + W (paper: S = training length / 3; "
                        "0 = off)")
    p.add_argument("--string-window", type=int, default=128, metavar="W", help="STRING's local window W (128)")


def string_from_args(args: argparse.Namespace) -> Any:
    """The `StringConfig` that `add_string_arguments`' flags ask for, or None (STRING off)."""
    from slimpack.train.string_attention import StringConfig

    return StringConfig(args.string_shift, args.string_window) if args.string_shift else None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("niah", help="needle in a haystack: accuracy by length and depth, effective length")
    p.add_argument("checkpoint", help="a slimpack checkpoint (step_NNNNNNNN or a run directory: its newest) "
                                      "or a Hugging Face Llama directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="shard dataset whose --split (validation) is the haystack")
    src.add_argument("--haystack", help="a UTF-8 text file as the haystack")
    p.add_argument("--split", default="validation")
    p.add_argument("--lengths", help="comma-separated prompt lengths (default: --length-step steps up to "
                                     "the training length, else the model's maximum)")
    p.add_argument("--length-step", type=int, default=128)
    p.add_argument("--max-length", type=int, default=0)
    p.add_argument("--samples", type=int, default=500, help="prompts per length (500)")
    p.add_argument("--needles", type=int, default=4)
    p.add_argument("--min-retrieved", type=int, default=2, help="numbers a sample must retrieve (2)")
    p.add_argument("--digits", type=int, default=6)
    p.add_argument("--threshold", type=float, default=0.5,
                   help="accuracy that makes a length effective (0.5; the paper does not state one)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="greedy steps (0: enough for the answer)")
    p.add_argument("--seed", type=int, default=0)
    add_string_arguments(p)
    p.add_argument("--batch-samples", type=int, default=0, help="samples decoded together (0: all of a length)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--out", default="niah.json", help="JSON report; the heatmap PNG goes beside it")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_command)


# ----------------------------------------------------------------------------- during training


class TrainingSweep:
    """The trainer's periodic sweep (`eval.niah_every_tokens`): every rank gathers the full weights
    (a collective), rank 0 loads them into a replica and runs a small NIAH sweep on the held-out
    split, writes RUN_DIR/eval/niah/step_NNNNNNNN.json (+ .png) and returns a metrics record."""

    def __init__(self, cfg: Any, model_cfg: Any, device: Any, run_dir: Path, *, is_main: bool) -> None:
        self.cfg, self.model_cfg, self.device, self.is_main = cfg, model_cfg, device, is_main
        self.every = cfg.eval.niah_every_tokens
        self.out = run_dir / "eval" / "niah"
        self.niah = NiahConfig(lengths=default_lengths(cfg.data.seq_len, cfg.eval.niah_length_step),
                               samples=cfg.eval.niah_samples, seed=cfg.seed)
        self._replica: Any = None
        if is_main:  # the haystack and the prompts' lengths are checked now, not after hours of training
            from slimpack.tokenize.tokenizer import Llama3Tokenizer

            self._tok = Llama3Tokenizer()
            self._haystack = dataset_haystack(cfg.eval.path or cfg.data.path, self._tok.encoding.encode_ordinary,
                                              split=cfg.eval.split, tokens=8 * cfg.data.seq_len,
                                              cache_dir=cfg.data.cache_dir)
            for length in (min(self.niah.lengths), max(self.niah.lengths)):
                try:
                    build_samples(self._haystack, length, dataclasses.replace(self.niah, samples=1),
                                  self._tok.encoding.encode_ordinary, bos_id=self._tok.bos_id)
                except ValueError as err:
                    raise ValueError(f"eval.niah_every_tokens: {err} (raise eval.niah_length_step or "
                                     f"data.seq_len, or give eval.path a longer held-out split)") from None

    def due(self, tokens_before: int, tokens_after: int) -> bool:
        return self.every > 0 and tokens_after // self.every > tokens_before // self.every

    def run(self, model: Any, *, step: int, tokens: int) -> dict[str, Any] | None:
        import torch
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from slimpack.storage import write_atomic
        from slimpack.train.export import _strip_wrappers
        from slimpack.train.model import Transformer

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        if self._replica is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self._replica = Transformer(self.model_cfg, attention_backend=self.cfg.model.attention_backend)
            self._replica.to(device=self.device, dtype=dtype).eval()
        self._replica.load_state_dict({_strip_wrappers(k): v for k, v in full.items()})
        engine = slimpack_engine(self._replica, name=f"step {step}", train_length=self.cfg.data.seq_len)
        tok = self._tok
        report = run_niah(engine.generate, tok.decode, tok.encoding.encode_ordinary, self._haystack, self.niah,
                          bos_id=tok.bos_id, eos_ids=(tok.eos_id,), model=f"step {step}")
        record = {"step": step, "tokens": tokens, **report.to_dict()}
        path = self.out / f"step_{step:08d}.json"
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (json.dumps(record, indent=1) + "\n").encode())
        write_heatmap(report, path.with_suffix(".png"))
        return {"kind": "niah", "step": step, "tokens": tokens, "niah_effective_length": report.effective_length,
                "niah_accuracy": {str(k): v for k, v in report.accuracy.items()},
                "niah_seconds": report.seconds,
                **{f"niah_acc_{k}": v for k, v in report.accuracy.items()}}
