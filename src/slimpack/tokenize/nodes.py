"""Which node of the tokenize job this is: the flags, else the launcher's variables (`slimpack.ranks`)."""

from __future__ import annotations

from slimpack.ranks import NODE_LAUNCHERS, rank_from_env


def node_from_env(node_rank: int | None, num_nodes: int | None) -> tuple[int, int]:
    """Flags win; else Slurm array, Slurm tasks, then torchrun-style RANK/WORLD_SIZE; else 0 of 1.

    A flag given alone is paired with the environment's other value; `--num-nodes N > 1` with
    no rank anywhere is refused (every node would take rank 0's parts and write the same parts).
    """
    env_rank, env_count = rank_from_env(NODE_LAUNCHERS, rank_alone=False)  # a rank needs its count
    rank = node_rank if node_rank is not None else env_rank
    count = num_nodes if num_nodes is not None else env_count
    if rank is None and count is not None and count > 1:
        raise ValueError(f"--num-nodes {count} needs this node's rank: pass --node-rank (no Slurm or "
                         "RANK/WORLD_SIZE variables give one)")
    rank, count = rank or 0, count or 1
    if not 0 <= rank < count:
        raise ValueError(f"node rank {rank} is outside [0, {count}): check --node-rank/--num-nodes")
    return rank, count
