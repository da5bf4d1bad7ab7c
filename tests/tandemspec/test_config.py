"""Configuration precedence: defaults < file < environment < flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from tandemspec.config import ConfigError, load_config


@dataclass(frozen=True)
class Example:
    port: int = 1
    rate: float = 0.5
    name: str = "a"
    enabled: bool = False
    mode: Literal["x", "y"] = "x"
    path: Path | None = None
    ports: tuple[int, ...] = ()


def test_defaults_without_sources() -> None:
    assert load_config(Example, "example", environ={}) == Example()


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text('[example]\nport = 2\nrate = 1.5\nname = "file"\nmode = "y"\n')
    environ = {"TANDEM_EXAMPLE_PORT": "3", "TANDEM_EXAMPLE_ENABLED": "true", "OTHER": "z"}
    config = load_config(Example, "example", file=file, environ=environ, flags={"port": 4, "name": None})
    assert config == Example(port=4, rate=1.5, name="file", enabled=True, mode="y")


def test_types_are_converted(tmp_path: Path) -> None:
    environ = {"TANDEM_EXAMPLE_PATH": "/tmp/x", "TANDEM_EXAMPLE_PORTS": "1, 2,3"}
    config = load_config(Example, "example", environ=environ)
    assert config.path == Path("/tmp/x") and config.ports == (1, 2, 3)


@pytest.mark.parametrize(
    "environ, fragment",
    [
        ({"TANDEM_EXAMPLE_PORT": "many"}, "TANDEM_EXAMPLE_PORT"),
        ({"TANDEM_EXAMPLE_MODE": "z"}, "not one of"),
        ({"TANDEM_EXAMPLE_ENABLED": "perhaps"}, "TANDEM_EXAMPLE_ENABLED"),
    ],
)
def test_bad_values_name_their_source(environ: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(Example, "example", environ=environ)


def test_unknown_file_key_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text("[example]\nprot = 2\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(Example, "example", file=file, environ={})


def test_caller_defaults_sit_below_file_and_flags(tmp_path: Path) -> None:
    assert load_config(Example, "example", defaults={"port": 7}, environ={}).port == 7
    file = tmp_path / "c.toml"
    file.write_text("[example]\nport = 8\n")
    assert load_config(Example, "example", defaults={"port": 7}, file=file, environ={}).port == 8
