"""Learning one NP Merge problem: the coefficients of two (or N) aligned models on a proxy set."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..merging import (
    batchnorm_layers,
    normalise_weights,
    repair_batchnorm,
)
from ..options import NPOptions
from ..permutations import State
from ..training import batches as training_batches
from .fusion import _Adam, _Fusion, _nbytes
from .report import _EVAL_BATCH, NPReport

# ---------------------------------------------------------------------------------------------
# Learning one problem
# ---------------------------------------------------------------------------------------------


def _set_mode(work: nn.Module, bn_mode: str) -> None:
    """Eval mode everywhere (no dropout); BatchNorm in train mode for ``bn_mode="train"``."""
    work.eval()
    if bn_mode == "train":
        for m in batchnorm_layers(work):
            m.train()


def _split(n: int, holdout: float, seed: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Seeded (fit, held-out) index tensors; no held-out part when there are too few samples."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    n_val = min(max(round(n * holdout), 1), n - 1) if holdout > 0 and n >= 2 else 0
    return order[n_val:], order[:n_val]


@torch.no_grad()
def _loss(work: nn.Module, state: Mapping[str, Tensor], x: Tensor, y: Tensor) -> float:
    """Mean cross-entropy of ``work`` holding ``state`` (its current mode) on ``(x, y)``."""
    if len(y) == 0:
        return math.nan
    total = torch.zeros((), device=x.device)
    for start in range(0, len(y), _EVAL_BATCH):
        logits = functional_call(work, dict(state), (x[start : start + _EVAL_BATCH],))
        total += F.cross_entropy(logits, y[start : start + _EVAL_BATCH], reduction="sum")
    return float(total) / len(y)


def _repaired_buffers(work: nn.Module, state: Mapping[str, Tensor], x: Tensor) -> dict[str, Tensor]:
    """``state``'s buffers with BatchNorm statistics recomputed on ``x``."""
    buffer_names = {name for name, _ in work.named_buffers()}
    repaired = repair_batchnorm(work, {k: v.detach() for k, v in state.items()}, x)
    return {k: v for k, v in repaired.items() if k in buffer_names}


