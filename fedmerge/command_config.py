"""The run-config of a command line, and a warning for the keys a command never reads.

``fedmerge run`` hands every key to the Flower apps, but the experiment commands
(``merge-experiment``, ``connectivity``, ``partitions``, ``analyse``) read only some: before
this, ``fedmerge merge-experiment num-rounds=50`` ran and ignored ``num-rounds`` silently.
:func:`command_config` gives such a command a config that records which keys it reads
(reads made by :mod:`fedmerge.config` itself, validation and ``to_mapping``, do not count), and
:func:`warn_unused`, on the command's normal exit, warns about every ``key=value`` of the
command line it never read.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Mapping
from dataclasses import fields
from types import FrameType
from typing import Any

from . import config as _config_module
from .config import RunConfig, key_to_field, load_toml, parse_overrides

log = logging.getLogger("fedmerge")

_FIELDS = frozenset(f.name for f in fields(RunConfig))
_CONFIG_FILE = _config_module.__file__
#: Direct reads from these do not count: dataclasses (``replace``) and the methods dataclasses
#: generate (``__eq__``, ``__hash__``, ``__repr__``: their code has no file).
_MACHINERY = frozenset({dataclasses.__file__, "<string>"})
#: RunConfig's properties (``hidden_sizes``): they hand a key's value to their caller, so a read
#: made inside one is the caller's use of the key, not validation's.
_VIEWS = frozenset(name for name, value in vars(RunConfig).items() if isinstance(value, property))


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The config of ``--config FILE`` and the ``key=value`` overrides (which win)."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_toml(args.config))
    values.update(parse_overrides(getattr(args, "overrides", None) or []))
    return RunConfig.from_mapping(values)


def _not_a_use() -> bool:
    """Whether the read being recorded comes from dataclass machinery or fedmerge.config
    (validation, ``to_mapping``; a read inside one of its properties is the caller's use)."""
    # 0: here, 1: _record, 2: __getattribute__, 3: the reader
    reader = sys._getframe(3)
    if reader.f_code.co_filename in _MACHINERY:
        return True
    frame: FrameType | None = reader
    while frame is not None:
        if frame.f_code.co_filename == _CONFIG_FILE:
            return frame.f_code.co_name not in _VIEWS
        frame = frame.f_back
    return False


def watched(cfg: RunConfig) -> tuple[RunConfig, set[str]]:
    """A copy of ``cfg`` that records the fields read from it, and the set it records into.

    Copies made with ``replace`` record into the same set. Reads from inside
    :mod:`fedmerge.config` (validation, ``to_mapping``) are not recorded.
    """
    read: set[str] = set()

    class Watched(RunConfig):
        def __getattribute__(self, name: str) -> Any:
            if name in _FIELDS:
                _record(name)
            return super().__getattribute__(name)

    def _record(name: str) -> None:
        if not _not_a_use():
            read.add(name)

    Watched.__name__ = Watched.__qualname__ = "RunConfig"
    values = {name: object.__getattribute__(cfg, name) for name in _FIELDS}
    return Watched(**values), read


def unused_keys(overrides: Mapping[str, object], read: set[str]) -> list[str]:
    """The override keys whose field was never read, as written on the command line."""
    return [key for key in overrides if key_to_field(key) not in read]


def command_config(args: argparse.Namespace) -> tuple[RunConfig, set[str]]:
    """The command's config, watched (:func:`watched`), and the set of fields it reads."""
    return watched(config_from_args(args))


def warn_unused(command: str, args: argparse.Namespace, read: set[str]) -> list[str]:
    """Warn about every ``key=value`` of the command line whose key ``command`` never read
    (call on the command's normal exit); returns those keys."""
    overrides = parse_overrides(getattr(args, "overrides", None) or [])
    keys = unused_keys(overrides, read)
    for key in keys:
        log.warning("%s does not use %s=%s: the key was ignored", command, key, overrides[key])
    return keys


def config_args(p: argparse.ArgumentParser) -> None:
    """The arguments every command that reads a run-config takes: ``--config FILE`` and
    ``key=value`` overrides."""
    p.add_argument("--config", help="TOML file of run-config keys (or a pyproject.toml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="run-config overrides")
