"""`torchrun --nproc-per-node N -m slimpack.train --config FILE [--set key=value ...]`."""

import sys

from slimpack.train.loop import main

if __name__ == "__main__":
    sys.exit(main())
