"""Build the strategy a run-config names: Flower's built-ins and fedmerge's own.

Every entry takes the validated :class:`fedmerge.config.RunConfig` and returns a Flower
Message-API strategy built through :func:`.validation.validated`: the class is the named one
behind :class:`.validation.ValidatedReplies`, which drops malformed client replies (logged and
counted in ``rejected-replies``) before the strategy aggregates. Otherwise fedmerge does not
alter Flower's built-ins: with ``strategy = "fedavg"``, the aggregation is Flower's ``FedAvg``
exactly, over the replies that pass. A new entry builds ``validated(MyStrategy)(...)``;
:func:`build_strategy` refuses an entry that does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedmerge.config import RunConfig
from fedmerge.errors import unknown_name
from fedmerge.options import FedMAOptions, FineTuneOptions, MatchOptions, NPOptions, WSAOptions
from fedmerge.scopes import sigma_spread

from .fedma import FedMA
from .fedmatch import FedMatch
from .finetune import FedAvgFineTuned, FedAvgRepaired, FedMatchFineTuned
from .merges import MatchedMerge
from .npmerge import FedNPMerge
from .replies import metric_list, metric_number
from .validation import ValidatedReplies, validated
from .wsa import FedWSA

if TYPE_CHECKING:
    from torch import nn

    from fedmerge.proxy import Proxy


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Flower's weighted mean of the clients' metrics, plus round facts a benchmark needs.

    Adds ``num-clients`` (replies aggregated), ``num-examples`` (their total) and
    ``train-time-max`` (the slowest client: a round's critical path when clients run in
    parallel).
    """
    merged = aggregate_metricrecords(records, weight_key)
    metrics = [next(iter(r.metric_records.values())) for r in records]
    merged["num-clients"] = len(records)
    merged["num-examples"] = int(sum(metric_number(m, weight_key) for m in metrics))
    times = [metric_number(m, "train-time") for m in metrics if "train-time" in m]
    if times:
        merged["train-time-max"] = float(max(times))
    sigmas = [metric_list(m, "scope-sigma") for m in metrics if "scope-sigma" in m]
    if len(sigmas) == len(metrics) and len({len(s) for s in sigmas}) == 1:
        # How far apart the clients' weight scopes drifted this round (WSA diagnostics).
        merged["scope-sigma-std"], merged["scope-spread"] = sigma_spread(sigmas)
    return merged


def _common(cfg: RunConfig) -> dict[str, Any]:
    return {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": cfg.min_train_clients,
        "min_evaluate_nodes": cfg.min_train_clients if cfg.fraction_evaluate > 0 else 0,
        "min_available_nodes": cfg.min_train_clients,
        "train_metrics_aggr_fn": aggregate_train_metrics,
    }


def _ours(cfg: RunConfig) -> dict[str, Any]:
    """:func:`_common` and what fedmerge's strategies take besides (``merge-threads``)."""
    return {**_common(cfg), "merge_threads": cfg.merge_threads}


# -- the run-config read into fedmerge's strategies' arguments (here only: the strategy
# classes take plain objects and options, as in a user's ServerApp) ---------------------------
def _model_and_proxy(cfg: RunConfig) -> tuple[nn.Module, Proxy | None]:
    """The run's model template and its proxy slice (the data is cached per process, so
    every strategy of a run sees the same samples)."""
    from fedmerge.federation import DataSpec, load_data, make_model
    from fedmerge.proxy import Proxy

    data = load_data(DataSpec.of(cfg))
    proxy = Proxy(data.x_proxy, data.y_proxy) if len(data.x_proxy) else None
    return make_model(cfg, data, seed=cfg.seed), proxy


def _with_data(cfg: RunConfig) -> dict[str, Any]:
    """``model``, ``proxy`` and ``seed``: what every strategy that merges with a model takes."""
    model, proxy = _model_and_proxy(cfg)
    return {"model": model, "proxy": proxy, "seed": cfg.seed}


def _device(cfg: RunConfig) -> Any:
    from fedmerge.training import resolve_device  # torch's device check, on first use

    return resolve_device(cfg.device)


def _finetuning(cfg: RunConfig) -> dict[str, Any]:
    """The fine-tuning controls' arguments besides :func:`_with_data`'s: NP Merge's label
    budget (``finetune-*``, ``np-*``) and the clients' SGD momentum and weight decay."""
    return {
        "options": FineTuneOptions.from_config(cfg),
        "np_options": NPOptions.from_config(cfg),
        "momentum": cfg.momentum,
        "weight_decay": cfg.weight_decay,
        "batch_size": cfg.np_batch_size,
        "device": _device(cfg),
    }


def _wsa_merge(cfg: RunConfig) -> MatchedMerge | None:
    """FedWSA's ``merge=``: FedMatch's merge with the ``match-*`` keys for
    ``wsa-merge=matched``, else None (FedAvg's average)."""
    if cfg.wsa_merge != "matched":
        return None
    model, proxy = _model_and_proxy(cfg)
    return MatchedMerge(model, MatchOptions.from_config(cfg), proxy)


