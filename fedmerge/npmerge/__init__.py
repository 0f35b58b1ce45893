"""NP Merge: "Non-Uniform Parameter-Wise Model Merging", arXiv 2412.15467.

After aligning the models' hidden units (any matcher of :mod:`fedmerge.matching`), every
parameter element gets its own merge coefficient, learned by gradient descent on labelled data
at the merge site:

- pair (the paper's): ``W = alpha * W_A + (1 - alpha) * W_B'``, ``alpha = sigmoid(a)``;
- N-way softmax (fedmerge's extension, not in the paper): ``W = sum_k softmax_k(a)_k * W_k'``.

Only the logits ``a`` are trained: the merged network runs functionally
(:func:`torch.func.functional_call`) on the labelled data, cross-entropy is minimised with
Adam, and early stopping watches a held-out part of that data. Only the abstract is available
here; the specification is ``docs/methods.md`` (NP Merge), and every detail the abstract does
not fix is a run-config key ``np-*`` (:class:`NPOptions`):

- start: ``a`` = logit of the data-size share (``np-init=weights``; 0, the plain aligned
  average, for equal weights) or 0 whatever the weights (``np-init=uniform``); the spec's
  "a = 0" is the equal-weight case of the first;
- Adam (lr ``np-lr`` = 1e-2, betas 0.9/0.999, eps 1e-8, no weight decay), batches of
  ``np-batch-size`` = 64, at most ``np-epochs`` = 10 epochs; a fraction ``np-holdout`` = 0.2
  of the data is held out, the held-out loss is measured before learning and after every
  epoch, the best coefficients seen are kept (so the held-out loss never ends above the
  aligned average's) and learning stops after ``np-patience`` = 3 epochs without
  improvement; ``np-holdout = 0`` keeps the last coefficients;
- coefficients for every floating parameter, biases and norm parameters included
  (``np-params=all``), or only for tensors of two or more dimensions (``weights``; the others
  keep their starting share). Floating buffers (BatchNorm statistics) take the starting share,
  integer buffers come from the reference model;
- BatchNorm while learning (``np-bn-mode``): ``train`` (default) normalises with the batch's
  own statistics, as training does, and the statistics the merged model will be given are
  recomputed on the merge-site data after merging (:func:`fedmerge.merging.repair_batchnorm`);
  ``eval`` uses running statistics recomputed on the fitting part at the start of every
  epoch. Every other module (dropout) runs in eval mode, so learning is deterministic;
- N models (``np-form``): ``pairwise`` (the paper's successive merging) visits the models by
  decreasing data size (ties: input order); the running merge carries the accumulated data
  size ``w_run``, and each pair starts at ``a = logit(w_run / (w_run + w_next))``, i.e. at the
  weighted aligned average. ``softmax`` learns all models' shares at once, starting at the
  data-size weights (memory: K models, their logits, gradients and two Adam moments);
- alignment (``np-align``): ``reference`` aligns every model once to the ``match-reference``
  (as :func:`fedmerge.merging.matched_average`); ``running`` (pairwise only) aligns each next
  model to the running merge, as successive merging suggests (the paper's exact protocol is
  unknown here);
- models of weight 0 are left out (they contribute nothing to the weighted average); with
  two models both forms are the sigmoid pair (softmax over two is a sigmoid of a difference);
- memory: a pair problem holds 8 model-sized copies (base, difference, logits, gradient, two
  Adam moments, one merged copy, the best logits kept for early stopping), a K-way softmax
  problem 6K + 1; :class:`NPReport` counts them, and the CUDA peak on a GPU.

Everything here is pure PyTorch (no Flower).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..merging import (
    MatchReport,
    align_models,
    align_one,
    average,
    batchnorm_layers,
    normalise_weights,
    repair_batchnorm,
)
from ..options import MatchOptions, NPOptions
from ..permutations import PermutationSpec, State
from .fusion import fuse
from .learning import _loss, _repaired_buffers, _set_mode, learn_coefficients
from .report import NPReport

__all__ = [
    "NPOptions",
    "NPReport",
    "align_to_reference",
    "fuse",
    "learn_coefficients",
    "np_merge",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Alignment and the N-model merge
# ---------------------------------------------------------------------------------------------


def _align_one(
    spec: PermutationSpec,
    match: MatchOptions,
    target: State,
    state: State,
    *,
    model: nn.Module,
    inputs: Tensor | None,
    seed: int,
    report: NPReport,
    moved: list[float],
) -> dict[str, Tensor]:
    """``state`` with its units permuted to match ``target``'s (``np-align=running``)."""
    start = time.perf_counter()
    aligned, fraction = align_one(spec, target, state, match, model=model, inputs=inputs, seed=seed)
    moved.append(fraction)
    report.match_seconds += time.perf_counter() - start
    return aligned


def align_to_reference(
    states: Sequence[State],
    shares: Sequence[float],
    *,
    reference: State | None,
    spec: PermutationSpec,
    match: MatchOptions,
    model: nn.Module,
    inputs: Tensor | None,
    seed: int,
    report: NPReport,
    moved: list[float],
) -> list[dict[str, Tensor]]:
    """Every model aligned to the ``match-reference`` (the alignment of ``matched_average``)."""
    match_report = MatchReport()
    aligned = align_models(
        states,
        shares,
        reference=reference,
        spec=spec,
        options=match,
        model=model,
        inputs=inputs,
        seed=seed,
        report=match_report,
    )
    report.match_seconds += match_report.seconds
    moved.extend(match_report._moved)
    return aligned


