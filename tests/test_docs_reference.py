"""The user guide's run-config reference stays complete and true to ``pyproject.toml``.

Every key of ``[tool.flwr.app.config]`` must have a row in the "Run-config reference" section
of ``docs/user-guide.md`` (a table whose header starts ``| key | default |``), with its default
as pyproject writes it; and the reference must list no key pyproject lacks. Defaults are
compared as values, not as text: the cell's text (backticks stripped) is read as a TOML value,
so ``0.00001`` and ``1e-05`` agree, and a bare word (``weight``) is taken as the string it
names, as ``fedmerge run key=value`` does. Numbers compare by value, booleans and strings only
with their own kind.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "user-guide.md"
SECTION = "## Run-config reference"
_ROW = re.compile(r"^\|\s*`([^`|]+)`\s*\|([^|]*)\|")


def pyproject_config() -> dict:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return data["tool"]["flwr"]["app"]["config"]


def reference_section(text: str) -> str:
    """The text of the reference section: from its heading to the next ``## `` heading."""
    start = text.index(SECTION + "\n")
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end != -1 else len(text)]


def reference_rows(section: str) -> list[tuple[str, str]]:
    """``(key, default cell)`` of every row of the section's ``| key | default |`` tables."""
    rows: list[tuple[str, str]] = []
    in_table = False
    for line in section.splitlines():
        cells = (
            [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        )
        if not cells:
            in_table = False
        elif cells[:2] == ["key", "default"]:
            in_table = True
        elif in_table and not set(line) <= set("|-: "):
            match = _ROW.match(line)
            assert match, f"a reference row without a `key` in its first cell: {line!r}"
            rows.append((match.group(1).strip(), match.group(2).strip()))
    return rows


def parse_default(cell: str) -> object:
    """The value a default cell shows: ``0.01``, ``true``, ``"weight"`` or ``weight``."""
    text = cell.strip()
    if not (text.startswith("`") and text.endswith("`") and len(text) >= 2):
        raise ValueError(f"default cell {cell!r} is not one `code` value")
    text = text[1:-1].strip()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: the string it names


def same_value(documented: object, actual: object) -> bool:
    """Equal values of the same kind (bool, number, string); numbers compare by value."""

    def kind(v: object) -> str:
        if isinstance(v, bool):
            return "bool"
        if isinstance(v, int | float):
            return "number"
        return type(v).__name__

    if kind(documented) != kind(actual):
        return False
    if kind(actual) == "number":
        return math.isclose(float(documented), float(actual), rel_tol=1e-12, abs_tol=0.0)  # type: ignore[arg-type]
    return documented == actual


def guide_rows() -> list[tuple[str, str]]:
    return reference_rows(reference_section(GUIDE.read_text()))


def test_the_reference_has_rows():
    # Guards the parser itself: a format change that finds nothing must not pass silently.
    assert len(guide_rows()) >= 50


def test_every_pyproject_key_is_in_the_reference():
    documented = {key for key, _ in guide_rows()}
    missing = [key for key in pyproject_config() if key not in documented]
    assert not missing, f"keys of pyproject.toml missing from the user guide's reference: {missing}"


def test_the_reference_lists_no_stale_key():
    config = pyproject_config()
    stale = [key for key, _ in guide_rows() if key not in config]
    assert not stale, f"the user guide's reference lists keys pyproject.toml lacks: {stale}"


def test_no_key_is_listed_twice():
    keys = [key for key, _ in guide_rows()]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    assert not twice, f"keys listed more than once in the reference: {twice}"


def test_every_default_matches_pyproject():
    config = pyproject_config()
    wrong = []
    for key, cell in guide_rows():
        if key not in config:
            continue  # reported by test_the_reference_lists_no_stale_key
        try:
            documented = parse_default(cell)
        except ValueError as exc:
            wrong.append(f"{key}: {exc}")
            continue
        if not same_value(documented, config[key]):
            wrong.append(f"{key}: guide {cell}, pyproject {config[key]!r}")
    assert not wrong, "defaults that differ from pyproject.toml:\n" + "\n".join(wrong)


@pytest.mark.parametrize(
    ("cell", "actual", "equal"),
    [
        ("`0.01`", 0.01, True),
        ("`1e-5`", 0.00001, True),
        ("`0.00001`", 1e-05, True),
        ("`0`", 0.0, True),
        ("`true`", True, True),
        ("`true`", 1, False),
        ("`1`", True, False),
        ('`"weight"`', "weight", True),
        ("`weight`", "weight", True),
        ('`""`', "", True),
        ('`"0.5"`', 0.5, False),
        ("`0.5`", "0.5", False),
        ("`0.02`", 0.01, False),
        ('`"200,200"`', "200,200", True),
    ],
)
def test_default_comparison(cell, actual, equal):
    assert same_value(parse_default(cell), actual) is equal


def test_parser_reads_tables_of_the_section_only():
    text = "\n".join(
        [
            "## Run-config reference",
            "",
            "| key | default | allowed | meaning |",
            "|---|---|---|---|",
            "| `seed` | `0` | int | the seed |",
            "",
            "| file | content |",
            "|---|---|",
            "| `model.pt` | not a key |",
            "",
            "## Engines",
            "| key | default |",
            "|---|---|",
            "| `later` | `1` |",
        ]
    )
    assert reference_rows(reference_section(text)) == [("seed", "`0`")]
