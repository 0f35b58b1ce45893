"""The merge functions fedmerge's strategies are configurations of.

A merge function turns a round's client models into the next global model::

    merge(states, weights, reference, *, seed=0) -> (merged, report)

``states`` are the clients' state dicts (never modified), ``weights`` their data sizes,
``reference`` the global model the server sent this round, ``seed`` a per-round seed for any
randomness; ``merged`` is a new state dict and ``report`` a dict of round metrics
(``str -> float``). :class:`~.base.MergeStrategy` calls one each round. A user's own function
may leave out ``seed`` and may return the merged state alone.

Each class here binds a method's options, the template model and the server's proxy data once
(checking them at construction, naming the run-config key of a bad one) and is then a pure
function of its arguments. None of them imports Flower.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedmerge.errors import ConfigError
from fedmerge.merging import (
    MatchReport,
    has_batchnorm,
    matched_average,
    repair_batchnorm,
    select_beta,
)
from fedmerge.models import model_spec
from fedmerge.npmerge import NPOptions, NPReport, np_merge
from fedmerge.npmerge.finetune import fine_tune_like_np
from fedmerge.options import FineTuneOptions, MatchOptions
from fedmerge.permutations import PermutationSpec, State
from fedmerge.proxy import Proxy, ProxyLike, as_proxy
from fedmerge.training import SGDSettings, train

__all__ = [
    "FineTunedAverage",
    "MatchedMerge",
    "MergeFn",
    "NPMerge",
    "RepairedAverage",
    "fedavg_average",
]

Report = dict[str, float]
#: ``merge(states, weights, reference, *, seed) -> (merged, report)``.
MergeFn = Callable[..., tuple[dict[str, Tensor], Report] | dict[str, Tensor]]

_MB = 2**20
log = logging.getLogger(__name__)


def fedavg_average(states: Sequence[State], weights: Sequence[float]) -> dict[str, Tensor]:
    """Flower FedAvg's weighted mean, to the bit, on state dicts already deserialised.

    The same arithmetic as ``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords``
    (factors ``w / sum(w)`` as Python floats, ``acc = x_0 * f_0``, then ``acc += x_i * f_i``
    in NumPy, so integer buffers become float64 exactly as there). A test keeps the two equal.
    """
    total = sum(float(w) for w in weights)
    factors = [float(w) / total for w in weights]
    out: dict[str, Tensor] = {}
    for key in states[0]:
        acc = states[0][key].detach().cpu().numpy() * factors[0]
        for state, factor in zip(states[1:], factors[1:], strict=True):
            acc += state[key].detach().cpu().numpy() * factor
        out[key] = torch.from_numpy(np.asarray(acc))
    return out


def _spec(model: nn.Module, proxy: Proxy | None, example_input: Tensor | None) -> PermutationSpec:
    """The model's own spec, or one inferred from an example input (or the first two proxy
    inputs: a batch of 2 lets the inference's check see how samples flow)."""
    if example_input is None and proxy is not None:
        example_input = proxy.x[:2]
    return model_spec(model, example_input)


def _labelled_proxy(proxy: ProxyLike, use: str, hint: str) -> Proxy:
    """The proxy data as tensors; ConfigError naming ``proxy-size`` unless labelled and not
    empty."""
    data = as_proxy(proxy)
    if data is None or not data.labelled:
        raise ConfigError(
            "proxy-size", 0 if data is None else len(data), f"> 0 labelled samples for {use}", hint
        )
    return data


def _check_data(options: MatchOptions, proxy: Proxy | None, repair: bool) -> None:
    """Refuse matching options that need proxy data the server does not have."""
    if options.auto_beta and (proxy is None or not proxy.labelled):
        raise ConfigError(
            "match-beta",
            options.beta,
            "a number in [0, 1] without a labelled proxy slice",
            hint="auto scores each candidate on the server's labelled proxy data "
            "(proxy-size > 0, or proxy=(inputs, labels))",
        )
    if options.needs_data and proxy is None:
        raise ConfigError(
            "proxy-size",
            0,
            f"> 0 for match-method={options.method}",
            hint="Data-based matching runs on the server's proxy data (proxy-size, or proxy=); "
            "or use match-method=weight",
        )
    if repair and proxy is None:
        raise ConfigError(
            "proxy-size",
            0,
            "> 0 for BatchNorm repair of a model with BatchNorm",
            hint="Or set match-bn-repair=false (the merged model keeps averaged statistics)",
        )


