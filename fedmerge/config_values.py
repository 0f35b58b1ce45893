"""Reading run-config values: TOML files, ``key=value`` arguments, and typing them per field."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

from .errors import ConfigError

# Values Flower accepts in a run-config (``flwr.common.typing.UserConfigValue``).
ConfigValue = bool | int | float | str


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read run-config keys from a TOML file.

    Accepts either a flat file of ``key = value`` lines or a ``pyproject.toml`` (whose
    ``[tool.flwr.app.config]`` table is used).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", str(path), "an existing TOML file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", str(path), "valid TOML", str(exc)) from None
    table = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    return dict(table) if table is not None else data


def parse_cli_value(text: str) -> ConfigValue:
    """Parse the value of a ``key=value`` argument as TOML, falling back to a bare string.

    ``lr=0.1`` gives a float, ``download=true`` a bool, ``dataset=mnist`` the string.
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict[str, ConfigValue]:
    """Parse ``["key=value", ...]`` (the form of ``flwr run --run-config``) into a dict."""
    out: dict[str, ConfigValue] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(item, item, "key=value pairs, e.g. num-rounds=5")
        out[key.strip()] = parse_cli_value(text.strip())
    return out


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def coerce(key: str, value: Any, type_name: Any) -> Any:
    """``value`` as the field type ``type_name`` (its annotation), or a ConfigError for ``key``."""
    if str(type_name) == "float | str":  # a number, or the word "auto"
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, str) and isinstance(parse_cli_value(value), str):
            raise ConfigError(key, value, "a number, or auto")
        return coerce(key, value, "float")
    kind = {"int": int, "float": float, "bool": bool, "str": str}[str(type_name)]
    if isinstance(value, str) and kind is not str:
        value = parse_cli_value(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):  # nan / inf pass every range check below
                raise ConfigError(key, value, "a finite number")
            return float(value)
    elif isinstance(value, str):
        return value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        # `run-name=2024` or `mlp-hidden=100` arrive as numbers from TOML / Flower.
        return str(value)
    raise ConfigError(key, value, _TYPE_WORDS[kind])
