"""The shipped tokenize config is the defaults, and overrides and bad keys behave."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from slimpack.tokenize.cli import load_tokenize_config
from slimpack.tokenize.config import TokenizeConfig

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tokenize" / "slimpajama.toml"


def _args(**kw) -> argparse.Namespace:
    base = {"config": None, "set": [], "block_tokens": None, "on_bad_record": None, "no_compression": False}
    return argparse.Namespace(**{**base, **kw})


def test_shipped_config_equals_defaults():
    assert load_tokenize_config(_args(config=str(CONFIG))) == TokenizeConfig()


def test_precedence_flags_over_set_over_file():
    cfg = load_tokenize_config(_args(config=str(CONFIG), set=["tokenize.block_tokens=1024", "tokenize.text_field=body"],
                                     on_bad_record="fail", no_compression=True))
    assert (cfg.block_tokens, cfg.text_field, cfg.on_bad_record, cfg.compression) == (1024, "body", "fail", None)
    assert load_tokenize_config(_args(set=["tokenize.block_tokens=1024"], block_tokens=2048)).block_tokens == 2048


def test_bad_settings_name_the_key_and_the_fix():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['blok_tokens'\]"):
        load_tokenize_config(_args(set=["tokenize.blok_tokens=5"]))
    with pytest.raises(ValueError, match="on_bad_record must be 'skip' or 'fail'"):
        TokenizeConfig(on_bad_record="ignore")
    with pytest.raises(ValueError, match="unsupported compression"):
        TokenizeConfig(compression="gzip")
