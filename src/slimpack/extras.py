"""Optional dependencies: which `pip install` extra brings each, and the one-line error when absent.

`pip install slimpack` is the core profile: the CPU tools (tokenize, shards, pipeline digest and
inspect, the loader's numpy batches) and no torch, CUDA, wandb or transformers. Anything else comes
with an extra of pyproject.toml, and code that needs it imports it through `require`, so a missing
one reads, through the CLI,

    slimpack train: error: needs torch: pip install 'slimpack[train]'

The CLI turns a `ModuleNotFoundError` for any module below into the same line (`missing_extra`),
so a plain `import torch` in a module that needs it is enough behind a command.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# Top-level module -> the extra of pyproject.toml that installs it.
EXTRAS = {
    "torch": "train",
    "safetensors": "train",
    "wandb": "train",
    "s3fs": "s3",
    "pyarrow": "parquet",
    "datasets": "datasets",
    "matplotlib": "plots",
    "transformers": "hf",
    "cudnn": "cudnn",
}


class MissingExtraError(RuntimeError):
    """An optional dependency is not installed; the message names the `pip install` that adds it."""


def missing_extra(err: ModuleNotFoundError) -> MissingExtraError | None:
    """The one-line error when `err` is an optional dependency (of ``EXTRAS``) that is not installed,
    e.g. ``needs torch: pip install 'slimpack[train]'``; None for anything else (a module missing
    inside an installed package is a broken or too old install, and keeps its own message)."""
    top = (err.name or "").split(".")[0]
    if top not in EXTRAS or importlib.util.find_spec(top) is not None:
        return None
    return MissingExtraError(f"needs {top}: pip install 'slimpack[{EXTRAS[top]}]'")


def require(module: str) -> ModuleType:
    """Import `module` (one of ``EXTRAS`` or below it), or raise `MissingExtraError` naming the
    extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        missing = missing_extra(err)
        if missing is None:
            raise
        raise missing from err
