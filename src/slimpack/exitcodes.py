"""Exit statuses of every `slimpack` command, in one table (the README repeats it).

| status | meaning |
|---|---|
| 0 | success |
| 1 | findings (validate) or failed parts (tokenize): the command ran, the data has problems |
| 2 | usage error: a bad flag, config value or path; the message says how to fix it |
| 3 | dataset unusable: no index, unreadable manifest, nothing to check |
| 75 | stopped by a signal after saving: resumable (EX_TEMPFAIL; a Slurm script requeues on it) |
| 130 | stopped by Ctrl-C (SIGINT; `train` saves first, resumable by hand but not requeued) |
| 143 | `demo` stopped by SIGTERM (the shell's 128 + 15; the demo starts over when run again) |
"""

from __future__ import annotations

OK = 0
FINDINGS = 1
USAGE = 2
UNUSABLE = 3
RESUMABLE = 75
INTERRUPTED = 130
TERMINATED = 143
