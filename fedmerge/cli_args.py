"""Command-line helpers shared by ``fedmerge`` (:mod:`fedmerge.cli`) and ``fedmerge analyse``
(:mod:`fedmerge.commands.analyse`): comma-separated numbers, and ``key=value`` overrides
mixed with options.

Imports neither torch nor rich: the parsers that use it stay fast.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Sequence

from .errors import FedmergeError

#: A run-config override on the command line: ``key=value``.
OVERRIDE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*=")


def flag_error(flag: str, text: str, allowed: str) -> FedmergeError:
    """``--flag: got 'text'; allowed: ...``: the error of a bad option value."""
    return FedmergeError(f"{flag}: got {text!r}; allowed: {allowed}")


def floats(
    text: str,
    flag: str,
    *,
    positive: bool = False,
    example: str = "",
    error: Callable[[str, str, str], FedmergeError] = flag_error,
) -> list[float]:
    """The numbers of ``text`` (``"0,1,100"``), the value of option ``flag``.

    Parameters
    ----------
    text : str
        Comma-separated numbers.
    flag : str
        The option, named in the error.
    positive : bool
        Refuse a number that is not finite and > 0 ("comma-separated numbers > 0").
    example : str
        Shown in the error for text that is not numbers ("comma-separated numbers, e.g. ...").
    error : callable
        Builds the error from ``(flag, text, allowed)``: :func:`flag_error` (default), or
        :class:`fedmerge.errors.ConfigError` for ``config key '--flag': ...``.

    Raises
    ------
    FedmergeError
        As built by ``error``.
    """
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        allowed = "comma-separated numbers" + (f", e.g. {example}" if example else "")
        raise error(flag, text, allowed) from None
    if positive and any(not math.isfinite(v) or v <= 0 for v in values):
        raise error(flag, text, "comma-separated numbers > 0")
    return values


def value_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of ``parser`` and of its sub-commands (at any depth) that takes a
    value (``--out``, not ``-q``)."""
    found: set[str] = set()
    seen: set[int] = set()

    def visit(p: argparse.ArgumentParser) -> None:
        if id(p) in seen:
            return
        seen.add(id(p))
        for action in p._actions:
            if action.option_strings and action.nargs != 0:
                found.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    visit(sub)

    visit(parser)
    return found


def overrides_last(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` with its ``key=value`` tokens moved after everything else, in their order, so
    that they may be mixed freely with options (``fedmerge run num-rounds=1 -q
    dataset=mnist``): argparse wants the positionals of a command together. A token that is
    the value of an option of ``parser`` (``--out a=b``) stays where it is."""
    takes_value = value_options(parser)
    rest: list[str] = []
    overrides: list[str] = []
    for i, token in enumerate(argv):
        if OVERRIDE.match(token) and not (i and argv[i - 1] in takes_value):
            overrides.append(token)
        else:
            rest.append(token)
    return rest + overrides
