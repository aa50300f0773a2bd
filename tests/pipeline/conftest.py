"""Fixtures of the pipeline tests (helpers live in pipeline_data.py)."""

from pathlib import Path

import pytest
from pipeline_data import INTERLEAVED_PARTS, PARTS, make_dataset


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 25K train tokens in ~80 samples over ~20 zstd shards, plus a validation part."""
    return make_dataset(tmp_path_factory.mktemp("ds"), parts=PARTS)


@pytest.fixture(scope="session")
def interleaved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train parts on both sides of a validation part: the train samples are not one id range."""
    return make_dataset(tmp_path_factory.mktemp("interleaved"), parts=INTERLEAVED_PARTS, seed=5)