class MatchedMerge:
    """Neuron-matched averaging: align every client to a reference, then average (FedMatch).

    Parameters
    ----------
    model : torch.nn.Module
        Template of the architecture (any model: its ``permutation_spec()`` if it has one,
        otherwise a spec inferred from ``example_input`` or the first two proxy inputs; see
        :func:`fedmerge.models.model_spec`). Not modified.
    options : MatchOptions
        The ``match-*`` options.
    proxy : tensors, Dataset or DataLoader, optional
        The server's proxy data (:func:`fedmerge.proxy.as_proxy`): inputs for data-based
        matchers and BatchNorm repair, labels for ``beta="auto"``.
    example_input : Tensor, optional
        A batch of inputs to trace the model with when it has no ``permutation_spec()``.

    Raises
    ------
    ConfigError
        Options that need proxy data the server lacks (names ``proxy-size`` or ``match-beta``).
    TypeError
        A model without a spec and no input to infer one from.
    """

    def __init__(
        self,
        model: nn.Module,
        options: MatchOptions | None = None,
        proxy: ProxyLike = None,
        *,
        example_input: Tensor | None = None,
    ) -> None:
        self.options = MatchOptions.build(options)
        self.proxy = as_proxy(proxy)
        self.repair = self.options.bn_repair and has_batchnorm(model)
        _check_data(self.options, self.proxy, self.repair)
        self.model, self.spec = model, _spec(model, self.proxy, example_input)
        self.__name__ = f"matched-{self.options.method}"

    @property
    def proxy_size(self) -> int:
        """Samples of proxy data the server holds."""
        return 0 if self.proxy is None else len(self.proxy)

    def __call__(
        self,
        states: Sequence[State],
        weights: Sequence[float],
        reference: State | None,
        *,
        seed: int = 0,
    ) -> tuple[dict[str, Tensor], Report]:
        """The matched average of ``states`` (BatchNorm-repaired), and its report."""
        o, proxy = self.options, self.proxy
        report: Report = {}
        common: dict[str, Any] = {
            "reference": reference,
            "spec": self.spec,
            "model": self.model,
            "seed": seed,
        }
        if o.auto_beta:  # the chosen candidate's merge is kept: no matching at it again
            assert proxy is not None and proxy.y is not None
            choice = select_beta(
                list(states),
                list(weights),
                inputs=proxy.x,
                labels=proxy.y,
                options=replace(o, bn_repair=self.repair),
                **common,
            )
            report["match-beta"] = choice.beta
            merged, match, repaired = choice.merged, choice.report, self.repair
            seconds = choice.seconds
        else:
            match = MatchReport()
            merged = matched_average(
                list(states),
                list(weights),
                options=o,
                inputs=None if proxy is None else proxy.x,
                report=match,
                **common,
            )
            repaired, seconds = False, match.seconds
        if match.units_moved == 0:
            # Every alignment was the identity: the clients' own models are averaged, with
            # FedAvg's own arithmetic, so the round is FedAvg's to the bit (not up to float
            # summation order), and paired comparisons with FedAvg carry no rounding noise.
            log.info("matching moved no unit this round: the merge is FedAvg's")
            merged, repaired = fedavg_average(states, weights), False
        if self.repair and not repaired:
            assert proxy is not None
            merged = repair_batchnorm(self.model, merged, proxy.x)
        report["match-time"] = seconds
        report["units-moved"] = match.units_moved
        report["proxy-size"] = self.proxy_size
        return merged, report


