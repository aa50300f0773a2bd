"""Typed configs from TOML with command-line overrides; precedence: CLI > file > defaults.

Each stage defines one frozen dataclass (nested dataclasses for sections: `[optim]` for train,
`[tokenize]` for tokenize). `load_config` builds it from a TOML file and `--set section.key=value`
overrides (`optim.lr=3e-4`, `tokenize.text_field=body`), refusing unknown keys by name and a
section's key given without its section with the spelling to use.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def parse_value(text: str) -> Any:
    """A TOML literal (`3e-4`, `true`, `[1, 2]`, `"x"`), or the bare string if it is not one."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: Iterable[str], cls: type | None = None) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> nested dict. With the config class `cls`, a key that is no top-level
    field of it but a key of one of its sections (`text_field` for `tokenize.text_field`) is
    refused with the sectioned spelling."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value (for example optim.lr=3e-4)")
        if cls is not None:
            _check_section(cls, key.strip(), value)
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = parse_value(value.strip())
    return out


def _check_section(cls: type, key: str, value: str) -> None:
    if "." in key or key in {f.name for f in dataclasses.fields(cls)}:
        return
    hints = typing.get_type_hints(cls)
    sections = [f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])
                and key in {g.name for g in dataclasses.fields(hints[f.name])}]
    if sections:
        spelled = " or ".join(f"--set {section}.{key}={value}" for section in sections)
        raise ValueError(f"--set {key}={value}: name the key's section: {spelled}")


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, where)
    if origin is tuple:
        return tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a (nested) mapping, by field name."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where or cls.__name__}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"{where or cls.__name__}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        sub = f"{where}.{key}" if where else key
        default = next(f for f in dataclasses.fields(cls) if f.name == key)
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, Mapping):
            base = (dataclasses.asdict(default.default_factory())
                    if default.default_factory is not dataclasses.MISSING else {})
            value = _merge(base, value)
        kwargs[key] = _coerce(hints[key], value, sub)
    return cls(**kwargs)


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None) -> T:
    """Defaults, then the TOML file, then overrides."""
    data: dict[str, Any] = {}
    if path:
        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as err:
                raise ValueError(f"{path}: invalid TOML ({err})") from err
    return from_dict(cls, _merge(data, overrides or {}))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