def _fedopt(cfg: RunConfig) -> dict[str, Any]:
    return {
        "eta": cfg.fedopt_eta,
        "eta_l": cfg.lr,  # Flower only logs eta_l; the clients' lr is what they use
        "tau": cfg.fedopt_tau,
        **_common(cfg),
    }


def _betas(cfg: RunConfig) -> dict[str, Any]:
    return {"beta_1": cfg.fedopt_beta_1, "beta_2": cfg.fedopt_beta_2}


StrategyBuilder = Callable[[RunConfig], Strategy]

#: name -> (builder, one-line description). Keys are what ``strategy = ...`` accepts.
STRATEGIES: dict[str, tuple[StrategyBuilder, str]] = {
    "fedavg": (lambda c: validated(FedAvg)(**_common(c)), "Flower FedAvg: data-size weighted mean"),
    "fedprox": (
        lambda c: validated(FedProx)(proximal_mu=c.proximal_mu, **_common(c)),
        "Flower FedProx: FedAvg + clients' proximal term (proximal-mu)",
    ),
    "fedavgm": (
        lambda c: validated(FedAvgM)(
            server_learning_rate=c.server_lr, server_momentum=c.server_momentum, **_common(c)
        ),
        "Flower FedAvgM: server momentum (server-lr, server-momentum)",
    ),
    "fedadam": (
        lambda c: validated(FedAdam)(**_fedopt(c), **_betas(c)),
        "Flower FedAdam: server Adam (fedopt-*)",
    ),
    "fedyogi": (
        lambda c: validated(FedYogi)(**_fedopt(c), **_betas(c)),
        "Flower FedYogi: server Yogi (fedopt-*)",
    ),
    "fedadagrad": (
        lambda c: validated(FedAdagrad)(**_fedopt(c)),
        "Flower FedAdagrad: server Adagrad (fedopt-eta, fedopt-tau)",
    ),
    "fedmedian": (
        lambda c: validated(FedMedian)(**_common(c)),
        "Flower FedMedian: coordinate-wise median",
    ),
    "fedtrimmedavg": (
        lambda c: validated(FedTrimmedAvg)(beta=c.trimmed_beta, **_common(c)),
        "Flower FedTrimmedAvg: coordinate-wise trimmed mean (trimmed-beta)",
    ),
    "fedwsa": (
        lambda c: validated(FedWSA)(
            options=WSAOptions.from_config(c),
            merge=_wsa_merge(c),
            seed=c.seed,
            **_ours(c),
        ),
        "fedmerge FedWSA: Weight Scope Alignment, fused target scope (wsa-*)",
    ),
    "fedavg-ft": (
        lambda c: validated(FedAvgFineTuned)(**_with_data(c), **_finetuning(c), **_ours(c)),
        "fedmerge FedAvg fine-tuned on the proxy slice with NP Merge's label budget "
        "(finetune-*, np-*, proxy-size): a control for fednpmerge",
    ),
    "fedmatch-ft": (
        lambda c: validated(FedMatchFineTuned)(
            **_with_data(c), **_finetuning(c), match=MatchOptions.from_config(c), **_ours(c)
        ),
        "fedmerge FedMatch's matched average fine-tuned like fedavg-ft (match-*, finetune-*, "
        "np-*, proxy-size): the control fednpmerge must beat",
    ),
    "fedavg-bn": (
        lambda c: validated(FedAvgRepaired)(**_with_data(c), **_ours(c)),
        "fedmerge FedAvg + BatchNorm statistics recomputed on the proxy slice (proxy-size): "
        "the control for fedmatch's and fednpmerge's BN repair",
    ),
    "fedmatch": (
        lambda c: validated(FedMatch)(
            **_with_data(c), options=MatchOptions.from_config(c), **_ours(c)
        ),
        "fedmerge FedMatch: clients aligned by neuron matching, then averaged (match-*)",
    ),
    "fedma": (
        lambda c: validated(FedMA)(
            model=_model_and_proxy(c)[0],
            options=FedMAOptions.from_config(c),
            seed=c.seed,
            **_ours(c),
        ),
        "fedmerge FedMA: layer-by-layer BBP-MAP matching with frozen-prefix retraining, one "
        "Flower round per phase; the global model may grow (fedma-*; mlp, cnn, vgg9)",
    ),
    "fednpmerge": (
        lambda c: validated(FedNPMerge)(
            **_with_data(c),
            match=MatchOptions.from_config(c),
            options=NPOptions.from_config(c),
            device=_device(c),
            **_ours(c),
        ),
        "fedmerge FedNPMerge: aligned clients merged with per-parameter coefficients learned "
        "on the server proxy slice (np-*, match-*, proxy-size)",
    ),
}


def build_strategy(cfg: RunConfig) -> Strategy:
    """The strategy ``cfg.strategy`` names, configured from ``cfg`` (replies validated)."""
    if cfg.strategy not in STRATEGIES:
        raise unknown_name("strategy", cfg.strategy, STRATEGIES)
    strategy = STRATEGIES[cfg.strategy][0](cfg)
    if not isinstance(strategy, ValidatedReplies):
        # Without the mixin one bad reply can crash the server or poison the model.
        raise TypeError(
            f"strategy {cfg.strategy!r}: its registry entry must build "
            f"validated({type(strategy).__name__})(...), see strategies/validation.py"
        )
    return strategy
