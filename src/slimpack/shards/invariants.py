"""Per-sample invariants of schema v1, vectorised (no Python loop over tokens or documents).

`sample_problems` is shared by the writer's self-check, the validator and the demo.
"""

from __future__ import annotations

import numpy as np


def sample_problems(tokens: np.ndarray, cu_seqlens: np.ndarray, *, bos_id: int, eos_id: int,
                    vocab_size: int, doc_sources: np.ndarray | None = None) -> list[str]:
    """Human-readable violations in one sample (empty when it is sound)."""
    problems: list[str] = []
    n = len(tokens)
    cu = np.asarray(cu_seqlens, np.int64)
    if len(cu) < 2 or cu[0] != 0:
        return [f"cu_seqlens must start at 0 and hold at least one document, got {cu[:4].tolist()}"]
    if cu[-1] != n:
        return [f"cu_seqlens ends at {int(cu[-1])} but the sample has {n} tokens"]
    steps = np.diff(cu)
    if np.any(steps <= 0):
        k = int(np.argmax(steps <= 0))
        kind = "an empty document" if steps[k] == 0 else "out of order"
        return [f"cu_seqlens is not strictly increasing at document {k} ({kind}: "
                f"{int(cu[k])} -> {int(cu[k + 1])})"]
    if doc_sources is not None and len(doc_sources) != len(cu) - 1:
        problems.append(f"{len(doc_sources)} source ids for {len(cu) - 1} documents")
    top = int(tokens.max()) if n else 0
    if top >= vocab_size:
        pos = int(np.argmax(tokens >= vocab_size))
        problems.append(f"token id {top} >= vocab size {vocab_size} (first at position {pos})")
    starts, ends = cu[:-1], cu[1:] - 1
    if np.any(steps < 2):
        k = int(np.argmax(steps < 2))
        problems.append(f"document {k} has {int(steps[k])} token(s); a document is at least BOS EOS")
    if np.any(tokens[starts] != bos_id):
        k = int(np.argmax(tokens[starts] != bos_id))
        problems.append(f"document {k} does not start with BOS ({bos_id}) at position {int(starts[k])}")
    if np.any(tokens[ends] != eos_id):
        k = int(np.argmax(tokens[ends] != eos_id))
        problems.append(f"document {k} does not end with EOS ({eos_id}) at position {int(ends[k])}")
    n_bos, n_eos = int(np.count_nonzero(tokens == bos_id)), int(np.count_nonzero(tokens == eos_id))
    if n_bos != len(starts) or n_eos != len(ends):
        inner = np.ones(n, bool)
        inner[starts] = False
        inner[ends] = False
        bad = np.flatnonzero(inner & ((tokens == bos_id) | (tokens == eos_id)))
        if len(bad):
            pos = int(bad[0])
            doc = int(np.searchsorted(cu, pos, side="right") - 1)
            which = "BOS" if tokens[pos] == bos_id else "EOS"
            problems.append(f"{which} inside document {doc} at position {pos} "
                            f"({len(bad)} control ids inside documents)")
    return problems
