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
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .errors import ConfigError, unknown_name
from .merging import (
    REFERENCES,
    MatchReport,
    align_models,
    align_one,
    average,
    batchnorm_layers,
    normalise_weights,
    repair_batchnorm,
)
from .permutations import PermutationSpec
from .training import _batches, resolve_device

if TYPE_CHECKING:  # only for annotations: merge_experiment may import this module
    from .merge_experiment import MergeSite

log = logging.getLogger(__name__)

State = Mapping[str, Tensor]

NP_FORMS = ("pairwise", "softmax")
NP_ALIGNS = ("reference", "running")
NP_INITS = ("weights", "uniform")
NP_PARAMS = ("all", "weights")
NP_BN_MODES = ("train", "eval")
# Held-out loss and proxy-loss evaluation batch (no gradients, so memory is small).
_EVAL_BATCH = 1024


@dataclass(frozen=True)
class NPOptions:
    """NP Merge's hyper-parameters (run-config keys ``np-*``; the module docstring has why).

    Raises
    ------
    ConfigError
        Naming the ``np-*`` key of a bad value.
    """

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

    @classmethod
    def from_config(cls, cfg) -> NPOptions:
        """The options of a :class:`fedmerge.config.RunConfig` (fields ``np_*``)."""
        return cls(**{f.name: getattr(cfg, f"np_{f.name}") for f in fields(cls)})


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


# ---------------------------------------------------------------------------------------------
# The fused parameters as a function of the logits
# ---------------------------------------------------------------------------------------------


def fuse(states: Sequence[State], logits: Mapping[str, Tensor], *, form: str) -> dict[str, Tensor]:
    """Merge aligned models with per-element coefficient logits (pure; inputs unchanged).

    Parameters
    ----------
    states : sequence of state dicts
        Aligned models: exactly two for ``pair``.
    logits : mapping of str to Tensor
        ``a`` for every merged entry: the entry's shape for ``pair`` (``alpha = sigmoid(a)``
        weighs ``states[0]``), ``(K, *shape)`` for ``softmax``. Entries without logits are
        taken from ``states[0]``.
    form : {"pair", "softmax"}
        ``alpha * W_0 + (1 - alpha) * W_1``, or ``sum_k softmax_k(a) * W_k``.

    Returns
    -------
    dict of str to Tensor
        The merged state dict (differentiable in ``logits``).
    """
    if form == "pair" and len(states) != 2:
        raise ValueError(f"form 'pair' merges two models, got {len(states)}")
    if form not in ("pair", "softmax"):
        raise ValueError(f"form must be 'pair' or 'softmax', got {form!r}")
    out: dict[str, Tensor] = {}
    for key, first in states[0].items():
        if key not in logits:
            out[key] = first.clone()
        elif form == "pair":
            alpha = torch.sigmoid(logits[key])
            out[key] = alpha * first + (1 - alpha) * states[1][key]
        else:
            share = torch.softmax(logits[key], dim=0)
            out[key] = (share * torch.stack([s[key] for s in states])).sum(0)
    return out


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _Fusion:
    """Merged parameters as a differentiable function of the logits, memory-lean.

    Pair: ``W_B + sigmoid(a) * (W_A - W_B)`` (two model copies kept, not three). Softmax: the
    stacked models. Entries without logits are fixed at the starting shares.
    """

    def __init__(
        self, states: Sequence[State], shares: Sequence[float], learned: Sequence[str], init: str
    ) -> None:
        self.form = "pair" if len(states) == 2 else "softmax"
        self.fixed = average(states, shares)  # non-learned entries; integer ones replaced later
        self.const: dict[str, Tensor] = {}
        self.logits: dict[str, Tensor] = {}
        for key in learned:
            self.fixed.pop(key)
            if self.form == "pair":
                start = 0.0 if init == "uniform" else math.log(shares[0] / shares[1])
                self.const[key] = states[1][key].clone()
                self.const[f"{key}/diff"] = states[0][key] - states[1][key]
                self.logits[key] = torch.full_like(states[0][key], start).requires_grad_()
            else:
                stack = torch.stack([s[key] for s in states])
                log_share = torch.tensor(
                    [0.0 if init == "uniform" else math.log(w) for w in shares],
                    dtype=stack.dtype,
                    device=stack.device,
                ).view(-1, *([1] * (stack.ndim - 1)))
                self.const[key] = stack
                self.logits[key] = (torch.zeros_like(stack) + log_share).requires_grad_()

    def merged(self) -> dict[str, Tensor]:
        """The merged learned entries (differentiable)."""
        out = {}
        for key, a in self.logits.items():
            if self.form == "pair":
                out[key] = torch.addcmul(
                    self.const[key], torch.sigmoid(a), self.const[f"{key}/diff"]
                )
            else:
                out[key] = (torch.softmax(a, dim=0) * self.const[key]).sum(0)
        return out

    def nbytes(self) -> int:
        """Bytes of the constants and logits."""
        return _nbytes([*self.const.values(), *self.logits.values(), *self.fixed.values()])

    def merged_nbytes(self) -> int:
        """Bytes of one merged copy of the learned entries."""
        one = [a[0] if self.form == "softmax" else a for a in self.logits.values()]
        return _nbytes(one)


