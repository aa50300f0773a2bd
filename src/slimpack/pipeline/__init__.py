"""The online data path: global index, epoch order, packing, per-rank batches, state.

``LoaderConfig`` + ``PackedLoader`` are the public API (see ``loader``); ``order`` and ``packing``
are the pure functions it composes, ``index`` and ``store`` its I/O. The names below load on first
use, so `slimpack` subcommands that never touch the loader do not pay for importing torch.
"""

from typing import Any

__all__ = ["LOADER_VERSION", "LoaderConfig", "PackedLoader", "check_layout", "step_digest"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from slimpack.pipeline import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'slimpack.pipeline' has no attribute {name!r}")
