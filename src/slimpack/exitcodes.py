"""Exit statuses of every `slimpack` command, in one table (the README repeats it).

| status | meaning |
|---|---|
| 0 | success |
| 1 | findings (validate), failed parts (tokenize), failed checks (bench): the command ran, the result has problems |
| 2 | usage error: a bad flag, config value or path, or a missing extra; the message says how to fix it |
| 3 | dataset unusable: no index, unreadable or inconsistent manifest, a shard unlike its index entry |
| 4 | `train`: `train.max_nonfinite_steps` non-finite steps in a row; nothing saved, not requeued |
| 75 | stopped by a signal after saving, a rank hung (`train`, gloo), a store stayed away: resumable |
| 130 | stopped by Ctrl-C (SIGINT; `train` saves first, resumable by hand but not requeued) |
| 143 | `demo` stopped by SIGTERM (the shell's 128 + 15; the demo starts over when run again) |
"""

from __future__ import annotations

OK = 0
FINDINGS = 1
USAGE = 2
UNUSABLE = 3
DIVERGED = 4
RESUMABLE = 75
INTERRUPTED = 130
TERMINATED = 143


class TemporaryError(RuntimeError):
    """A failure that a later run gets past on its own (a remote store that stayed unreachable
    through its retries): the CLI prints the message and exits RESUMABLE."""


class UnusableDatasetError(ValueError):
    """A dataset that cannot be used at all (index files missing, corrupt or inconsistent; a shard
    that is not what its index says): the CLI prints the message and exits UNUSABLE."""


class NonFiniteStepsError(RuntimeError):
    """Training produced `train.max_nonfinite_steps` non-finite steps in a row: the CLI prints the
    message and exits DIVERGED (not RESUMABLE: a requeued job would only repeat them)."""


class CollectiveTimeoutError(TemporaryError):
    """A collective waited past `parallel.step_timeout_s` for a rank: the CLI prints the message and
    exits RESUMABLE, so a Slurm script requeues the job and it resumes from its checkpoint."""
