"""Configuration: one frozen dataclass per concern, built once from file, environment, flags.

Precedence, lowest to highest: the dataclass defaults, a TOML file section
(``[cloud]``, ``[edge]``, ...), environment variables ``TANDEM_<SECTION>_<FIELD>``, then
command-line flags that were given explicitly. Values are converted to the field's type;
a value that does not convert is a :class:`ConfigError` naming its source.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing or malformed."""


def load_config(
    cls: type[T],
    section: str,
    *,
    defaults: Mapping[str, Any] | None = None,
    file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> T:
    """Build ``cls`` (a dataclass) from defaults, ``file[section]``, environment and flags.

    ``defaults`` override the dataclass's own defaults for one caller (a command's
    defaults); ``flags`` holds only values the user gave (``None`` = not given, skipped).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = dict(defaults or {})
    if file is not None:
        try:
            table = tomllib.loads(Path(file).read_text(encoding="utf-8")).get(section, {})
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"cannot read config file {file}: {error}") from error
        for key, raw in table.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ConfigError(f"{file}: unknown key [{section}] {key}")
            values[name] = _convert(raw, hints[name], f"{file} [{section}] {key}")
    environ = os.environ if environ is None else environ
    prefix = f"TANDEM_{section.upper()}_"
    for key, raw in environ.items():
        if key.startswith(prefix):
            name = key[len(prefix) :].lower()
            if name in fields:
                values[name] = _convert(raw, hints[name], f"environment {key}")
    for name, raw in (flags or {}).items():
        if raw is not None and name in fields:
            values[name] = _convert(raw, hints[name], f"--{name.replace('_', '-')}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from error


def _convert(raw: Any, hint: Any, source: str) -> Any:
    """Convert ``raw`` (a TOML value or a string) to the annotated type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        is_none = raw is None or (isinstance(raw, str) and raw.lower() in ("", "none"))
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(raw, inner[0], source)
    if origin is typing.Literal:
        if raw not in args:
            raise ConfigError(f"{source}: {raw!r} is not one of {', '.join(map(str, args))}")
        return raw
    if origin is tuple:
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        return tuple(_convert(item.strip() if isinstance(item, str) else item, args[0], source) for item in items)
    try:
        if hint is bool:
            if isinstance(raw, str):
                if raw.lower() in ("1", "true", "yes", "on"):
                    return True
                if raw.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(raw)
            return bool(raw)
        if hint is Path:
            return Path(raw)
        if hint in (int, float, str):
            return hint(raw)
    except ValueError as error:
        raise ConfigError(f"{source}: cannot read {raw!r} as {hint.__name__}") from error
    return raw