class _Adam:
    """Adam (Kingma & Ba), the update of ``torch.optim.Adam`` with default flags, in
    ``torch._foreach`` ops: constructing ``torch.optim.Adam`` imports TorchDynamo (~5 s on
    2 CPU cores), most of a small merge's wall time (tests check the update step by step)."""

    def __init__(
        self, params: Sequence[Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8
    ) -> None:
        self.params, self.lr, self.betas, self.eps = list(params), lr, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        """One update; gradients are read from ``.grad`` and then dropped."""
        b1, b2 = self.betas
        self.t += 1
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        torch._foreach_lerp_(self.m, grads, 1 - b1)  # m = b1 m + (1 - b1) g
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_div_(denom, math.sqrt(1 - b2**self.t))
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(self.params, self.m, denom, value=-self.lr / (1 - b1**self.t))
        for p in self.params:
            p.grad = None

    def nbytes(self) -> int:
        """Bytes of the two moments."""
        return _nbytes([*self.m, *self.v])


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
        batches = _batches(len(y), self.options.batch_size, generator)
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
    best = report.holdout_start = problem.held_out(x[val], y[val], x[fit])
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
    with torch.no_grad():  # keep the best coefficients seen (the start included)
        for key, value in best_logits.items():
            fusion.logits[key].copy_(value)
    report.holdout_end, report.problems = best, report.problems + 1
    report.seconds += time.perf_counter() - start
    merged = {**fusion.fixed, **{k: v.detach() for k, v in fusion.merged().items()}}
    for key, value in source.items():  # BN in train mode advanced the working copies
        if not value.is_floating_point():
            merged[key] = value.detach().to(device).clone()
    logits = {k: v.detach().clone() for k, v in fusion.logits.items()}
    return {k: merged[k] for k in states[0]}, logits


# ---------------------------------------------------------------------------------------------
# Alignment and the N-model merge
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alignment:
    """How models are aligned before merging (the ``match-*`` keys).

    Attributes
    ----------
    spec : PermutationSpec
        The architecture's spec (:func:`fedmerge.models.model_spec`).
    matcher : {"weight", "activation", "dual"}
        ``match-method``.
    mode : {"global", "largest", "barycenter"}
        ``match-reference`` (used by ``np-align=reference``).
    iterations : int
        ``match-iterations``.
    beta : float
        ``match-beta``.
    max_sweeps : int
        ``match-max-sweeps``.
    """

    spec: PermutationSpec
    matcher: str = "weight"
    mode: str = "global"
    iterations: int = 1
    beta: float = 0.5
    max_sweeps: int = 100

    def __post_init__(self) -> None:
        if self.mode not in REFERENCES:
            raise unknown_name("match-reference", self.mode, REFERENCES)
        it = self.iterations
        if isinstance(it, bool) or not isinstance(it, int) or it < 1:
            raise ConfigError("match-iterations", it, "an integer >= 1")

    def align(
        self,
        target: State,
        state: State,
        *,
        model: nn.Module,
        inputs: Tensor | None,
        seed: int,
        report: NPReport,
        moved: list[float],
    ) -> dict[str, Tensor]:
        """``state`` with its units permuted to match ``target``'s."""
        start = time.perf_counter()
        aligned, fraction = align_one(
            self.spec,
            self.matcher,
            target,
            state,
            model=model,
            inputs=inputs,
            beta=self.beta,
            seed=seed,
            max_sweeps=self.max_sweeps,
        )
        moved.append(fraction)
        report.match_seconds += time.perf_counter() - start
        return aligned


def align_to_reference(
    states: Sequence[State],
    shares: Sequence[float],
    *,
    reference: State | None,
    alignment: Alignment,
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
        spec=alignment.spec,
        matcher=alignment.matcher,
        mode=alignment.mode,
        iterations=alignment.iterations,
        beta=alignment.beta,
        model=model,
        inputs=inputs,
        seed=seed,
        max_sweeps=alignment.max_sweeps,
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
    alignment: Alignment,
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
    alignment : Alignment
        Matcher and reference (the ``match-*`` keys).
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
    common = {"model": model, "inputs": x, "report": report, "moved": moved}
    learn = {"options": options, "device": device, "reference": source, "report": report}
    aligned: list[dict[str, Tensor]] = []  # np-align=running aligns inside the chain
    if options.align == "reference":
        aligned = align_to_reference(
            states, shares, reference=reference, alignment=alignment, seed=seed, **common
        )
    if options.form == "softmax":
        start_state = average(aligned, shares, reference=source)
        merged = _cpu(
            learn_coefficients(model, aligned, shares, x_dev, y_dev, seed=seed, **learn)[0]
        )
    else:
        order = sorted(range(len(states)), key=lambda k: -shares[k])  # stable: ties in order
        merged = aligned[order[0]] if options.align == "reference" else states[order[0]]
        start_state, total = merged, shares[order[0]]
        for step, k in enumerate(order[1:], start=1):
            if options.align == "reference":
                nxt = aligned[k]
            else:  # the paper's successive form: align the next model to the running merge
                target = repair_batchnorm(work, merged, x_dev) if repair else merged
                nxt = alignment.align(_cpu(target), states[k], seed=seed + step, **common)
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


def np_merge_site(
    site: MergeSite,
    *,
    matcher: str = "weight",
    beta: float = 0.5,
    options: NPOptions = NPOptions(),
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """NP Merge row of the one-shot merge table: align B to A, learn on the merge-site data.

    ``site.x``/``site.y`` is the labelled merge-site slice; ``options.holdout`` of it is held
    out for early stopping. ``device`` None picks CUDA when available.
    """
    from .models import model_spec

    alignment = Alignment(model_spec(site.model), matcher=matcher, mode="global", beta=beta)
    return np_merge(
        [site.a, site.b],
        reference=site.a,
        model=site.model,
        x=site.x,
        y=site.y,
        alignment=alignment,
        options=options,
        seed=site.seed,
        device=resolve_device("auto") if device is None else device,
    )
