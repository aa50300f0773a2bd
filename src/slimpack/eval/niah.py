"""Needle in a haystack, the paper's effective-context-length probe: prompts, scoring, the report.

No torch here: a model reaches this module as a `generate(prompts, max_new_tokens, string)` callable
(`eval/engines.py`), and the command lives in `eval/niah_cli.py`.

Two protocols, each seeded and reproducible:

`paper` (the default): the 4-needle test of the paper's public code (HKUNLP/STRING,
`niah/test_niah_llama.py`), re-implemented rule for rule; docs/effective-context.md lists each rule
and every known difference:

    <|begin_of_text|>TASK haystack-sentences ". " NEEDLE ... ". \\n" QUESTION

    TASK     "There is an important info hidden inside a lot of irrelevant text. Find it and memorize
              them. I will quiz you about the important information there.\\n"
    NEEDLE   " One of the magic number is: {n}. "   (4 keyless needles; n = randint(100000, 1000000),
              drawn once per run, so every sample and length hides the same numbers)
    QUESTION "\\n\\nWhat are the magic numbers mentioned in the provided text?\\nThe numbers are"

  The haystack text is split on "." and grown one sentence at a time (50 above 64,000 tokens); the
  prompt is the first one whose token count, the task counted apart and each count with its BOS,
  exceeds L - max_new_tokens (128): a "length L" prompt has about L - 128 tokens and leaves room for
  the answer. Needle j goes in before sentence int(depth_j * sentences), depth_j = j 0.99/4 +
  U(0, 0.99/4) drawn per sample. Greedy decoding of up to 128 tokens; a needle counts when its
  number is a substring of the lower-cased answer (whitespace runs joined); a sample succeeds with
  at least 2 of 4. Randomness is Python's `random.Random(seed)` (seed 42, as the script's
  `random.seed(42)`), restarted per length as the script is run once per length, drawing in the
  script's order: the same needles and depths as the paper's runs.

`keyed`: slimpack's own variant (kept for comparison with earlier reports). Needles carry distinct
keys (" The special magic number for {key} is: {number}."), the numbers and a random haystack
window are fresh per sample, prompts are exactly L tokens at token boundaries, and a number counts
only as a whole number. Fresh numbers and windows per sample make samples independent, so its
accuracy has the binomial error the sample count suggests; the paper's fixed numbers and fixed
haystack start make its 500 samples of a length differ only in needle depths.

The effective length is the longest tested length up to which every length's accuracy is at least
`threshold` (default 0.5; the paper does not state its threshold). Accuracy per needle depth (10
bins) per length is the heatmap (the paper's figure 4).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from slimpack.pipeline.index import load_index
from slimpack.pipeline.store import ShardStore

PROTOCOLS = ("paper", "keyed")

# The paper's script, verbatim.
PAPER_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
              "I will quiz you about the important information there.\n")
PAPER_NEEDLE = " One of the magic number is: {number}. "
PAPER_QUESTION = "\n\nWhat are the magic numbers mentioned in the provided text?\nThe numbers are"
PAPER_SEED = 42
PAPER_MAX_NEW_TOKENS = 128
PAPER_LONG_CONTEXT = 64_000  # above this budget the script grows the haystack 50 sentences at a time

# slimpack's keyed variant. Distinct one-token keys (each " word" is a single Llama 3 token).
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
    protocol: str = "paper"
    samples: int = 500          # prompts per length
    needles: int = 4
    min_retrieved: int = 2      # a sample succeeds when at least this many numbers are in the answer
    digits: int = 6             # keyed only: the paper draws randint(100000, 1000000)
    threshold: float = 0.5      # a length is effective when this fraction of its samples succeed
    depth_bins: int = 10
    max_new_tokens: int = 0     # 0: 128 for paper (also its prompt reserve), enough for the answer for keyed
    seed: int | None = None     # None: 42 for paper (the script's), 0 for keyed

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"niah protocol {self.protocol!r}: choose one of {', '.join(PROTOCOLS)}")
        if not self.lengths or min(self.lengths) <= 0:
            raise ValueError(f"niah lengths must be positive token counts; got {self.lengths}")
        if not 1 <= self.needles <= len(KEYS):
            raise ValueError(f"niah needles={self.needles}: choose 1..{len(KEYS)}")
        if not 1 <= self.min_retrieved <= self.needles:
            raise ValueError(f"niah min_retrieved={self.min_retrieved} must lie in 1..needles={self.needles}")
        if not 1 <= self.digits <= 12 or self.samples <= 0 or self.max_new_tokens < 0:
            raise ValueError("niah digits must lie in 1..12, samples must be positive and max_new_tokens >= 0")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"niah threshold={self.threshold} must lie in (0, 1]")

    @property
    def answer_tokens(self) -> int:
        """Greedy steps at most. keyed's default: per number its digits (3 a token), a space and a
        separator, and 2 spare."""
        if self.max_new_tokens:
            return self.max_new_tokens
        if self.protocol == "paper":
            return PAPER_MAX_NEW_TOKENS
        return self.needles * (-(-self.digits // 3) + 2) + 2

    @property
    def rng_seed(self) -> int:
        return self.seed if self.seed is not None else (PAPER_SEED if self.protocol == "paper" else 0)

    def budget(self, length: int) -> int:
        """The prompt's token budget at `length`: paper L - max_new_tokens (exceeded by a few
        tokens), keyed exactly L."""
        return length - self.answer_tokens if self.protocol == "paper" else length


@dataclass
class Sample:
    tokens: np.ndarray          # (prompt_tokens,) int64: the prompt, BOS first
    numbers: list[str]
    depths: list[float]         # each needle's depth in the haystack, 0 (start) .. 1 (end)
    keys: list[str] = field(default_factory=list)  # keyed only


# ----------------------------------------------------------------------------- paper protocol


def paper_context(chunks: Sequence[str], depths: Sequence[float], needles: Sequence[str], question: str) -> str:
    """The script's `context` for haystack chunks `res` and needle depths (its joins, verbatim:
    "." inside a stretch, ". " before each needle, ". " between the last stretch's chunks)."""
    places = [0, *(int(d * len(chunks)) for d in depths)]
    context = ""
    for j, needle in enumerate(needles, start=1):
        context += ".".join(chunks[places[j - 1]:places[j]]) + ". " + needle
    return context + ". ".join(chunks[places[-1]:]) + ". \n" + question


