"""`slimpack shards inspect DIR --sample K`: one sample decoded to text, documents and sources marked.

    slimpack shards inspect DIR --sample 0 [--max-chars 2000]

K is the global sample index (index order, as `sample_tokens.npy` and the loader count them).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from slimpack.shards import mds
from slimpack.shards.dataset import source_names
from slimpack.tokenize.tokenizer import Llama3Tokenizer


def render_sample(path: str | os.PathLike, sample: int, *, max_chars: int = 2000) -> str:
    """The sample as text: a header line per document (index, source, tokens), then its text.

    BOS and EOS appear as their special-token strings, so a misplaced one is visible. `max_chars`
    (0 for no limit) shortens each document's text to its start and end, saying how much was left
    out.
    """
    root = Path(path)
    ds = mds.MDSDataset(root)
    if not 0 <= sample < len(ds):
        raise ValueError(f"{root}: sample {sample} is out of range; the dataset has samples 0..{len(ds) - 1}")
    shard_i, k = ds.locate(sample)
    data = ds[sample]
    names = source_names(root)
    tokens, cu = data["tokens"], np.asarray(data["cu_seqlens"], np.int64)
    sources = data.get("doc_sources")
    tok = Llama3Tokenizer()
    lines = [f"sample {sample} = {ds.shards[shard_i].basename} sample {k}: {len(tokens):,} tokens, "
             f"{len(cu) - 1} document(s)"]
    for d in range(len(cu) - 1):
        ids = tokens[cu[d]:cu[d + 1]]
        source = names.get(str(int(sources[d])), f"id {int(sources[d])}") if sources is not None else "?"
        text = tok.decode(ids)
        tail = min(80, max_chars // 4)
        if max_chars and len(text) > max_chars:
            # Keep the end too: the EOS (or a misplaced control token) shows there.
            left_out = len(text) - max_chars
            text = f"{text[:max_chars - tail]}\n[... {left_out:,} characters left out ...]\n{text[-tail:]}"
        lines.append(f"===== document {d} | source {source} | {len(ids):,} tokens | "
                     f"tokens[{int(cu[d])}:{int(cu[d + 1])}] =====")
        lines.append(text)
    lines.append(f"===== end of sample {sample} =====")
    return "\n".join(lines)
