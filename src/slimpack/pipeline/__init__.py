"""The online data path: global index, epoch order, packing, per-rank batches, state.

``LoaderConfig`` + ``PackedLoader`` are the public API (see ``loader``); ``order`` and ``packing``
are the pure functions it composes, ``index`` and ``store`` its I/O.
"""

from slimpack.pipeline.loader import (
    LOADER_VERSION,
    LoaderConfig,
    PackedLoader,
    check_layout,
    step_digest,
)

__all__ = ["LOADER_VERSION", "LoaderConfig", "PackedLoader", "check_layout", "step_digest"]