def paper_depths(rng: random.Random, needles: int) -> list[float]:
    """The script's `generate_random_segments`: one depth in each of `needles` slices of [0, 0.99)."""
    width = 0.99 / needles
    return [j * width + rng.uniform(0, width) for j in range(needles)]


def build_paper_samples(text: str, length: int, cfg: NiahConfig, encode: Callable[[str], list[int]], *,
                        bos_id: int) -> list[Sample]:
    """`cfg.samples` prompts as the paper's script builds them for test length `length`."""
    budget = cfg.budget(length)
    if budget <= 0:
        raise ValueError(f"length {length} leaves no prompt budget after {cfg.answer_tokens} answer tokens "
                         f"(the paper's prompts hold length - max_new_tokens); drop it from --lengths")
    rng = random.Random(cfg.rng_seed)  # the script's random.seed(42), once per length's run
    numbers = [str(rng.randint(100_000, 1_000_000)) for _ in range(cfg.needles)]
    needles = [PAPER_NEEDLE.format(number=n) for n in numbers]
    sentences = text.split(".")
    step = 50 if budget > PAPER_LONG_CONTEXT else 1
    chunks = [".".join(sentences[i:i + step]) for i in range(0, len(sentences), step)]
    task_tokens = len(encode(PAPER_TASK)) + 1  # the script counts with the tokenizer's BOS, twice
    out, hint = [], 0
    for _ in range(cfg.samples):
        depths = paper_depths(rng, cfg.needles)

        def exceeds(k: int, depths: list[float] = depths) -> bool:
            return len(encode(paper_context(chunks[:k], depths, needles, PAPER_QUESTION))) + 1 + task_tokens > budget

        k = _first_true(exceeds, len(chunks), hint)
        if k == len(chunks):
            raise ValueError(f"the haystack text ({len(sentences):,} sentences) is too short for length {length}: "
                             f"give a longer --haystack file (or more --data), or shorter lengths")
        hint = k
        context = paper_context(chunks[:k], depths, needles, PAPER_QUESTION)
        if context.startswith("."):
            context = context[1:]
        tokens = np.asarray([bos_id, *encode(PAPER_TASK + context)], dtype=np.int64)
        out.append(Sample(tokens, numbers, depths))
    return out


