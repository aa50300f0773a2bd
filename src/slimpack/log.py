"""Logging for library code: the `slimpack` logger tree, configured once by the command line.

Library modules log through ``logging.getLogger(__name__)`` and never print; a command's report is
printed by its CLI function, on stdout. ``configure_logging`` (called by `slimpack` and by
`torchrun -m slimpack.train`) sends the records to stderr, and on ranks other than 0 keeps only
warnings and errors, marked with the rank: eight GPUs write one log, not eight copies of it. A
program that imports slimpack configures logging its own way (nothing is set up on import).
"""

from __future__ import annotations

import logging
import sys

from slimpack.ranks import rank_from_env


def process_rank() -> int:
    """torch.distributed's rank once a process group exists, else the launcher's ``RANK``, else 0."""
    dist = sys.modules.get("torch.distributed")  # never imports torch: set only where torch is in use
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return rank_from_env()[0] or 0
    except ValueError:
        return 0


class RankZeroFilter(logging.Filter):
    """Every record on rank 0; elsewhere only warnings and errors, with a ``[rank N]`` mark."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = process_rank()
        record.rank = "" if rank == 0 else f"[rank {rank}] "
        return rank == 0 or record.levelno >= logging.WARNING


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a test's capture, a redirected stream)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """One stderr handler on the ``slimpack`` logger, with the rank filter. Idempotent."""
    logger = logging.getLogger("slimpack")
    logger.setLevel(level)
    if any(isinstance(h, _StderrHandler) for h in logger.handlers):
        return
    handler = _StderrHandler()
    handler.addFilter(RankZeroFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(rank)s%(levelname)s %(message)s",
                                           datefmt="%Y-%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.propagate = False  # the root logger's handlers (if any) would print each record again