class _Problem:
    """One learning problem: the merged network, its data split and its working buffers."""

    def __init__(self, work: nn.Module, fusion: _Fusion, source: State, options: NPOptions):
        self.work, self.fusion, self.options = work, fusion, options
        device = next(iter(fusion.logits.values())).device
        # Working copies: BatchNorm in train mode advances running stats and batch counters.
        self.buffers = {k: v.clone() for k, v in fusion.fixed.items()}
        for key, value in source.items():
            if not value.is_floating_point():
                self.buffers[key] = value.detach().to(device).clone()
        # bn_mode "eval": BatchNorm normalises with statistics recomputed on the fitting part.
        self.refresh = bool(batchnorm_layers(work)) and options.bn_mode == "eval"
        self.stale = True  # the statistics are not yet those of the current coefficients
        _set_mode(work, options.bn_mode)

    def state(self, detach: bool = False) -> dict[str, Tensor]:
        """Buffers and merged parameters, as ``functional_call`` takes them."""
        merged = self.fusion.merged()
        if detach:
            merged = {k: v.detach() for k, v in merged.items()}
        return {**self.buffers, **merged}

    def refresh_stats(self, x_fit: Tensor) -> None:
        """bn_mode "eval": recompute BN statistics on the fitting part if coefficients moved."""
        if self.refresh and self.stale:
            self.buffers.update(_repaired_buffers(self.work, self.state(True), x_fit))
        self.stale = False

    def held_out(self, x: Tensor, y: Tensor, x_fit: Tensor) -> float:
        """Held-out loss (NaN without a held-out part)."""
        self.refresh_stats(x_fit)
        return _loss(self.work, self.state(True), x, y) if len(y) else math.nan

    def epoch(
        self, opt: _Adam, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> tuple[int, int]:
        """One epoch of Adam steps over ``(x, y)``: (steps, bytes held at the first step)."""
        self.refresh_stats(x)
        batches = training_batches(len(y), self.options.batch_size, generator)
        self.stale, counted = True, 0
        for idx in batches:
            idx = idx.to(x.device)
            logits = functional_call(self.work, self.state(), (x[idx],))
            F.cross_entropy(logits, y[idx]).backward()
            if opt.t == 0:  # every tensor of the problem exists now: count them once
                grads = _nbytes([a.grad for a in opt.params if a.grad is not None])
                counted = self.fusion.nbytes() + opt.nbytes() + grads + self.fusion.merged_nbytes()
            opt.step()
        return len(batches), counted


def learn_coefficients(
    model: nn.Module,
    states: Sequence[State],
    weights: Sequence[float] | None,
    x: Tensor,
    y: Tensor,
    *,
    options: NPOptions = NPOptions(),
    seed: int = 0,
    device: torch.device | str = "cpu",
    reference: State | None = None,
    report: NPReport | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Learn per-element merge coefficients of already-aligned models on ``(x, y)``.

    Parameters
    ----------
    model : torch.nn.Module
        Template of the architecture (not modified).
    states : sequence of state dicts
        Aligned models (not modified): two give the sigmoid pair form, more the softmax form.
    weights : sequence of float, optional
        Data sizes: the starting shares (``np-init=weights``); uniform when omitted.
    x, y : Tensor
        Labelled merge-site data (inputs, int64 labels); a seeded share ``options.holdout``
        is held out for early stopping.
    options : NPOptions
        Hyper-parameters.
    seed : int
        Seed of the hold-out split and the batch order.
    device : torch.device or str
        Where to learn.
    reference : state dict, optional
        Source of integer buffers (``num_batches_tracked``); model 0 when omitted.
    report : NPReport, optional
        Accumulates steps, epochs, time, memory and the held-out losses.

    Returns
    -------
    merged : dict of str to Tensor
        The merged state, on ``device``. Floating buffers (BatchNorm statistics) are the
        starting-share average: repair them (:func:`fedmerge.merging.repair_batchnorm`).
    logits : dict of str to Tensor
        The learned logits (:func:`fuse` of ``states`` with them gives ``merged``'s entries).
    """
    report = report if report is not None else NPReport()
    device = torch.device(device)
    if len(states) < 2 or len(x) != len(y) or len(y) == 0:
        raise ValueError(f"need two or more models and labelled data, got {len(states)}, {len(y)}")
    start = time.perf_counter()
    work = copy.deepcopy(model).to(device)
    learned = [
        name
        for name, p in work.named_parameters()
        if p.is_floating_point() and (options.params == "all" or p.ndim >= 2)
    ]
    on_device = [{k: v.detach().to(device) for k, v in s.items()} for s in states]
    fusion = _Fusion(on_device, normalise_weights(weights, len(states)), learned, options.init)
    source = reference if reference is not None else states[0]
    problem = _Problem(work, fusion, source, options)
    x, y = x.to(device), y.to(device)
    fit, val = _split(len(y), options.holdout, seed, device)
    opt = _Adam(list(fusion.logits.values()), lr=options.lr)
    best = problem.held_out(x[val], y[val], x[fit])
    report.holdout_starts.append(best)
    best_logits = {k: v.detach().clone() for k, v in fusion.logits.items()}
    generator, stale = torch.Generator().manual_seed(seed), 0
    for _ in range(options.epochs):
        steps, counted = problem.epoch(opt, x[fit], y[fit], generator)
        if counted:  # plus the best logits kept for early stopping
            report.state_bytes = max(report.state_bytes, counted + _nbytes(best_logits.values()))
        report.steps, report.epochs = report.steps + steps, report.epochs + 1
        if not len(val):
            continue
        loss = problem.held_out(x[val], y[val], x[fit])
        if loss < best:
            best, stale = loss, 0
            best_logits = {k: v.detach().clone() for k, v in fusion.logits.items()}
        else:
            stale += 1
            if stale >= options.patience:
                break
    if len(val):  # keep the best coefficients seen (the start included)
        with torch.no_grad():
            for key, value in best_logits.items():
                fusion.logits[key].copy_(value)
    # Without a held-out part there is nothing to choose by: the last coefficients stay.
    report.holdout_ends.append(best)
    report.problems += 1
    report.seconds += time.perf_counter() - start
    merged = {**fusion.fixed, **{k: v.detach() for k, v in fusion.merged().items()}}
    for key, value in source.items():  # BN in train mode advanced the working copies
        if not value.is_floating_point():
            merged[key] = value.detach().to(device).clone()
    logits = {k: v.detach().clone() for k, v in fusion.logits.items()}
    return {k: merged[k] for k in states[0]}, logits