def _first_true(pred: Callable[[int], bool], n: int, hint: int) -> int:
    """The smallest k in [0, n) with pred(k) (n if none), for a pred that turns true once and stays
    so (the script's scan: a prompt's token count grows with its haystack). Starts at `hint`, the
    previous sample's answer, so a run of samples costs about two evaluations each."""
    lo, hi = 0, n  # the answer lies in [lo, hi]
    if 0 < hint < n:
        if pred(hint):
            hi = hint
            if not pred(hint - 1):
                return hint
        else:
            lo = hint + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def paper_found(answer: str, numbers: Sequence[str]) -> list[bool]:
    """The script's scoring: each number as a substring of the answer, lower-cased, whitespace joined."""
    text = " ".join(answer.split()).lower()
    return [n.lower() in text for n in numbers]


# ----------------------------------------------------------------------------- keyed protocol


def _join_keys(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


def build_keyed_samples(haystack: np.ndarray, length: int, cfg: NiahConfig, encode: Callable[[str], list[int]],
                        *, bos_id: int) -> list[Sample]:
    """`cfg.samples` prompts of exactly `length` tokens; deterministic in (cfg.seed, length)."""
    rng = np.random.default_rng([cfg.rng_seed, length])
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
        out.append(Sample(tokens, numbers, [c / budget for c in cuts], keys))
    return out


def keyed_found(answer: str, numbers: Sequence[str]) -> list[bool]:
    """Which numbers appear in the answer as whole numbers (not inside a longer run of digits)."""
    return [re.search(rf"(?<!\d){n}(?!\d)", answer) is not None for n in numbers]


# ----------------------------------------------------------------------------- both


def build_samples(haystack: str | np.ndarray, length: int, cfg: NiahConfig, encode: Callable[[str], list[int]],
                  *, bos_id: int) -> list[Sample]:
    """The protocol's prompts at `length`: paper from haystack text, keyed from haystack tokens."""
    if cfg.protocol == "paper":
        if not isinstance(haystack, str):
            raise TypeError("the paper protocol's haystack is text")
        return build_paper_samples(haystack, length, cfg, encode, bos_id=bos_id)
    if isinstance(haystack, str):
        haystack = np.asarray(encode(haystack), dtype=np.int64)
    return build_keyed_samples(haystack, length, cfg, encode, bos_id=bos_id)


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
    string: dict[str, Any] | None
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
        c = self.config
        return (f"niah {self.model} ({c['protocol']} protocol{string_label(self.string)}): {c['samples']} samples "
                f"x {len(self.accuracy)} lengths, {c['needles']} needles, success = at least "
                f"{c['min_retrieved']} retrieved, up to {c['max_new_tokens']} new tokens\n"
                f"accuracy by length {rows}\n"
                f"effective length {self.effective_length} (accuracy >= {c['threshold']} up to it); "
                f"{self.seconds:.1f} s")


def string_label(string: dict[str, Any] | None, before: str = ", ") -> str:
    """`before` + "STRING S=... W=... scale ..." for a report's `string` record ("" without STRING)."""
    if not string:
        return ""
    shift = f"S={string['ratio']}L" if string.get("shift") == "auto" else f"S={string['shift']}"
    return f"{before}STRING {shift} W={string['window']} scale {string['scale']:.4f}"


Generate = Callable[[list[np.ndarray], int, Any], list[list[int]]]


def run_niah(generate: Generate, decode: Callable[[Sequence[int]], str], encode: Callable[[str], list[int]],
             haystack: str | np.ndarray, cfg: NiahConfig, *, bos_id: int, eos_ids: Sequence[int] = (),
             model: str = "", string: Any = None, progress: bool = False) -> NiahReport:
    """Build, answer and score every length's samples.

    `generate(prompts, max_new_tokens, string_config)` returns each prompt's new token ids (cut
    here at the first of `eos_ids`). `string`: None, or a `StringChoice` (`string_for(prompt
    budget)` gives each length's STRING configuration)."""
    new = cfg.answer_tokens
    report = NiahReport(model=model, config={**asdict(cfg), "max_new_tokens": new, "seed": cfg.rng_seed},
                        string=string.describe() if string is not None else None)
    found_fn = paper_found if cfg.protocol == "paper" else keyed_found
    t0 = time.perf_counter()
    # Build every length's samples first: a too-short length or haystack fails before any decoding.
    samples = {length: build_samples(haystack, length, cfg, encode, bos_id=bos_id) for length in cfg.lengths}
    for length in tqdm(cfg.lengths, desc="niah lengths", disable=not progress):
        string_cfg = string.for_budget(cfg.budget(length)) if string is not None else None
        if report.string is not None:
            report.string["shift_by_length"][str(length)] = string_cfg.shift if string_cfg else None
        answers = generate([s.tokens for s in samples[length]], new, string_cfg)
        hits = np.zeros(cfg.depth_bins)
        seen = np.zeros(cfg.depth_bins)
        found = []
        for i, (sample, ids) in enumerate(zip(samples[length], answers, strict=True)):
            ids = list(itertools.takewhile(lambda t: t not in eos_ids, ids))
            report.prompt_tokens += len(sample.tokens)
            report.generated_tokens += len(ids)
            text = decode(ids)
            got = found_fn(text, sample.numbers)
            found.append(sum(got))
            for depth, ok in zip(sample.depths, got, strict=True):
                b = min(int(depth * cfg.depth_bins), cfg.depth_bins - 1)
                seen[b] += 1
                hits[b] += ok
            if i == 0:
                report.examples[length] = {
                    "numbers": sample.numbers, "depths": [round(d, 6) for d in sample.depths],
                    **({"keys": sample.keys} if sample.keys else {}), "prompt_tokens": len(sample.tokens),
                    "budget": cfg.budget(length), "prompt_head": decode(sample.tokens[1:41].tolist()),
                    "prompt_tail": decode(sample.tokens[-40:].tolist()), "answer": text}
        report.accuracy[length] = float(np.mean([n >= cfg.min_retrieved for n in found]))
        report.mean_retrieved[length] = float(np.mean(found))
        report.depth_accuracy[length] = [float(h / s) if s else None for h, s in zip(hits, seen, strict=True)]
    report.effective_length = effective_length(report.accuracy, cfg.threshold)
    report.seconds = time.perf_counter() - t0
    return report


@dataclass(frozen=True)
class StringChoice:
    """STRING as asked on the command line: a fixed shift, or `auto`: int(ratio x the length's prompt
    budget) per length, as the paper's scripts set `shifted_offset` (none where that is <= 1, as
    there). Window, scale and overlap as `StringConfig`'s."""

    shift: int | None       # None: auto
    ratio: float = 0.5      # the needle script's default `--shifted_ratio` (its README suggests 0.33)
    window: int = 128
    scale: float = 0.1 * math.log(2) + 1  # the paper code's attention_factor (string_attention.PAPER_SCALE)
    overlap: bool = True

    def for_budget(self, budget: int) -> Any:
        """The `StringConfig` for a prompt budget (None: STRING off at this length)."""
        from slimpack.model.string_attention import StringConfig  # the model layer; torch from here on

        shift = self.shift if self.shift is not None else int(self.ratio * budget)
        return StringConfig(shift, self.window, self.scale, self.overlap) if shift > 1 else None

    def describe(self) -> dict[str, Any]:
        return {"shift": "auto" if self.shift is None else self.shift,
                "ratio": self.ratio if self.shift is None else None, "window": self.window, "scale": self.scale,
                "overlap": self.overlap, "shift_by_length": {}}


def default_lengths(max_length: int, step: int = 128, *, protocol: str, max_new_tokens: int = 0) -> tuple[int, ...]:
    """Multiples of `step` up to `max_length`, less those that hold no prompt: the paper protocol's
    prompts hold L - max_new_tokens (128 unless set). `max_length` alone if none is left."""
    reserve = (max_new_tokens or PAPER_MAX_NEW_TOKENS) if protocol == "paper" else 0
    return tuple(n for n in range(step, max_length + 1, step) if n > reserve) or (max_length,)


def haystack_tokens(lengths: Sequence[int]) -> int:
    """Dataset tokens read for a haystack: 4x the longest length (keyed windows move within it)."""
    return 4 * max(lengths)


def results_dir(protocol: str, string: Any) -> str:
    """RUN_DIR/eval/<this>/ for a checkpoint's reports: niah (paper, plain RoPE), niah-string,
    niah-keyed, niah-keyed-string. `slimpack plot` reads the paper ones."""
    return "niah" + ("-keyed" if protocol == "keyed" else "") + ("-string" if string is not None else "")


# ----------------------------------------------------------------------------- haystacks


def text_haystack(path: str | Path) -> str:
    """A haystack text file: plain UTF-8 text (undecodable bytes replaced), or a JSON object with a
    "text" field (the paper's `PaulGrahamEssays.json` layout)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--haystack {path}: no such file; give a UTF-8 text file or a JSON file "
                                f"with a \"text\" field")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"--haystack {path}: not valid JSON ({err}); give a JSON object with a \"text\" "
                             f"field, or plain text in a file not named .json") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            raise ValueError(f"--haystack {path}: a JSON haystack needs a string field \"text\" "
                             f"(as the paper's PaulGrahamEssays.json)")
        return doc["text"]
    return raw


def dataset_documents(path: str, *, split: str = "validation", tokens: int,
                      cache_dir: str | None = None) -> list[np.ndarray]:
    """Text-token documents of a shard dataset's split in index order (special tokens dropped) until
    about `tokens` tokens. Shards are hash-checked."""
    index = load_index(path)
    store = ShardStore(index, cache_dir=cache_dir, cache_limit_bytes=1 << 34, decoded_cache_bytes=1 << 28)
    docs, total = [], 0
    try:
        for sample_id in index.split_samples(split):
            ids, cu = store.sample(int(sample_id))
            for a, b in itertools.pairwise(cu.tolist()):
                doc = ids[a:b].astype(np.int64)
                doc = doc[doc < FIRST_SPECIAL_ID]
                if len(doc):
                    docs.append(doc)
                    total += len(doc)
            if total >= tokens:
                break
    finally:
        store.close()
    if not docs:
        raise ValueError(f"{path}: split {split!r} holds no text tokens to build a haystack from; "
                         f"give --haystack FILE or another --split")
    return docs


def dataset_haystack(path: str, encode: Callable[[str], list[int]], decode: Callable[[Sequence[int]], str], *,
                     protocol: str, split: str = "validation", tokens: int,
                     cache_dir: str | None = None) -> str | np.ndarray:
    """The split's documents in index order, separated by a paragraph break: as text for the paper
    protocol (decoded), as tokens for keyed."""
    docs = dataset_documents(path, split=split, tokens=tokens, cache_dir=cache_dir)
    if protocol == "paper":
        return "\n\n".join(decode(d.tolist()) for d in docs)
    sep = np.asarray(encode("\n\n"), dtype=np.int64)
    return np.concatenate([x for d in docs for x in (d, sep)])


# ----------------------------------------------------------------------------- the heatmap


def write_heatmap(report: NiahReport, path: str | Path) -> Path:
    """Length x depth heatmap of needle retrieval (the paper's figure 4): red 0, green 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(report.depth_accuracy) + 2), 4.5))
    draw_heatmap(ax, report.depth_accuracy, report.effective_length, fig=fig)
    ax.set_title(f"needle retrieval: {report.model} ({report.config['protocol']}{string_label(report.string)})\n"
                 f"effective length {report.effective_length}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_heatmap(ax: Any, depth_accuracy: dict[Any, list[float | None]], effective: int, *, fig: Any) -> None:
    """The heatmap on `ax`: one column per length, one row per depth bin (shared with `slimpack plot`)."""
    lengths = sorted(depth_accuracy, key=int)
    grid = np.array([[np.nan if a is None else a for a in depth_accuracy[n]] for n in lengths]).T
    bins = grid.shape[0]
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=60, fontsize=8)
    ax.set_yticks(range(bins), [f"{100 * (b + 0.5) / bins:.0f}%" for b in range(bins)], fontsize=8)
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("needle depth")
    if effective and effective in [int(n) for n in lengths]:
        ax.axvline([int(n) for n in lengths].index(effective) + 0.5, color="black", linestyle="--", linewidth=1)
    fig.colorbar(im, ax=ax, label="needles retrieved")
