"""Optional dependencies: a missing extra is one line naming the `pip install` that adds it.

The CLI side (every command, in an interpreter without the extras) is tests/test_cli.py.
"""

from __future__ import annotations

import sys

import pytest

from slimpack.extras import EXTRAS, MissingExtraError, require


def test_require_names_the_extra(monkeypatch):
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # what Python does for a package not installed
    with pytest.raises(MissingExtraError) as err:
        require("pyarrow.parquet")
    assert str(err.value) == "needs pyarrow: pip install 'slimpack[parquet]'"


def test_a_module_missing_inside_an_installed_package_is_not_called_a_missing_extra():
    # torch is installed here: a submodule it lacks means a broken or too old torch, not a missing extra.
    with pytest.raises(ModuleNotFoundError) as err:
        require("torch.no_such_module")
    assert not isinstance(err.value, MissingExtraError)


def test_every_extra_named_exists_in_pyproject():
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert set(EXTRAS.values()) <= set(extras)

