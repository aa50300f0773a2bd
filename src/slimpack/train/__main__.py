"""`torchrun --nproc-per-node N -m slimpack.train --config FILE [--set key=value ...]`: the same flags
as `slimpack train`."""

import argparse
import sys

from slimpack.cli import run_handler
from slimpack.train.cli import add_train_arguments, run_train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimpack.train", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    return run_handler("slimpack.train", run_train, args)


if __name__ == "__main__":
    sys.exit(main())
