"""``fedmerge merge-experiment`` with extra rows on the same trained pairs: the runner of the
one-shot before/after script (``mudsc_changes``), for any later one."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from ..experiments import one_shot
from ..experiments.one_shot import MergeSite
from ..permutations import StateDict

Rows = dict[str, Callable[[MergeSite], StateDict]]


def _betas(argv: Sequence[str]) -> list[float]:
    from ..cli import build_parser
    from ..cli_args import floats

    args = build_parser().parse_args(["merge-experiment", *argv])
    return floats(args.betas, "--betas")


def run_with_rows(rows_for: Callable[[Sequence[float]], Rows], argv: Sequence[str] | None) -> int:
    """Run ``fedmerge merge-experiment`` with ``argv`` (the command line when None) and the rows
    ``rows_for(--betas values)`` gives, added for this run only."""
    from ..cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = rows_for(_betas(argv))
    one_shot.EXTRA_METHODS.update(extra)
    try:
        return cli_main(["merge-experiment", *argv])
    finally:
        for name in extra:
            one_shot.EXTRA_METHODS.pop(name, None)
