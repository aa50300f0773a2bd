"""Dataset statistics: tokens and documents per source and split, document lengths, and the
relative-position frequency per context length.

    slimpack shards stats DIR [--seq-len 2048 4096] [--split train] [--seed 0] [--plots DIR] [--json FILE]

Tokens, documents, sources and document lengths cover every split. The relative-position
frequency counts what the loader feeds: one epoch of one split (`--split`, default train) in the
loader's epoch order for `--seed` (data.seed; epoch 0), exactly as `PackedLoader` streams it. The
token stream is the split's samples in that order; window g holds the input tokens
[g*L, (g+1)*L) (the loader reads L+1 tokens per window, overlapping by one, for the labels), and
only complete windows count: G = (T - 1) // L for T tokens; the tail is dropped. With document
masking a token at stream position p attends to positions [max(doc_start, g*L), p]. Later
epochs are other permutations: their f differs only where documents meet window cuts.

Which pairs count: those whose query has a label, as the training ledger counts them
(`train/ledger.py`, which says why): the loader masks the label of a document's EOS (it would
predict the next BOS), so a document's label positions are its tokens but the EOS. Cut them at
window boundaries into segments; a segment of m label positions adds m - d pairs at distance d.
f(0) is then the number of tokens the loss is taken over. Without masking (plain packing, every
position predicts the next token) every window is one segment of length L.

Exactness in linear time: cut every document's label positions at window boundaries into
segments (a document inside one window is one segment; one that spans windows is a head, some whole windows and a
tail: O(1) arithmetic per document). A segment of m tokens holds m - d pairs at distance d, so

    N(d) = sum_m c[m] * max(m - d, 0) = S1(d) - d * S0(d),
    S0(d) = sum_{m > d} c[m],   S1(d) = sum_{m > d} m * c[m],

where c[m] counts segments of length m: two suffix sums over L + 1 bins. Without masking every
window is one segment of length L: N(d) = G * (L - d). Work is O(documents + L) per L, never per
token pair; each sample's documents are placed at the sample's offset in the epoch stream and
counted independently, so shards are counted in parallel and summed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from slimpack.extras import require
from slimpack.shards import mds, schema
from slimpack.shards.columns import concat_columns, global_cu_seqlens
from slimpack.shards.dataset import UnusableInputError, read_dataset_json
from slimpack.storage import member_path

PERCENTILES = (0, 1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9, 100)


# ----------------------------------------------------------------------------- pure functions


def segment_length_counts(doc_lengths: np.ndarray, *, seq_len: int, stream_start: int = 0,
                          stream_end: int) -> np.ndarray:
    """c[m] for m in 0..L: how many (document, window) segments have m tokens.

    Documents lie end to end from stream position `stream_start`; windows are [g*L, (g+1)*L);
    tokens at or past `stream_end` (a multiple of L: the end of the last complete window) are
    dropped.
    """
    lengths = np.asarray(doc_lengths, np.int64)
    ends = stream_start + np.cumsum(lengths)
    return interval_segment_counts(ends - lengths, ends, seq_len=seq_len, stream_end=stream_end)


def label_segment_counts(doc_starts: np.ndarray, doc_lengths: np.ndarray, *, seq_len: int,
                         stream_end: int) -> np.ndarray:
    """c[m] for m in 0..L over label positions: each document's tokens but its EOS (whose label the
    loader masks), cut at windows; documents at stream positions `doc_starts`."""
    starts = np.asarray(doc_starts, np.int64)
    return interval_segment_counts(starts, starts + np.asarray(doc_lengths, np.int64) - 1, seq_len=seq_len,
                                   stream_end=stream_end)


def interval_segment_counts(starts: np.ndarray, ends: np.ndarray, *, seq_len: int,
                            stream_end: int) -> np.ndarray:
    """c[m] for m in 0..L: stream intervals [start, end) cut at windows [g*L, (g+1)*L) into segments
    of m positions; positions at or past `stream_end` (a multiple of L) are dropped."""
    L = seq_len
    starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    keep = (ends > starts) & (starts < stream_end)
    s, e = starts[keep], np.minimum(ends[keep], stream_end)
    first, last = s // L, (e - 1) // L  # windows holding a segment's first and last token
    one = first == last
    counts = np.bincount(e[one] - s[one], minlength=L + 1)
    s, e, first, last = s[~one], e[~one], first[~one], last[~one]
    counts += np.bincount((first + 1) * L - s, minlength=L + 1)  # heads
    counts += np.bincount(e - last * L, minlength=L + 1)  # tails
    counts[L] += int(np.sum(last - first - 1))  # whole windows in between
    return counts.astype(np.int64)


def distance_frequency(segment_counts: np.ndarray) -> np.ndarray:
    """N(d), d = 0..L-1: pairs (query, key) at distance d, from segment-length counts c[0..L]."""
    c = np.asarray(segment_counts, np.int64)
    L = len(c) - 1
    m = np.arange(L + 1, dtype=np.int64)
    # Suffix sums over m > d for d = 0..L-1.
    s0 = np.cumsum(c[::-1])[::-1][1:]
    s1 = np.cumsum((c * m)[::-1])[::-1][1:]
    return s1 - np.arange(L, dtype=np.int64) * s0


def unmasked_distance_frequency(windows: int, seq_len: int) -> np.ndarray:
    """N(d) = G * (L - d): every window is one causal segment of L tokens."""
    return windows * (seq_len - np.arange(seq_len, dtype=np.int64))


def percentiles_from_counts(values: np.ndarray, counts: np.ndarray,
                            qs: Sequence[float] = PERCENTILES) -> dict[str, int]:
    """Nearest-rank percentiles of a multiset given as sorted distinct values and their counts."""
    cum = np.cumsum(counts)
    n = int(cum[-1])
    out = {}
    for q in qs:
        rank = max(1, int(np.ceil(q / 100 * n)))
        out[f"p{q:g}"] = int(values[int(np.searchsorted(cum, rank))])
    return out


# ----------------------------------------------------------------------------- per shard


@dataclass
class _ShardCounts:
    index: int
    part: str | None
    tokens: int
    documents: int
    length_values: np.ndarray
    length_counts: np.ndarray
    source_ids: np.ndarray
    source_docs: np.ndarray
    source_tokens: np.ndarray
    segments: dict[int, np.ndarray]


def _count_shard(args: tuple) -> _ShardCounts:
    root, index, entry, sample_starts, cuts = args
    info = mds.parse_index({"version": schema.MDS_VERSION, "shards": [entry]})[0]
    shard = mds.load_shard(root, info)
    names = [n for n in ("tokens", "cu_seqlens", "doc_sources") if n in info.names]
    cols = concat_columns(shard, names)
    n_tok = cols["tokens"][1]
    lengths_all = np.diff(global_cu_seqlens(*cols["cu_seqlens"], n_tok))
    sources = [cols["doc_sources"][0]] if "doc_sources" in cols else []
    values, counts = np.unique(lengths_all, return_counts=True)
    if sources:
        ids, inverse = np.unique(np.concatenate(sources), return_inverse=True)
        docs = np.bincount(inverse, minlength=len(ids))
        toks = np.bincount(inverse, weights=lengths_all, minlength=len(ids)).astype(np.int64)
    else:
        ids, docs, toks = (np.zeros(0, np.int64),) * 3
    segments = {}
    if sample_starts is not None:  # a shard of the counted split: place each document in the stream
        sample_tokens = cols["tokens"][1].astype(np.int64)
        doc_pos = np.cumsum(lengths_all) - lengths_all  # within the shard's concatenated tokens
        first_token = np.cumsum(sample_tokens) - sample_tokens
        sample_of = np.searchsorted(first_token, doc_pos, side="right") - 1
        doc_starts = sample_starts[sample_of] + (doc_pos - first_token[sample_of])
        segments = {L: label_segment_counts(doc_starts, lengths_all, seq_len=L, stream_end=end)
                    for L, end in cuts.items()}
    return _ShardCounts(index, schema.part_of(info.basename), int(n_tok.sum()), len(lengths_all),
                        values, counts, ids, docs, toks, segments)


# ----------------------------------------------------------------------------- the report


@dataclass
class StatsReport:
    path: str
    shards: int = 0
    samples: int = 0
    documents: int = 0
    tokens: int = 0
    per_source: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_split: dict[str, dict[str, Any]] = field(default_factory=dict)
    doc_length: dict[str, Any] = field(default_factory=dict)
    position_frequency: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"stats {self.path}: {self.shards:,} shards, {self.samples:,} samples, "
                 f"{self.documents:,} documents, {self.tokens:,} tokens ({self.seconds:.1f} s)"]
        for split, s in self.per_split.items():
            lines.append(f"  split {split:12s} {s['documents']:>12,} documents {s['tokens']:>16,} tokens")
        for name, s in self.per_source.items():
            lines.append(f"  source {name:24s} {s['documents']:>12,} documents {s['tokens']:>16,} tokens "
                         f"({100 * s['token_share']:5.1f}% of tokens)")
        dl = self.doc_length
        if dl:
            pct = dl["percentiles"]
            lines.append(f"  document length (tokens): mean {dl['mean']:,.0f}; "
                         + ", ".join(f"{k} {pct[k]:,}" for k in ("p1", "p10", "p50", "p90", "p99", "p100")))
        for L, pf in self.position_frequency.items():
            seq_len = int(L)
            masked, unmasked = np.asarray(pf["masked"]), np.asarray(pf["unmasked"])
            lines.append(f"  context {seq_len}, split {pf['split']!r} (one epoch in the loader's order, seed "
                         f"{pf['seed']}): {pf['windows']:,} windows; query-key pairs with a label at "
                         "distance d, with document masking vs without:")
            for d in sorted({d for d in (0, 1, 64, 256, 1024, seq_len // 2, seq_len - 1) if d < seq_len}):
                share = masked[d] / unmasked[d] if unmasked[d] else 0.0
                lines.append(f"    d={d:<6d} {masked[d]:>16,} {unmasked[d]:>16,}  ({share:.1%} kept)")
        return "\n".join(lines)


def _stream_starts(root: Path, entries: list[dict[str, Any]], manifest: dict[str, Any]) -> np.ndarray:
    """Stream offset of each shard's first token, from sample_tokens.npy (the loader's input)."""
    name = str(manifest.get("sample_tokens_file") or schema.SAMPLE_TOKENS_FILENAME)
    path = member_path(root, name, where=f"{root / schema.MANIFEST_FILENAME}: sample_tokens_file")
    sample_tokens = np.load(path, allow_pickle=False).astype(np.int64)
    per_shard = np.asarray([int(e["samples"]) for e in entries], np.int64)
    if per_shard.sum() != len(sample_tokens):
        raise ValueError(f"{root}: index.json lists {per_shard.sum()} samples, sample_tokens.npy has "
                         f"{len(sample_tokens)}; run `slimpack shards validate` first")
    token_starts = np.concatenate([[0], np.cumsum(sample_tokens)])
    return token_starts[np.concatenate([[0], np.cumsum(per_shard)])]


def _epoch_sample_starts(root: Path, split: str, seed: int) -> tuple[np.ndarray, int]:
    """Stream offset of every global sample in epoch 0 of `split` as the loader orders it (-1: not in
    the split), and the split's token count. The loader's own order and fingerprint functions."""
    # Here, not at the top: the loader imports torch where it is installed, and every worker
    # process of compute_stats imports this module.
    from slimpack.pipeline.index import load_index
    from slimpack.pipeline.loader import loader_fingerprint
    from slimpack.pipeline.order import epoch_order

    index = load_index(str(root))
    samples = index.split_samples(split)
    order = epoch_order(len(samples), seed=seed, epoch=0,
                        fingerprint=loader_fingerprint(index.fingerprint, split))
    ids = samples[order]
    lengths = index.sample_tokens[ids].astype(np.int64)
    starts = np.full(index.num_samples, -1, np.int64)
    starts[ids] = np.cumsum(lengths) - lengths
    return starts, int(lengths.sum())


_NOT_MERGED = ("not a merged dataset; point at one, or run `slimpack shards merge DIR` once every part is "
               "tokenized")


def compute_stats(path: str | os.PathLike, *, seq_lens: Sequence[int] = (2048, 4096), workers: int = 1,
                  progress: bool = False, split: str = "train", seed: int = 0) -> StatsReport:
    """Every figure of the module docstring for a local (validated) dataset; the position frequency
    over one epoch of `split` in the loader's order for `seed`.

    Raises `UnusableInputError` when `path` is not a merged dataset or holds no documents.
    """
    start = time.monotonic()
    root = Path(path)
    if not root.is_dir():
        raise UnusableInputError(f"{root} does not exist or is not a directory: point at a local "
                                 "dataset directory (the --out of `slimpack tokenize`)")
    manifest = read_dataset_json(root / schema.MANIFEST_FILENAME, _NOT_MERGED)
    index = read_dataset_json(root / schema.INDEX_FILENAME, _NOT_MERGED)
    entries = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(entries, list) or not isinstance(manifest, dict):
        raise UnusableInputError(f"{root}: index.json or slimpack.json is not a slimpack dataset's; "
                                 "run `slimpack shards validate` on it")
    if not entries:
        raise UnusableInputError(f"{root}: the dataset holds no documents (index.json lists no "
                                 "shards), so there is nothing to describe; the tokenize report "
                                 "says which records were skipped and why")
    mds.parse_index({"version": schema.MDS_VERSION, "shards": entries}, str(root / schema.INDEX_FILENAME))
    if any(L < 1 for L in seq_lens):
        raise ValueError(f"--seq-len must be positive, got {list(seq_lens)}")
    starts = _stream_starts(root, entries, manifest)
    total = int(starts[-1])
    sample_starts, split_tokens = _epoch_sample_starts(root, split, seed)
    cuts = {int(L): max(0, (split_tokens - 1) // int(L)) * int(L) for L in seq_lens}
    first_sample = np.concatenate([[0], np.cumsum([int(e["samples"]) for e in entries])])
    tasks = []
    for i, e in enumerate(entries):
        mine = sample_starts[first_sample[i]:first_sample[i + 1]]
        tasks.append((str(root), i, e, mine if len(mine) and mine.min() >= 0 else None, cuts))
    bar = tqdm(total=len(tasks), unit="shard", desc="stats", disable=not progress, dynamic_ncols=True)
    results: list[_ShardCounts] = []
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            results.append(_count_shard(t))
            bar.update()
    else:
        with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            for res in pool.imap_unordered(_count_shard, tasks):
                results.append(res)
                bar.update()
    bar.close()
    results.sort(key=lambda r: r.index)
    for r in results:
        expect = int(starts[r.index + 1] - starts[r.index])
        if r.tokens != expect:
            raise ValueError(f"{root}: shard {r.index} holds {r.tokens} tokens, sample_tokens.npy says "
                             f"{expect}; run `slimpack shards validate`")

    report = StatsReport(str(root), shards=len(entries), samples=int(sum(e["samples"] for e in entries)),
                         documents=sum(r.documents for r in results), tokens=total)
    names = {int(k): v for k, v in (manifest.get("sources") or {}).items()}
    split_of = {p: v.get("split", "?") for p, v in (manifest.get("parts") or {}).items()}
    per_source: dict[str, list[int]] = {}
    per_split: dict[str, dict[str, Any]] = {}
    for r in results:
        of_split = per_split.setdefault(split_of.get(r.part or "", "?"),
                                        {"documents": 0, "tokens": 0, "per_source": {}})
        of_split["documents"] += r.documents
        of_split["tokens"] += r.tokens
        for sid, d, t in zip(r.source_ids.tolist(), r.source_docs.tolist(), r.source_tokens.tolist(),
                             strict=True):
            name = names.get(sid, f"id:{sid}")
            agg = per_source.setdefault(name, [0, 0])
            agg[0] += d
            agg[1] += t
            s = of_split["per_source"].setdefault(name, {"documents": 0, "tokens": 0})
            s["documents"] += d
            s["tokens"] += t
    report.per_source = {
        name: {"documents": d, "tokens": t, "document_share": d / max(report.documents, 1),
               "token_share": t / max(total, 1)}
        for name, (d, t) in sorted(per_source.items(), key=lambda kv: -kv[1][1])}
    report.per_split = dict(sorted(per_split.items()))

    if report.documents:
        values = np.concatenate([r.length_values for r in results])
        counts = np.concatenate([r.length_counts for r in results])
        values, inverse = np.unique(values, return_inverse=True)
        counts = np.bincount(inverse, weights=counts).astype(np.int64)
        top = int(values[-1])
        edges = 2 ** np.arange(int(np.ceil(np.log2(max(top, 2)))) + 2)
        hist, _ = np.histogram(values, bins=edges, weights=counts)
        report.doc_length = {
            "mean": float((values * counts).sum() / counts.sum()), "min": int(values[0]), "max": top,
            "percentiles": percentiles_from_counts(values, counts),
            "histogram": {"edges": edges.tolist(), "counts": hist.astype(np.int64).tolist(),
                          "bins": "powers of two: [edges[i], edges[i+1]) tokens"},
        }
    for L, end in cuts.items():
        segments = sum((r.segments.get(L, 0) for r in results), np.zeros(L + 1, np.int64))
        windows = end // L
        report.position_frequency[str(L)] = {
            "seq_len": L, "split": split, "seed": seed, "epoch": 0,
            "counts": "query-key pairs whose query has a label, one epoch in the loader's order",
            "windows": windows, "tokens_in_windows": end, "tokens_dropped": split_tokens - end,
            "segments": int(segments.sum()),
            "masked": distance_frequency(segments).tolist(),
            "unmasked": unmasked_distance_frequency(windows, L).tolist(),
        }
    report.seconds = time.monotonic() - start
    return report


# ----------------------------------------------------------------------------- plots


def write_plots(report: StatsReport, out_dir: str | os.PathLike) -> list[Path]:
    """PNG plots: document-length histogram, position-frequency curves, per-source shares."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    if report.doc_length:
        h = report.doc_length["histogram"]
        edges, counts = np.asarray(h["edges"]), np.asarray(h["counts"])
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", edgecolor="black", linewidth=0.5)
        ax.set_xscale("log", base=2)
        pct = report.doc_length["percentiles"]
        for key, style in (("p50", "--"), ("p90", ":")):
            ax.axvline(pct[key], color="red", linestyle=style, label=f"{key} = {pct[key]:,}")
        ax.set(xlabel="document length (tokens, BOS and EOS included)", ylabel="documents",
               title=f"Document lengths ({report.documents:,} documents)")
        ax.legend()
        paths.append(_save(fig, out / "doc_lengths.png"))

    if report.position_frequency:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8), sharex=False)
        for L, pf in report.position_frequency.items():
            masked, unmasked = np.asarray(pf["masked"], float), np.asarray(pf["unmasked"], float)
            d = np.arange(len(masked))
            line, = top.plot(d, masked, label=f"L={L}, document masking")
            top.plot(d, unmasked, linestyle="--", color=line.get_color(), label=f"L={L}, no masking")
            with np.errstate(divide="ignore", invalid="ignore"):
                bottom.plot(d, np.where(unmasked > 0, masked / unmasked, np.nan), color=line.get_color(),
                            label=f"L={L}")
        top.set(yscale="log", xlabel="attention distance d (tokens)", ylabel="query-key pairs with a label, one epoch",
                title="Relative-position frequency (what the loader feeds)")
        bottom.set(xlabel="attention distance d (tokens)", ylabel="masked / unmasked",
                   title="Share of the unmasked training signal kept by document masking")
        for ax in (top, bottom):
            ax.legend()
            ax.grid(alpha=0.3)
        paths.append(_save(fig, out / "position_frequency.png"))

    if report.per_source:
        names = list(report.per_source)
        y = np.arange(len(names))
        fig, ax = plt.subplots(figsize=(9, 0.5 * len(names) + 1.5))
        ax.barh(y - 0.2, [100 * report.per_source[n]["token_share"] for n in names], height=0.4,
                label="tokens")
        ax.barh(y + 0.2, [100 * report.per_source[n]["document_share"] for n in names], height=0.4,
                label="documents")
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.set(xlabel="share (%)", title="Per-source shares")
        ax.legend()
        paths.append(_save(fig, out / "sources.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
