"""The one-shot merge experiment with MuDSC's matching as fedmerge ran it before it followed
MuDSC's code, next to how it runs now, on the same trained pairs.

    python -m fedmerge.bench.mudsc_changes [fedmerge merge-experiment arguments]

Runs ``fedmerge merge-experiment`` with the same arguments and adds rows (one run, so the
models are trained once and every row merges the same pairs):

- ``activation matching (own BN stats)`` and ``dual (MuDSC) beta=B (own BN stats)`` for every
  ``--betas`` value: activations read through each model's own BatchNorm statistics (the
  default rows now recompute them on the merge-site inputs first, as MuDSC's code does; on
  models without BatchNorm the two are the same merge);
- ``dual (MuDSC) beta=auto (5 betas, loss, own BN stats)``: the earlier selection, beta in
  0.1, 0.3, 0.5, 0.7, 0.9 by the lowest merge-site cross-entropy (the default row now tries
  MuDSC's 0.9, 0.8, ..., 0.1 and keeps the highest merge-site accuracy);
- ``dual (MuDSC) beta=auto (9 betas, loss)``: MuDSC's grid by the loss, to separate the grid's
  effect from the criterion's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import partial

from ..experiments import one_shot
from ..experiments.one_shot import MergeSite, StateDict
from .one_shot_rows import run_with_rows

#: The grid ``match-beta = auto`` tried before it followed MuDSC's code.
EARLIER_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)
OWN = " (own BN stats)"


def earlier_rows(betas: Sequence[float]) -> dict[str, Callable[[MergeSite], StateDict]]:
    """The rows as fedmerge matched before (see the module docstring)."""
    average = one_shot._aligned_average
    rows: dict[str, Callable[[MergeSite], StateDict]] = {
        "activation matching" + OWN: partial(average, matcher="activation", reset_batchnorm=False)
    }
    for beta in betas:
        rows[f"dual (MuDSC) beta={beta:g}" + OWN] = partial(
            average, matcher="dual", beta=beta, reset_batchnorm=False
        )
    auto = one_shot._auto_beta_average
    rows["dual (MuDSC) beta=auto (5 betas, loss, own BN stats)"] = partial(
        auto, grid=EARLIER_GRID, criterion="loss", reset_batchnorm=False
    )
    rows["dual (MuDSC) beta=auto (9 betas, loss)"] = partial(auto, criterion="loss")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    return run_with_rows(earlier_rows, argv)


if __name__ == "__main__":
    sys.exit(main())
