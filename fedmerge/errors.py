"""Errors that fedmerge reports to users as one clear message (never a traceback)."""

from __future__ import annotations

from collections.abc import Iterable


class FedmergeError(Exception):
    """Base class: the CLI prints its message and exits with status 2."""


class ConfigError(FedmergeError, ValueError):
    """A configuration value is wrong: names the key, the value and what is allowed.

    Parameters
    ----------
    key : str
        The run-config key (as written in ``pyproject.toml`` / ``key=value``).
    value : object
        The offending value.
    allowed : str
        What would be accepted, in words (``"a float > 0"``, ``"one of: a, b"``).
    hint : str, optional
        One more sentence on how to fix it.
    """

    def __init__(self, key: str, value: object, allowed: str, hint: str | None = None):
        self.key, self.value, self.allowed, self.hint = key, value, allowed, hint
        msg = f"config key '{key}': got {value!r}; allowed: {allowed}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)


class DatasetNotFoundError(FedmergeError, FileNotFoundError):
    """A dataset's files are missing; the message says how to get them."""


def unknown_name(key: str, value: object, choices: Iterable[str]) -> ConfigError:
    """Build the error for a name that is not in a registry, listing the valid ones."""
    return ConfigError(key, value, "one of: " + ", ".join(sorted(choices)))
