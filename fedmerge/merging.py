"""Merge functions over N models: plain average and neuron-matched average, plus BN repair.

A merge function is ``merge(states, weights, *, reference, **hparams) -> state``: a pure
function of state dicts (``{name: tensor}``) that never modifies its inputs. Weights are the
clients' data sizes (normalised here). Integer buffers (``num_batches_tracked``) are copied
from the reference, never averaged. Hyper-parameters are bound once with
:func:`functools.partial`.

Neuron-matched averaging (Git Re-Basin, Ainsworth et al., ICLR 2023, arXiv 2209.04836;
MuDSC, Xu et al., CVPR 2024, arXiv 2403.01753; FedMA, Wang et al., ICLR 2020): align every
model's hidden units to a reference with a matcher of :mod:`fedmerge.matching`, then take the
weighted average. Reference choices (``match-reference``):

``global``
    The model the server sent this round (``reference`` argument). Clients start from it, so
    in FL this mostly undoes the permutation drift of one round of local training.
``largest``
    The client model with the largest weight.
``barycenter``
    Start from the largest client, then ``max(iterations, 3)`` times: align every model to
    the current reference, average, and use the average as the next reference (an approximate
    Fréchet mean under permutations; Git Re-Basin's "MergeMany" aligns each model to the
    mean of the others instead, which is quadratic in N: this form stays linear).

Deviations from the papers are listed in docs/methods.md ("Neuron-matched averaging").
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from .errors import unknown_name
from .options import DEFAULT_MATCH_SITES, MatchOptions
from .permutations import PermutationSpec, State, apply_permutations
from .spread import share_pool

log = logging.getLogger(__name__)

#: Minimum align-then-average passes of ``match-reference=barycenter``.
BARYCENTER_PASSES = 3


def normalise_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Weights summing to 1 (uniform when ``None``); raises ValueError on bad weights."""
    if n < 1:
        raise ValueError("need at least one model to merge")
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n or any(not x >= 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"need {n} non-negative weights with a positive sum, got {weights}")
    total = sum(w)
    return [x / total for x in w]


def average(
    states: Sequence[State],
    weights: Sequence[float] | None = None,
    *,
    reference: State | None = None,
) -> dict[str, Tensor]:
    """Weighted average of floating tensors; integer tensors from ``reference`` (or model 0).

    Parameters
    ----------
    states : sequence of state dicts
        Models with identical keys and shapes.
    weights : sequence of float, optional
        Non-negative weights (data sizes); uniform when omitted.
    reference : state dict, optional
        Source of non-floating tensors (``num_batches_tracked``).

    Returns
    -------
    dict of str to Tensor
        A new state dict.
    """
    w = normalise_weights(weights, len(states))
    source = reference if reference is not None else states[0]
    out: dict[str, Tensor] = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = source[key].clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64 if first.dtype == torch.float64 else None)
        for wk, state in zip(w, states, strict=True):
            acc.add_(state[key], alpha=wk)
        out[key] = acc.to(first.dtype)
    return out


@dataclass
class MatchReport:
    """What one matched merge did (for logs and round metrics).

    Attributes
    ----------
    seconds : float
        Wall time spent matching (not averaging).
    units_moved : float
        Fraction of hidden units whose position changed, averaged over models and
        permutations (0 = every model was already aligned to the reference).
    matches : int
        Number of model-to-reference matchings run (``N * iterations``: linear in N).
    """

    seconds: float = 0.0
    units_moved: float = 0.0
    matches: int = 0
    _moved: list[float] = field(default_factory=list, repr=False)


def align_one(
    spec: PermutationSpec,
    target: State,
    state: State,
    options: MatchOptions = MatchOptions(),
    *,
    model: nn.Module | None = None,
    inputs: Tensor | None = None,
    seed: int = 0,
    similarities: Mapping[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], float]:
    """``state`` with its units permuted to match ``target``'s, and the fraction moved
    (parameters as :func:`fedmerge.matching.match`)."""
    from .matching import match  # local: SciPy's import only when matching

    perms = match(
        spec,
        target,
        state,
        options,
        model=model,
        inputs=inputs,
        seed=seed,
        similarities=similarities,
    )
    return apply_permutations(spec, perms, state), _fraction_moved(perms)


#: How :func:`activation_similarities_of` reads the models' activations.
READINGS = ("auto", "one-pass", "streamed")

#: Bytes of client models held at once while their activations are read in one pass.
_READ_BYTES = 2**30


