"""The tokenize job's configuration: what decides a part's bytes, and what `--config`/`--set` set."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from slimpack.shards import mds, schema


@dataclass(frozen=True)
class TokenizeConfig:
    """Everything that decides a part's bytes (plus the bad-record policy)."""

    text_field: str = "text"
    source_field: str = "meta.redpajama_set_name"
    default_source: str = "unknown"
    block_tokens: int = schema.DEFAULT_BLOCK_TOKENS
    shard_size_limit: int = schema.DEFAULT_SHARD_SIZE_LIMIT
    compression: str | None = schema.DEFAULT_COMPRESSION
    hashes: tuple[str, ...] = schema.DEFAULT_HASHES
    on_bad_record: str = "skip"
    bad_examples: int = 5

    def __post_init__(self) -> None:
        if self.on_bad_record not in ("skip", "fail"):
            raise ValueError(f"on_bad_record must be 'skip' or 'fail', not {self.on_bad_record!r}")
        if self.block_tokens < 1:
            raise ValueError(f"block_tokens must be positive, not {self.block_tokens}")
        if self.compression in ("", "none"):
            object.__setattr__(self, "compression", None)
        mds.compress(self.compression, b"")  # refuses unknown compression names early


@dataclass(frozen=True)
class TokenizeSettings:
    """What `--config FILE` and `--set` configure: the file's `[tokenize]` table, whose keys
    `--set tokenize.KEY=VALUE` overrides (configs/tokenize/slimpajama.toml)."""

    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)


def config_dict(cfg: TokenizeConfig) -> dict[str, Any]:
    """The config as a part's stats.json and the manifest record it."""
    d = dataclasses.asdict(cfg)
    d["hashes"] = list(cfg.hashes)
    return d
