"""The one-shot merge experiment with extra rows whose matching cost scores BatchNorm statistics.

    python -m fedmerge.bench.old_cost [fedmerge merge-experiment arguments]

In earlier versions, BatchNorm running means and variances counted in the weight-space matching
cost (Git Re-Basin's, MuDSC's ``S_weight``) as if they were weights. This runs
``fedmerge merge-experiment`` with the same arguments and adds, on the *same* trained pairs,
the weight-matching, dual (every ``--betas`` value) and ``beta=auto`` rows with that old cost
(``fedmerge.matching.weights.scored`` counting every entry while the row merges), labelled
``(old cost)``. A before/after table from one run: the models are trained once.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence

from ..experiments import one_shot
from ..experiments.one_shot import MergeSite, StateDict
from ..matching import weights
from .one_shot_rows import run_with_rows

OLD = " (old cost)"


@contextlib.contextmanager
def old_cost() -> Iterator[None]:
    """Score every permuted entry (running statistics included) inside the block."""
    current = weights.scored
    weights.scored = lambda tensor: True
    try:
        yield
    finally:
        weights.scored = current


def _with_old_cost(method: Callable[[MergeSite], StateDict]) -> Callable[[MergeSite], StateDict]:
    def run(site: MergeSite) -> StateDict:
        with old_cost():
            return method(site)

    return run


def old_cost_rows(betas: Sequence[float]) -> dict[str, Callable[[MergeSite], StateDict]]:
    """The rows whose merge reads the weight-space cost, each run with the old cost."""
    rows = one_shot.merge_methods(betas)
    names = ["weight matching", *(f"dual (MuDSC) beta={b:g}" for b in betas)]
    names.append("dual (MuDSC) beta=auto")
    return {name + OLD: _with_old_cost(rows[name]) for name in names}


def main(argv: Sequence[str] | None = None) -> int:
    return run_with_rows(old_cost_rows, argv)


if __name__ == "__main__":
    sys.exit(main())