class NPMerge:
    """NP Merge: align the clients as :class:`MatchedMerge` does, then learn per-parameter
    merging coefficients on the labelled proxy data (arXiv 2412.15467; FedNPMerge).

    Parameters
    ----------
    model : torch.nn.Module
        Template of the architecture (any model, as for :class:`MatchedMerge`).
    proxy : tensors, Dataset or DataLoader
        Labelled proxy data (required).
    match : MatchOptions
        How clients are aligned (``match-*``; ``beta="auto"`` is refused: NP Merge aligns with
        one beta).
    options : NPOptions
        The ``np-*`` options.
    device : torch.device or str
        Where the coefficients are learned.
    example_input : Tensor, optional
        As for :class:`MatchedMerge`.
    """

    def __init__(
        self,
        model: nn.Module,
        proxy: ProxyLike,
        match: MatchOptions | None = None,
        options: NPOptions | None = None,
        *,
        device: torch.device | str = "cpu",
        example_input: Tensor | None = None,
    ) -> None:
        self.proxy = _labelled_proxy(
            proxy,
            "NP Merge",
            "NP Merge learns its coefficients on the server's labelled proxy data; "
            "set e.g. proxy-size=500, or pass proxy=(inputs, labels)",
        )
        self.match = MatchOptions.build(match)
        if self.match.auto_beta:
            raise ConfigError(
                "match-beta",
                "auto",
                "a number in [0, 1] for NP Merge (strategy fednpmerge)",
                hint="NP Merge aligns with one beta; fedmatch and fedwsa (wsa-merge=matched) "
                "choose it on the proxy slice",
            )
        self.options = NPOptions.build(options)
        self.repair = self.match.bn_repair and has_batchnorm(model)
        self.model, self.spec = model, _spec(model, self.proxy, example_input)
        self.device = torch.device(device)
        self.__name__ = "np-merge"

    def __call__(
        self,
        states: Sequence[State],
        weights: Sequence[float],
        reference: State | None,
        *,
        seed: int = 0,
    ) -> tuple[dict[str, Tensor], Report]:
        """NP Merge of ``states``, and its report (``np-*`` round metrics)."""
        assert self.proxy is not None and self.proxy.y is not None
        np_report = NPReport()
        merged = np_merge(
            list(states),
            list(weights),
            reference=reference,
            model=self.model,
            x=self.proxy.x,
            y=self.proxy.y,
            spec=self.spec,
            match=self.match,
            options=self.options,
            seed=seed,
            device=self.device,
            bn_repair=self.repair,
            report=np_report,
        )
        return merged, _np_facts(np_report, len(self.proxy), self.device)


def _np_facts(r: NPReport, proxy_size: int, device: torch.device) -> Report:
    facts: Report = {
        "proxy-size": proxy_size,
        "match-time": r.match_seconds,
        "units-moved": r.units_moved,
        "np-time": r.seconds,
        "np-steps": r.steps,
        "np-epochs": r.epochs,
        "np-problems": r.problems,
    }
    starts, ends = r.holdout_starts, r.holdout_ends
    for key, value in (
        ("np-proxy-loss-start", r.loss_start),
        ("np-proxy-loss-end", r.loss_end),
        # Held-out losses of the learning problems (N - 1 pairwise, or 1 softmax): their mean,
        # and the last problem's (the one whose result is the merged model).
        ("np-holdout-loss-start-mean", float(np.mean(starts)) if starts else math.nan),
        ("np-holdout-loss-end-mean", float(np.mean(ends)) if ends else math.nan),
        ("np-holdout-loss-start-last", starts[-1] if starts else math.nan),
        ("np-holdout-loss-end-last", ends[-1] if ends else math.nan),
    ):
        if math.isfinite(value):  # NaN when one client replied or there is no hold-out
            facts[key] = value
    facts["np-state-mb"] = r.state_bytes / _MB
    if device.type == "cuda":
        facts["np-peak-cuda-mb"] = r.peak_cuda_bytes / _MB
    return facts


