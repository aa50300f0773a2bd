"""Optional dependencies: a missing extra is one line naming the `pip install` that adds it."""

from __future__ import annotations

import sys

import pytest

from slimpack.cli import main
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


def test_the_cli_turns_a_missing_extra_into_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    for name in [m for m in sys.modules if m.startswith("slimpack.train")]:
        monkeypatch.delitem(sys.modules, name)  # re-imported, and failing, as in a fresh process
    assert main(["train", "--config", str(tmp_path / "x.toml")]) == 2
    assert capsys.readouterr().err == "slimpack train: error: needs torch: pip install 'slimpack[train]'\n"
