"""Removed: ``python -m fedmerge.bench.sweep`` was a second grid runner; ``fedmerge bench``
(:mod:`fedmerge.bench.grid`) is the one runner now.

It reads the same specs (seeds, ``[base]``, ``[partitions.*]``, ``[variants.*]``) into the same
folder layout (``DIR/<partition>/<variant>/s<seed>``), so it resumes a folder the sweep
started, and rebuilds the report of one::

    python -m fedmerge.bench.sweep SPEC.toml --out DIR [--jobs N]   (was)
    fedmerge bench SPEC.toml --out DIR [--jobs N]                   (now)

    python -m fedmerge.bench.sweep SPEC.toml --out DIR --report-only
    fedmerge bench SPEC.toml --out DIR --report

This module only says so: it runs nothing.
"""

from __future__ import annotations

import shlex
import sys


def equivalent(argv: list[str]) -> str:
    """The ``fedmerge bench`` command of a sweep command line (``--report-only`` becomes
    ``--report``)."""
    args = ["--report" if a == "--report-only" else a for a in argv]
    return shlex.join(["fedmerge", "bench", *args])


def main(argv: list[str] | None = None) -> int:
    """Say that the sweep runner is gone and which command replaces this one; exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    print(
        "error: python -m fedmerge.bench.sweep was removed; fedmerge bench runs the same specs "
        f"into the same folders: {equivalent(argv or ['SPEC.toml', '--out', 'DIR'])}",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