def activation_similarities_of(
    spec: PermutationSpec,
    model: nn.Module,
    target: State,
    states: Sequence[State],
    inputs: Tensor,
    *,
    sites: str = DEFAULT_MATCH_SITES,
    reset_target: bool = False,
    reset_states: bool = False,
    reading: str = "auto",
) -> list[dict[str, Tensor]]:
    """The activation similarities of every state against ``target`` (as
    :func:`fedmerge.matching.activation_similarities`), the target's activations read once
    and shared by every state; ``reset_target`` / ``reset_states``: BatchNorm statistics
    recomputed on ``inputs`` before the activations are read (a model without BatchNorm
    ignores them).

    When the target's activations over all ``inputs`` take at most
    :data:`fedmerge.matching.reading.ONE_PASS_BYTES`, every model is read in one pass over
    all the inputs, its BatchNorm statistics taken from the inputs inside that pass
    (:mod:`fedmerge.matching.reading`). Otherwise the inputs are streamed in batches, the
    statistics recomputed beforehand (:func:`repair_batchnorm`, one more pass per model),
    and the target's forward pass shared by as many models as fit in 1 GiB at once.
    ``reading``: ``"auto"`` (as just said), ``"one-pass"`` or ``"streamed"`` (either way
    whatever the size; for measurements and tests).

    Inside a strategy's merge under the local engine with two or more worker processes
    (:mod:`fedmerge.spread`), the one-pass reading is spread over the workers: each reads a
    contiguous share of ``states`` beside its own reading of ``target``, with the same
    results as here on one thread."""
    # local: SciPy's import only when matching
    from .matching import _loaded, activation_similarities
    from .matching.reading import ONE_PASS_BYTES, one_pass_bytes, similarities_in_one_pass

    if reading not in READINGS:
        raise unknown_name("reading", reading, READINGS)
    bn = has_batchnorm(model)
    one_pass = reading == "one-pass" or (
        reading == "auto" and one_pass_bytes(spec, model, inputs, sites) <= ONE_PASS_BYTES
    )
    if one_pass:
        return similarities_in_one_pass(
            spec,
            model,
            target,
            states,
            inputs,
            sites=sites,
            reset_target=reset_target and bn,
            reset_states=reset_states and bn,
            pool=share_pool(),  # the local engine's idle workers, inside a strategy's merge
        )
    if reset_target and bn:
        target = repair_batchnorm(model, target, inputs)
    if reset_states and bn:
        states = [repair_batchnorm(model, s, inputs) for s in states]
    size = max(sum(t.numel() * t.element_size() for t in target.values()), 1)
    chunk = max(1, min(len(states), _READ_BYTES // size))
    reference, out = _loaded(model, target), []
    for start in range(0, len(states), chunk):
        others = [_loaded(model, s) for s in states[start : start + chunk]]
        out.extend(activation_similarities(spec, reference, others, inputs, sites=sites))
    return out


def _first_target(
    states: Sequence[State], w: Sequence[float], mode: str, reference: State | None
) -> State:
    """What the first alignment pass aligns to: the global model, or the largest client."""
    if mode == "global":
        if reference is None:
            raise ValueError("match-reference=global needs the global model as `reference`")
        return reference
    return states[max(range(len(states)), key=lambda k: w[k])]


def align_models(
    states: Sequence[State],
    weights: Sequence[float] | None = None,
    *,
    reference: State | None = None,
    spec: PermutationSpec,
    options: MatchOptions = MatchOptions(),
    model: nn.Module | None = None,
    inputs: Tensor | None = None,
    seed: int = 0,
    reset_batchnorm: bool = True,
    similarities: Sequence[Mapping[str, Tensor]] | None = None,
    report: MatchReport | None = None,
) -> list[dict[str, Tensor]]:
    """Every model aligned to the ``mode`` reference (the alignment of :func:`matched_average`).

    Parameters are those of :func:`matched_average`; returns the aligned copies, in input
    order. With ``options.iterations > 1`` the reference becomes the weighted average of the
    aligned models after each pass. One matching per model and pass: linear in the number of
    models.
    """
    w = normalise_weights(weights, len(states))
    target = _first_target(states, w, options.reference, reference)
    report = report if report is not None else MatchReport()
    reads = options.method == "activation" or (
        options.method == "dual" and options.fixed_beta < 1.0
    )
    reads = reads and model is not None and inputs is not None
    iterations = options.iterations
    if options.reference == "barycenter":
        iterations = max(iterations, BARYCENTER_PASSES)
    aligned: list[dict[str, Tensor]] = []
    for it in range(iterations):
        if it:
            target = average(aligned, w, reference=reference)
        start = time.perf_counter()
        sims: Sequence[Mapping[str, Tensor]] | None = None
        if reads and it == 0 and similarities is not None:
            sims = similarities  # computed by the caller for this pass's target
        elif reads:
            assert model is not None and inputs is not None
            # As MuDSC's code does for every model it merges, every model's BatchNorm
            # statistics are recomputed on the inputs its activations are read on; an
            # averaged target's statistics belong to no model and are recomputed even
            # without reset_batchnorm.
            sims = activation_similarities_of(
                spec,
                model,
                target,
                states,
                inputs,
                sites=options.sites,
                reset_target=reset_batchnorm or it > 0,
                reset_states=reset_batchnorm,
            )
        aligned = []
        for k, state in enumerate(states):
            out, moved = align_one(
                spec,
                target,
                state,
                options,
                model=model,
                inputs=inputs,
                seed=seed,
                similarities=None if sims is None else sims[k],
            )
            report._moved.append(moved)
            aligned.append(out)
        report.seconds += time.perf_counter() - start
        report.matches += len(states)
    report.units_moved = sum(report._moved) / len(report._moved)
    return aligned


def matched_average(
    states: Sequence[State],
    weights: Sequence[float] | None = None,
    *,
    reference: State | None = None,
    spec: PermutationSpec,
    options: MatchOptions = MatchOptions(),
    model: nn.Module | None = None,
    inputs: Tensor | None = None,
    seed: int = 0,
    reset_batchnorm: bool = True,
    similarities: Sequence[Mapping[str, Tensor]] | None = None,
    report: MatchReport | None = None,
) -> dict[str, Tensor]:
    """Align every model to a reference with ``matcher``, then take the weighted average.

    Parameters
    ----------
    states : sequence of state dicts
        The models to merge (e.g. a round's client models).
    weights : sequence of float, optional
        Their data sizes; uniform when omitted.
    reference : state dict, optional
        The global model (required by ``options.reference="global"``; otherwise only a source
        of integer buffers).
    spec : PermutationSpec
        The architecture's spec (:func:`fedmerge.models.model_spec`).
    options : MatchOptions
        The ``match-*`` options read here: ``method`` (the matcher, see
        :func:`fedmerge.matching.match`), ``reference`` (which model to align to, module
        docstring), ``iterations`` (align-then-average passes; after the first, the
        reference is the previous average; ``barycenter`` makes at least 3), ``beta`` (the
        dual matcher's weight-space share: a number; ``auto`` is :func:`select_beta`'s),
        ``max_sweeps`` and ``sites``. ``bn_repair`` and ``beta_criterion`` are the caller's
        (:func:`repair_batchnorm`, :func:`select_beta`). Default: weight matching to the
        global model.
    model : torch.nn.Module, optional
        Template of the architecture, needed by data-based matchers.
    inputs : Tensor, optional
        Inputs at the merge site (the server's proxy slice), needed by data-based matchers.
    seed : int
        Seed of the matchers' visiting order.
    reset_batchnorm : bool
        Data-based matchers on a model with BatchNorm: recompute every model's running
        statistics on ``inputs`` before reading its activations (MuDSC's code does); False
        reads them through each model's own statistics.
    similarities : sequence of mapping, optional
        Per model, its activation similarities against the first pass's reference, already
        computed (:func:`activation_similarities_of` on the models as they are read): the
        first pass uses them instead of running the models (e.g. for every candidate of
        :func:`select_beta`).
    report : MatchReport, optional
        Filled with timing and how many units moved.

    Returns
    -------
    dict of str to Tensor
        The merged state dict.
    """
    w = normalise_weights(weights, len(states))
    aligned = align_models(
        states,
        w,
        reference=reference,
        spec=spec,
        options=options,
        model=model,
        inputs=inputs,
        seed=seed,
        reset_batchnorm=reset_batchnorm,
        similarities=similarities,
        report=report,
    )
    return average(aligned, w, reference=reference if reference is not None else states[0])


def _fraction_moved(perms: Mapping[str, Tensor]) -> float:
    """Fraction of units, over all permutations, that a permutation moves."""
    total = sum(p.numel() for p in perms.values())
    moved = sum(int((p != torch.arange(p.numel(), device=p.device)).sum()) for p in perms.values())
    return moved / total if total else 0.0


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers (the modules that keep running statistics)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_batchnorm(model: nn.Module) -> bool:
    """True when the model keeps BatchNorm running statistics."""
    return bool(batchnorm_layers(model))


@torch.no_grad()
def reset_batchnorm_stats(model: nn.Module, inputs: Tensor, *, batch_size: int = 256) -> None:
    """Recompute ``model``'s BatchNorm running statistics on ``inputs``, in place.

    Statistics are reset, then accumulated over one pass in training mode with a cumulative
    average (``momentum=None``: the mean of the per-batch statistics); the model is left in
    eval mode.
    """
    for m in batchnorm_layers(model):
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for start in range(0, len(inputs), batch_size):
        model(inputs[start : start + batch_size])
    model.eval()


def repair_batchnorm(
    model: nn.Module, state: State, inputs: Tensor, *, batch_size: int = 256
) -> dict[str, Tensor]:
    """Recompute BatchNorm running statistics of ``state`` on ``inputs`` (REPAIR-lite).

    The running means and variances of a merged model belong to none of the models merged;
    one pass in training mode over data at the merge site with a cumulative average
    (``momentum=None``) replaces them by the merged network's own statistics
    (:func:`reset_batchnorm_stats`). Models without BatchNorm are returned unchanged (as a
    copy).

    Parameters
    ----------
    model : torch.nn.Module
        Template of the architecture (not modified: a deep copy is used).
    state : state dict
        The merged model.
    inputs : Tensor
        Inputs at the merge site (e.g. the server's proxy slice), on the model's device.
    batch_size : int
        Forward batch size; the statistics are the mean of the per-batch statistics.

    Returns
    -------
    dict of str to Tensor
        ``state`` with new ``running_mean``/``running_var``/``num_batches_tracked``.
    """
    work = copy.deepcopy(model)
    work.load_state_dict(dict(state))
    if not has_batchnorm(work):
        return {k: v.clone() for k, v in state.items()}
    if len(inputs) == 0:
        raise ValueError("BatchNorm repair needs data at the merge site (proxy-size > 0)")
    reset_batchnorm_stats(work, inputs, batch_size=batch_size)
    return {k: v.detach().clone() for k, v in work.state_dict().items()}


#: MuDSC's grid of weight-space shares for ``match-beta = auto``, in the order its code tries
#: them (0.9 down to 0.1 in steps of 0.1; ties keep the first).
BETA_GRID = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


@dataclass(frozen=True)
class BetaChoice:
    """What :func:`select_beta` chose: the beta, every candidate's loss and accuracy on the
    labelled data, and the chosen candidate's merged model and match report (so it is not
    matched again)."""

    beta: float
    losses: dict[float, float]
    accuracies: dict[float, float]
    merged: dict[str, Tensor]
    report: MatchReport
    seconds: float


def select_beta(
    states: Sequence[State],
    weights: Sequence[float] | None = None,
    *,
    reference: State | None,
    spec: PermutationSpec,
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    options: MatchOptions = MatchOptions(method="dual", beta="auto"),
    grid: Sequence[float] = BETA_GRID,
    seed: int = 0,
    reset_batchnorm: bool = True,
) -> BetaChoice:
    """The dual matcher's ``beta`` whose matched average scores best on the labelled data.

    MuDSC (Xu et al., CVPR 2024; its code) tries beta = 0.9, 0.8, ..., 0.1 and keeps the
    merge with the highest accuracy on labelled training data. Here each candidate's dual
    matched average (``options`` with each beta of ``grid``; BatchNorm-repaired on ``inputs``
    when ``options.bn_repair``) is scored on ``(inputs, labels)`` (the server's labelled proxy
    slice in FL) by ``options.beta_criterion``: ``"accuracy"`` (highest; MuDSC's) or
    ``"loss"`` (lowest cross-entropy). Ties keep the first candidate of ``grid``. The chosen
    candidate's merge is returned, so nothing is matched again. ``options.method`` and
    ``options.beta`` are not read (the candidates are dual matchings at each beta of ``grid``).
    """
    from .training import evaluate  # local: training imports nothing from here

    if len(inputs) == 0 or len(inputs) != len(labels):
        raise ValueError("select_beta needs labelled inputs (the proxy slice)")
    probe = copy.deepcopy(model)
    losses: dict[float, float] = {}
    accuracies: dict[float, float] = {}
    merges: dict[float, tuple[dict[str, Tensor], MatchReport]] = {}
    # The activations do not depend on beta: read once, shared by every candidate.
    first = _first_target(
        states, normalise_weights(weights, len(states)), options.reference, reference
    )
    start = time.perf_counter()
    sims = activation_similarities_of(
        spec,
        model,
        first,
        states,
        inputs,
        sites=options.sites,
        reset_target=reset_batchnorm,
        reset_states=reset_batchnorm,
    )
    reading = time.perf_counter() - start
    for beta in grid:
        report = MatchReport()
        merged = matched_average(
            states,
            weights,
            reference=reference,
            spec=spec,
            options=replace(options, method="dual", beta=float(beta)),
            model=model,
            inputs=inputs,
            seed=seed,
            reset_batchnorm=reset_batchnorm,
            similarities=sims,
            report=report,
        )
        if options.bn_repair:  # a model without BatchNorm comes back unchanged
            merged = repair_batchnorm(model, merged, inputs)
        probe.load_state_dict(merged)
        b = float(beta)
        losses[b], accuracies[b] = evaluate(probe, inputs, labels, device=inputs.device)
        merges[b] = merged, report
    order = list(losses)
    if options.beta_criterion == "accuracy":
        best = min(order, key=lambda b: (-accuracies[b], order.index(b)))
    else:
        best = min(order, key=lambda b: (losses[b], order.index(b)))
    seconds = reading + sum(r.seconds for _, r in merges.values())
    return BetaChoice(best, losses, accuracies, *merges[best], seconds)