def _proxy_loss(work: nn.Module, state: State, x: Tensor, y: Tensor, options: NPOptions) -> float:
    """Loss on all merge-site data in the learning BatchNorm mode (eval: stats repaired)."""
    state = {k: v.to(x.device) for k, v in state.items()}
    if options.bn_mode == "eval" and batchnorm_layers(work):
        state = {**state, **_repaired_buffers(work, state, x)}
    else:
        state = {k: v.clone() for k, v in state.items()}  # BN in train mode updates buffers
    _set_mode(work, options.bn_mode)
    return _loss(work, state, x, y)


def _cpu(state: State) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def np_merge(
    states: Sequence[State],
    weights: Sequence[float] | None = None,
    *,
    reference: State | None = None,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    spec: PermutationSpec,
    match: MatchOptions = MatchOptions(),
    options: NPOptions = NPOptions(),
    seed: int = 0,
    device: torch.device | str = "cpu",
    bn_repair: bool = True,
    report: NPReport | None = None,
) -> dict[str, Tensor]:
    """Align the models, then merge them with learned per-element coefficients (NP Merge).

    A merge function of :mod:`fedmerge.merging`'s form: bind everything after ``reference``
    with :func:`functools.partial`. Inputs are never modified.

    Parameters
    ----------
    states : sequence of state dicts
        The models (e.g. a round's client models). One model (after leaving out models of
        weight 0) is returned as a copy.
    weights : sequence of float, optional
        Their data sizes; uniform when omitted.
    reference : state dict, optional
        The global model (``match-reference=global``) and the source of integer buffers
        (model 0 when omitted).
    model : torch.nn.Module
        Template of the architecture (not modified).
    x, y : Tensor
        Labelled merge-site data (the server's proxy slice); never a client's data.
    spec : PermutationSpec
        The architecture's spec (:func:`fedmerge.models.model_spec`).
    match : MatchOptions
        How models are aligned (the ``match-*`` keys; weight matching to the global model by
        default): ``method``, ``reference`` (read by ``np-align=reference``), ``iterations``,
        a numeric ``beta``, ``max_sweeps``, ``sites``.
    options : NPOptions
        The ``np-*`` keys.
    seed : int
        Seed of the matchers, the hold-out split and the batch order.
    device : torch.device or str
        Where the coefficients are learned.
    bn_repair : bool
        Recompute BatchNorm statistics of the merged model on ``x`` (models with BatchNorm).
    report : NPReport, optional
        Filled with timing, steps, losses and memory.

    Returns
    -------
    dict of str to Tensor
        The merged state dict, on the devices of ``states[0]``.
    """
    report = report if report is not None else NPReport()
    device = torch.device(device)
    shares_all = normalise_weights(weights, len(states))
    kept = [k for k in range(len(states)) if shares_all[k] > 0]
    states, shares = [states[k] for k in kept], [shares_all[k] for k in kept]
    source = reference if reference is not None else states[0]
    if len(states) == 1:
        return {k: v.clone() for k, v in states[0].items()}
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"NP Merge needs labelled merge-site data, got {len(y)} labels")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    work = copy.deepcopy(model).to(device)
    x_dev, y_dev = x.to(device), y.to(device)
    repair = bn_repair and bool(batchnorm_layers(work))
    moved: list[float] = []
    common: dict[str, Any] = {"model": model, "inputs": x, "report": report, "moved": moved}
    learn: dict[str, Any] = {
        "options": options,
        "device": device,
        "reference": source,
        "report": report,
    }
    aligned: list[dict[str, Tensor]] = []  # np-align=running aligns inside the chain
    if options.align == "reference":
        aligned = align_to_reference(
            states, shares, reference=reference, spec=spec, match=match, seed=seed, **common
        )
    if options.form == "softmax":
        start_state = average(aligned, shares, reference=source)
        merged = _cpu(
            learn_coefficients(model, aligned, shares, x_dev, y_dev, seed=seed, **learn)[0]
        )
    else:
        order = sorted(range(len(states)), key=lambda k: -shares[k])  # stable: ties in order
        merged = dict(aligned[order[0]] if options.align == "reference" else states[order[0]])
        start_state, total = merged, shares[order[0]]
        for step, k in enumerate(order[1:], start=1):
            if options.align == "reference":
                nxt = aligned[k]
            else:  # the paper's successive form: align the next model to the running merge
                target = repair_batchnorm(work, merged, x_dev) if repair else merged
                nxt = _align_one(spec, match, _cpu(target), states[k], seed=seed + step, **common)
            start_state = average([start_state, nxt], [total, shares[k]], reference=source)
            pair = learn_coefficients(
                model, [merged, nxt], [total, shares[k]], x_dev, y_dev, seed=seed + step, **learn
            )
            merged = _cpu(pair[0])  # bookkeeping on the CPU, where the matchers run
            total += shares[k]
    report.loss_start = _proxy_loss(work, start_state, x_dev, y_dev, options)
    report.loss_end = _proxy_loss(work, merged, x_dev, y_dev, options)
    if repair:
        merged = repair_batchnorm(work, {k: v.to(device) for k, v in merged.items()}, x_dev)
    for key, value in source.items():
        if not value.is_floating_point():
            merged[key] = value.detach().clone()
    report.units_moved = sum(moved) / len(moved) if moved else 0.0
    if device.type == "cuda":
        report.peak_cuda_bytes = torch.cuda.max_memory_allocated(device)
    log.debug(
        "NP Merge of %d models: %d steps, proxy loss %.4f -> %.4f, %.2f s learning",
        len(states),
        report.steps,
        report.loss_start,
        report.loss_end,
        report.seconds,
    )
    return {k: merged[k].detach().to(v.device).clone() for k, v in states[0].items()}
