"""NP Merge's options (the np-* run-config keys) and its per-merge report."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..errors import ConfigError, unknown_name
from ..options import Options

State = Mapping[str, Tensor]

NP_FORMS = ("pairwise", "softmax")
NP_ALIGNS = ("reference", "running")
NP_INITS = ("weights", "uniform")
NP_PARAMS = ("all", "weights")
NP_BN_MODES = ("train", "eval")
# Held-out loss and proxy-loss evaluation batch (no gradients, so memory is small).
_EVAL_BATCH = 1024


@dataclass(frozen=True)
class NPOptions(Options):
    """NP Merge's hyper-parameters (run-config keys ``np-*``; the module docstring has why).

    Raises
    ------
    ConfigError
        Naming the ``np-*`` key of a bad value.
    """

    PREFIX: ClassVar[str] = "np"

    form: str = "pairwise"  # np-form: pairwise (paper) | softmax (N-way, our extension)
    align: str = "reference"  # np-align: reference (match-reference) | running (pairwise)
    init: str = "weights"  # np-init: weights (data-size shares) | uniform (a = 0)
    params: str = "all"  # np-params: all floating parameters | weights (>= 2-D) only
    lr: float = 1e-2  # np-lr: Adam learning rate of the logits
    epochs: int = 10  # np-epochs: most epochs over the fitting part (0 = no learning)
    batch_size: int = 64  # np-batch-size: samples per Adam step
    holdout: float = 0.2  # np-holdout: share held out for early stopping, in [0, 1)
    patience: int = 3  # np-patience: epochs without held-out improvement before stopping
    bn_mode: str = "train"  # np-bn-mode: train (batch statistics) | eval (repaired stats)

    def __post_init__(self) -> None:
        for key, value, names in (
            ("np-form", self.form, NP_FORMS),
            ("np-align", self.align, NP_ALIGNS),
            ("np-init", self.init, NP_INITS),
            ("np-params", self.params, NP_PARAMS),
            ("np-bn-mode", self.bn_mode, NP_BN_MODES),
        ):
            if value not in names:
                raise unknown_name(key, value, names)
        if self.form == "softmax" and self.align == "running":
            raise ConfigError("np-align", self.align, "reference when np-form=softmax")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("np-lr", self.lr, "a number > 0")
        for key, value, low in (
            ("np-epochs", self.epochs, 0),
            ("np-batch-size", self.batch_size, 1),
            ("np-patience", self.patience, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(key, value, f"an integer >= {low}")
        if not (isinstance(self.holdout, int | float) and 0 <= self.holdout < 1):
            raise ConfigError("np-holdout", self.holdout, "a number in [0, 1)")


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
    holdout_start, holdout_end : float
        The same on the held-out part, for the last learning problem (NaN without hold-out).
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
    holdout_start: float = math.nan
    holdout_end: float = math.nan
    state_bytes: int = 0
    peak_cuda_bytes: int = 0
