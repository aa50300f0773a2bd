"""Which process this is among those a launcher started: one reading of the launchers' variables.

A launcher is a (rank variable, world-size variable) pair. The tokenize job places a node with
Slurm's or torchrun's; the log and the trainer read torchrun's. Nothing here imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

SLURM_ARRAY = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
SLURM_TASKS = ("SLURM_PROCID", "SLURM_NTASKS")
TORCHRUN = ("RANK", "WORLD_SIZE")
TORCHRUN_LOCAL = ("LOCAL_RANK", "LOCAL_WORLD_SIZE")
# The tokenize job's nodes: a Slurm array, else Slurm tasks, else torchrun-style variables.
NODE_LAUNCHERS = (SLURM_ARRAY, SLURM_TASKS, TORCHRUN)


def rank_from_env(launchers: Sequence[tuple[str, str]] = (TORCHRUN,), *, rank_alone: bool = True,
                  env: Mapping[str, str] | None = None) -> tuple[int | None, int | None]:
    """(rank, world size) from the environment, `launchers` in order of trust.

    The first launcher that sets both of its variables wins. Failing that, with `rank_alone`, the
    first that sets its rank alone gives (rank, None). (None, None) when none does. A value read
    that is not an integer raises ValueError naming the variable.
    """
    env = os.environ if env is None else env

    def read(var: str) -> int:
        try:
            return int(env[var])
        except ValueError:
            raise ValueError(f"{var}={env[var]!r} is not an integer") from None

    for rank_var, world_var in launchers:
        if rank_var in env and world_var in env:
            return read(rank_var), read(world_var)
    for rank_var, _ in launchers if rank_alone else ():
        if rank_var in env:
            return read(rank_var), None
    return None, None
