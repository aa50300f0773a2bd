"""One `--set SECTION.KEY=VALUE` convention and one config loader for tokenize and train."""

from __future__ import annotations

import pytest

from slimpack.cli import build_parser, main


def _error_lines(capsys: pytest.CaptureFixture) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_tokenize_takes_its_settings_by_section(tmp_path):
    from slimpack.tokenize.cli import load_tokenize_config

    config = tmp_path / "tokenize.toml"
    config.write_text('[tokenize]\ntext_field = "body"\nblock_tokens = 4096\n')
    args = build_parser().parse_args(
        ["tokenize", "in", "--out", "out", "--config", str(config), "--set", "tokenize.block_tokens=1024"])
    cfg = load_tokenize_config(args)
    assert (cfg.text_field, cfg.block_tokens) == ("body", 1024)


@pytest.mark.parametrize(("argv", "old", "new"), [
    (["tokenize", "in", "--out", "out"], "text_field=body", "--set tokenize.text_field=body"),
    (["tokenize", "in", "--out", "out"], "block_tokens=1024", "--set tokenize.block_tokens=1024"),
    (["train"], "lr=3e-4", "--set optim.lr=3e-4"),
    (["train"], "path=/shards/slimpajama", "--set data.path=/shards/slimpajama or --set eval.path=/shards/slimpajama"),
])
def test_a_key_without_its_section_is_refused_with_the_spelling_to_use(argv, old, new, capsys):
    assert main([*argv, "--set", old]) == 2
    assert _error_lines(capsys) == [f"slimpack {argv[0]}: error: --set {old}: name the key's section: {new}"]


def test_top_level_keys_and_unknown_keys_keep_their_meaning(capsys):
    from slimpack.train.config import load_train_config

    cfg = load_train_config(None, ["max_steps=3", "device=cpu", "optim.warmup_steps=1"])
    assert (cfg.max_steps, cfg.device, cfg.optim.warmup_steps) == (3, "cpu", 1)
    assert main(["tokenize", "in", "--out", "out", "--set", "blok_tokens=5"]) == 2
    assert _error_lines(capsys) == [
        "slimpack tokenize: error: TokenizeSettings: unknown key(s) ['blok_tokens']; valid keys: ['tokenize']"]
    assert main(["tokenize", "in", "--out", "out", "--set", "tokenize=5", "--block-tokens", "9"]) == 2
    assert _error_lines(capsys) == [
        "slimpack tokenize: error: --set tokenize=...: set its keys, for example --set tokenize.block_tokens=32768"]
