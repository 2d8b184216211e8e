"""One dataclass config per command: TOML file + typed `--set section.key=value` overrides.

Unknown sections or keys are errors; values are parsed as TOML literals and checked against the
field's type; the resolved config is written next to the outputs (`config.resolved.toml`).
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, TypeVar

from drm_core import DRMError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, published as tomli
    import tomli as tomllib

C = TypeVar("C")


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Defaults <- TOML file <- overrides, validated against the dataclass tree of `cls`."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise DRMError(f"config {path}: cannot read TOML ({err})") from err
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DRMError(f"--set {item!r}: expected section.key=value")
        *sections, leaf = key.strip().split(".")
        node = data
        for s in sections:
            node = node.setdefault(s, {})
        node[leaf] = _parse_value(raw.strip())
    return _build(cls, data, str(path) if path else "config")


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # bare strings need no quotes on the command line


def _build(cls: type[C], data: dict[str, Any], where: str) -> C:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise DRMError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise DRMError(f"{where}.{name}: expected a table of settings, got {value!r}")
            kwargs[name] = _build(hint, value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}.{name}")
    for name, f in fields.items():
        if name not in kwargs and dataclasses.is_dataclass(hints[name]) and f.default_factory is dataclasses.MISSING:
            kwargs[name] = hints[name]()
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except DRMError as err:
                errors.append(str(err))
        raise DRMError(f"{where}: {value!r} does not match {hint}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise DRMError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise DRMError(f"{where}: expected true/false, got {value!r}")
    if hint in (int, float, str) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise DRMError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def to_toml(config: Any) -> str:
    """Serialise a config dataclass tree as TOML (tables for nested dataclasses)."""
    top, tables = [], []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            tables.append((f.name, value))
        elif value is not None:
            top.append(f"{f.name} = {_toml_value(value)}")
    out = "\n".join(top) + ("\n" if top else "")
    for name, value in tables:
        out += f"\n[{name}]\n{to_toml(value)}"  # configs are two levels deep: sections of scalars
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def save_resolved(config: Any, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "config.resolved.toml"
    path.write_text(to_toml(config))
    return path
