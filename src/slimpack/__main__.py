"""`python -m slimpack ...` is the `slimpack` command."""

import sys

from slimpack.cli import main

sys.exit(main())
