"""NP Merge's per-merge report (what a merge did: problems, steps, losses, memory); its options,
the np-* keys, are :class:`fedmerge.options.NPOptions`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["NPReport"]


# Held-out loss and proxy-loss evaluation batch (no gradients, so memory is small).
_EVAL_BATCH = 1024


@dataclass
class NPReport:
    """What one NP merge did (logs and round metrics).

    Attributes
    ----------
    seconds : float
        Wall time of coefficient learning (alignment excluded).
    match_seconds, units_moved : float
        Alignment wall time, and the fraction of units it moved (mean over matchings).
    problems, steps, epochs : int
        Learning problems solved (N - 1 pairwise, 1 softmax), Adam steps and epochs in all.
    loss_start, loss_end : float
        Mean cross-entropy on all merge-site data of the aligned weighted average and of the
        merged model (before BN repair, in the learning BatchNorm mode).
    holdout_starts, holdout_ends : list of float
        Per learning problem, in the order solved: the same on its held-out part at the start
        and the best reached (NaN without hold-out).
    state_bytes : int
        Bytes of the tensors one learning problem holds at once (counted, not sampled): the
        models' tensors, logits, gradients, two Adam moments and one merged copy. Activations
        are not counted. The largest problem's.
    peak_cuda_bytes : int
        ``torch.cuda.max_memory_allocated`` over the whole merge on a CUDA device, else 0.
    """

    seconds: float = 0.0
    match_seconds: float = 0.0
    units_moved: float = 0.0
    problems: int = 0
    steps: int = 0
    epochs: int = 0
    loss_start: float = math.nan
    loss_end: float = math.nan
    holdout_starts: list[float] = field(default_factory=list)
    holdout_ends: list[float] = field(default_factory=list)
    state_bytes: int = 0
    peak_cuda_bytes: int = 0
