"""Fine-tuning a model on the proxy set with NP Merge's label budget: the matched control.

NP Merge learns its coefficients with Adam (``np-lr``, batches of ``np-batch-size``) on the
fitting part of the server's proxy set, up to ``np-epochs`` epochs for *each* of its learning
problems (``N - 1`` pairwise problems for ``N`` models, 1 for the softmax form), stops a problem
after ``np-patience`` epochs without a better loss on the held-out part (``np-holdout``) and
keeps the best coefficients. :func:`fine_tune_like_np` spends the same budget on the model's own
weights: the same optimiser (:class:`~.fusion._Adam`, ``torch.optim.Adam``'s update), learning
rate, batch size and batch order rule, at most ``problems x np-epochs`` epochs over the same
fitting part (the seeded split NP Merge's first problem uses), the same early-stopping rule on
the same held-out share, the best weights kept, and the same network mode (dropout off;
BatchNorm per ``np-bn-mode``). Without a held-out part every epoch runs, and the number of
Adam steps equals NP Merge's exactly (a test checks it); with one, both stop by the same rule,
so each reports its own steps (``np-steps``, ``finetune-steps``).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..options import NPOptions
from ..permutations import State
from ..training import batches as training_batches
from .fusion import _Adam
from .learning import _loss, _set_mode, _split

__all__ = ["FineTuneReport", "fine_tune_like_np"]


@dataclass
class FineTuneReport:
    """What one fine-tuning did.

    Attributes
    ----------
    steps, epochs : int
        Adam steps and epochs taken.
    loss : float
        Mean training cross-entropy over the steps taken (NaN when none).
    holdout_start, holdout_end : float
        Held-out cross-entropy of the starting model and of the model kept (NaN without a
        held-out part).
    seconds : float
        Wall time.
    """

    steps: int = 0
    epochs: int = 0
    loss: float = math.nan
    holdout_start: float = math.nan
    holdout_end: float = math.nan
    seconds: float = 0.0


def _held_out(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """NP Merge's held-out loss (:func:`~.learning._loss`) of the model as it is; its buffers
    (BatchNorm running statistics) are read from a copy, so they stay as they were."""
    return _loss(model, {k: v.clone() for k, v in model.state_dict().items()}, x, y)


def fine_tune_like_np(
    model: nn.Module,
    state: State,
    x: Tensor,
    y: Tensor,
    *,
    options: NPOptions,
    problems: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Tensor], FineTuneReport]:
    """Fine-tune ``state`` on ``(x, y)`` with the label budget NP Merge would spend.

    Parameters
    ----------
    model : nn.Module
        Template of the architecture (not modified: a copy is trained).
    state : mapping of str to Tensor
        The model to start from (e.g. the round's FedAvg or matched average).
    x, y : Tensor
        The server's labelled proxy set.
    options : NPOptions
        NP Merge's options: ``lr``, ``batch_size``, ``epochs`` (per problem), ``holdout``,
        ``patience``, ``bn_mode``.
    problems : int
        The learning problems NP Merge would solve on the same round (``N - 1`` pairwise, 1
        softmax); the budget is ``problems x epochs`` epochs. 0: no fine-tuning.
    seed : int
        Seeds the held-out split (as NP Merge's first problem) and the batch order.
    device : torch.device or str
        Where to train.

    Returns
    -------
    (dict of str to Tensor, FineTuneReport)
        The fine-tuned state (on the CPU) and what was done.
    """
    start = time.perf_counter()
    report = FineTuneReport()
    device = torch.device(device)
    work = copy.deepcopy(model).to(device)
    current = work.state_dict()
    work.load_state_dict({k: v.to(current[k].dtype) for k, v in state.items()})
    _set_mode(work, options.bn_mode)
    x, y = x.to(device), y.to(device)
    fit, val = _split(len(y), options.holdout, seed, device)
    params = [p for p in work.parameters() if p.requires_grad]
    opt = _Adam(params, lr=options.lr)
    best = report.holdout_start = _held_out(work, x[val], y[val])
    best_state = {k: v.detach().clone() for k, v in work.state_dict().items()}
    generator, stale = torch.Generator().manual_seed(seed), 0
    total, seen = torch.zeros((), device=device), 0
    for _ in range(max(problems, 0) * options.epochs):
        for idx in training_batches(len(fit), options.batch_size, generator):
            idx = fit[idx.to(device)]
            loss = F.cross_entropy(work(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)  # summed on the device: no sync per step
            seen += len(idx)
            report.steps += 1
        report.epochs += 1
        if not len(val):
            continue
        loss_val = _held_out(work, x[val], y[val])
        if loss_val < best:
            best, stale = loss_val, 0
            best_state = {k: v.detach().clone() for k, v in work.state_dict().items()}
        else:
            stale += 1
            if stale >= options.patience:
                break
    if len(val):  # the best weights seen (the start included), as NP Merge keeps its best
        work.load_state_dict(best_state)
        report.holdout_end = best
    report.loss = float(total) / seen if seen else math.nan
    report.seconds = time.perf_counter() - start
    return {k: v.detach().cpu() for k, v in work.state_dict().items()}, report