class FineTunedAverage:
    """A merge (FedAvg's average by default), then fine-tuned on the server's labelled proxy
    data: the controls for NP Merge (``fedavg-ft``; ``fedmatch-ft`` with a matched merge).

    Parameters
    ----------
    model : torch.nn.Module
        Template of the architecture (a private copy is trained; any model).
    proxy : tensors, Dataset or DataLoader
        Labelled proxy data (required).
    options : FineTuneOptions
        ``finetune-budget`` (``np``: NP Merge's budget, read from ``np_options``; ``epochs``:
        ``finetune-epochs`` of SGD at ``finetune-lr``).
    np_options : NPOptions
        NP Merge's options whose budget ``finetune-budget = np`` spends.
    base : merge function, optional
        What is fine-tuned: ``base(states, weights, reference, seed=...)``; None: FedAvg's
        weighted mean (:func:`fedavg_average`). Its report joins the round metrics.
    momentum, weight_decay : float
        SGD settings of budget ``epochs`` (the clients' ``momentum`` and ``weight-decay``).
    batch_size : int
        Samples per SGD step of budget ``epochs`` (``np-batch-size`` in fedmerge runs).
    device : torch.device or str
        Where to fine-tune.
    """

    def __init__(
        self,
        model: nn.Module,
        proxy: ProxyLike,
        options: FineTuneOptions | None = None,
        *,
        np_options: NPOptions | None = None,
        base: MergeFn | None = None,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        batch_size: int = 64,
        device: torch.device | str = "cpu",
    ) -> None:
        self.proxy = _labelled_proxy(
            proxy,
            "fine-tuning on the server",
            "set e.g. proxy-size=500, or pass proxy=(inputs, labels)",
        )
        self.options = FineTuneOptions.build(options)
        self.np_options = NPOptions.build(np_options)
        self.model, self.device, self.base = model, device, base
        self.sgd = SGDSettings(
            self.options.epochs,
            batch_size,
            self.options.lr,
            momentum=momentum,
            weight_decay=weight_decay,
        )
        self.__name__ = "fedavg-ft" if base is None else f"{_name(base)}-ft"

    def problems(self, clients: int) -> int:
        """The learning problems NP Merge would solve on ``clients`` models (its budget's unit)."""
        if clients < 2:
            return 0
        return 1 if self.np_options.form == "softmax" else clients - 1

    def __call__(
        self,
        states: Sequence[State],
        weights: Sequence[float],
        reference: State | None,
        *,
        seed: int = 0,
    ) -> tuple[dict[str, Tensor], Report]:
        """The base merge of ``states``, fine-tuned on the proxy data, and the report."""
        assert self.proxy is not None and self.proxy.y is not None
        report: Report = {}
        if self.base is None:
            start = fedavg_average(states, weights)
        else:
            out = self.base(states, weights, reference, seed=seed)
            start, report = (out[0], dict(out[1])) if isinstance(out, tuple) else (out, {})
        report["proxy-size"] = len(self.proxy)
        if self.options.budget == "np":
            state, done = fine_tune_like_np(
                self.model,
                start,
                self.proxy.x,
                self.proxy.y,
                options=self.np_options,
                problems=self.problems(len(states)),
                seed=seed,
                device=self.device,
            )
            report["finetune-steps"], report["finetune-epochs"] = done.steps, done.epochs
            for key, value in (
                ("finetune-loss", done.loss),
                ("finetune-holdout-loss-start", done.holdout_start),
                ("finetune-holdout-loss-end", done.holdout_end),
            ):
                if math.isfinite(value):
                    report[key] = value
            return state, report
        current = self.model.state_dict()
        self.model.load_state_dict({k: v.to(current[k].dtype) for k, v in start.items()})
        result = train(
            self.model,
            self.proxy.x,
            self.proxy.y,
            self.sgd,
            seed=seed,
            device=self.device,
        )
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        report.update({"finetune-loss": result.loss, "finetune-steps": result.steps})
        report["finetune-epochs"] = self.options.epochs
        return state, report


def _name(merge: MergeFn) -> str:
    return str(getattr(merge, "__name__", type(merge).__name__))


class RepairedAverage:
    """FedAvg's weighted mean with BatchNorm statistics recomputed on the proxy inputs.

    The control for the BatchNorm repair FedMatch and FedNPMerge apply every round: with it,
    a gain of theirs over FedAvg can be split into what the repair gives and what the
    alignment (or learning) gives. A model without BatchNorm gets FedAvg's mean unchanged.

    Parameters
    ----------
    model : torch.nn.Module
        Template of the architecture (its forward pass reads the proxy inputs; not modified).
    proxy : tensors, Dataset or DataLoader
        The server's proxy data (inputs only are read).
    """

    def __init__(self, model: nn.Module, proxy: ProxyLike) -> None:
        self.proxy = as_proxy(proxy)
        if self.proxy is None:
            raise ConfigError(
                "proxy-size",
                0,
                "> 0 for strategy fedavg-bn (BatchNorm statistics are recomputed on it)",
                hint="set e.g. proxy-size=500, or pass proxy=inputs",
            )
        self.model, self.repair = model, has_batchnorm(model)
        self.__name__ = "fedavg-bn-repair"

    def __call__(
        self,
        states: Sequence[State],
        weights: Sequence[float],
        reference: State | None,
        *,
        seed: int = 0,
    ) -> tuple[dict[str, Tensor], Report]:
        """The weighted mean, its BatchNorm statistics recomputed on the proxy inputs."""
        assert self.proxy is not None
        merged = fedavg_average(states, weights)
        if self.repair:
            merged = repair_batchnorm(self.model, merged, self.proxy.x)
        return merged, {"proxy-size": len(self.proxy)}
