"""Logging: one stderr handler on the `slimpack` logger; other ranks keep only warnings, marked."""

from __future__ import annotations

import logging

import pytest

from slimpack.log import configure_logging


@pytest.mark.parametrize("rank", ["0", "1"])
def test_rank_filter(rank, monkeypatch, capsys):
    monkeypatch.setenv("RANK", rank)  # torchrun's, before a process group exists
    configure_logging()
    configure_logging()  # idempotent: one handler, each record once
    log = logging.getLogger("slimpack.some.module")
    log.info("step 1 | loss 2.0")
    log.warning("wandb.init failed")
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout is for reports
    lines = captured.err.splitlines()
    if rank == "0":
        assert len(lines) == 2 and lines[0].endswith("INFO step 1 | loss 2.0")
        assert lines[1].endswith("WARNING wandb.init failed")
    else:
        assert len(lines) == 1 and lines[0].endswith("[rank 1] WARNING wandb.init failed")
