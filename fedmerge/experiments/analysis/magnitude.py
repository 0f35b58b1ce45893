"""Analysis 3: the magnitude-scaling probe (scale some models' parameters, then average)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ...errors import unknown_name
from ...merging import average, repair_batchnorm

if TYPE_CHECKING:
    from ...datasets import FederatedDataset

from .common import CASES, StateDict, _loaded, accuracy, agreement, outputs
from .soups import ModelSet


# -- 3. magnitude scaling --------------------------------------------------------------------
def scaled_indices(case: str, n: int) -> list[int]:
    """Models scaled in ``case``: ``[0]``, the first ``max(1, n // 2)``, or all ``n``."""
    if case not in CASES:
        raise unknown_name("case", case, CASES)
    return {"one": [0], "half": list(range(max(1, n // 2))), "all": list(range(n))}[case]


def scale_parameters(state: StateDict, names: set[str], factor: float) -> StateDict:
    """``state`` with the entries in ``names`` (the parameters) multiplied by ``factor``."""
    return {k: v * factor if k in names else v.clone() for k, v in state.items()}


def scaling_rows(
    models: ModelSet,
    data: FederatedDataset,
    *,
    factors: Sequence[float] = (100.0,),
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
    repair: bool = False,
) -> list[dict]:
    """Uniform averages in which some models' parameters are multiplied by a factor.

    As in the paper's code, the averages are not BatchNorm-repaired by default: repairing
    after scaling recomputes the statistics a scaled convolution feeds, which cancels the
    scaling for every convolution followed by BatchNorm. ``repair=True``
    (``--repair``) recomputes them on the proxy slice.

    Parameters
    ----------
    models : ModelSet
        The N models.
    data : FederatedDataset
        Test split for the scores; with ``repair``, BatchNorm statistics of every average are
        recomputed on its proxy slice.
    factors : sequence of float
        Factors M; each is applied in every case of :data:`CASES`.
    device : torch.device or str
        Where to evaluate.
    batch_size : int
        Evaluation batch size.

    Returns
    -------
    list of dict
        A baseline row (``case="none"``: the uniform soup) and one row per factor and case:
        ``test-accuracy``; ``agreement-unscaled``, the share of test predictions equal to the
        uniform soup's; ``agreement-subset``, equal to the uniform soup of only the scaled
        models (unscaled), and ``subset-accuracy``, that soup's test accuracy;
        ``logit-ratio``, mean ``|logit|`` over the uniform soup's.
    """
    t, xs, xt, yt = models.template, data.x_proxy, data.x_test, data.y_test
    names = {name for name, _ in t.named_parameters()}
    n = len(models.states)

    def merged_logits(states: Sequence[StateDict]) -> Tensor:
        state = average(states)
        if repair:
            state = repair_batchnorm(t, state, xs)
        return outputs(_loaded(t, state, device), xt, device=device, batch_size=batch_size)[0]

    base = merged_logits(models.states)
    scale = float(base.abs().mean())
    rows = [
        {
            "setting": models.setting,
            "factor": 1.0,
            "case": "none",
            "scaled": 0,
            "test-accuracy": accuracy(base, yt),
            "agreement-unscaled": 1.0,
            "agreement-subset": 1.0,
            "subset-accuracy": accuracy(base, yt),
            "logit-ratio": 1.0,
        }
    ]
    for factor in factors:
        for case in CASES:
            idx = scaled_indices(case, n)
            states = [
                scale_parameters(s, names, factor) if k in idx else s
                for k, s in enumerate(models.states)
            ]
            logits = merged_logits(states)
            subset = merged_logits([models.states[k] for k in idx])
            rows.append(
                {
                    "setting": models.setting,
                    "factor": float(factor),
                    "case": case,
                    "scaled": len(idx),
                    "test-accuracy": accuracy(logits, yt),
                    "agreement-unscaled": agreement(logits, base),
                    "agreement-subset": agreement(logits, subset),
                    "subset-accuracy": accuracy(subset, yt),
                    "logit-ratio": float(logits.abs().mean()) / scale,
                }
            )
    return rows
