"""Build the strategy a run-config names: Flower's built-ins now, fedmerge's own later.

Every entry takes the validated :class:`fedmerge.config.RunConfig` and returns a Flower
Message-API strategy. fedmerge does not wrap or alter Flower's built-ins: a run with
``strategy = "fedavg"`` is Flower's ``FedAvg`` exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
from fedmerge.scopes import sigma_spread

from .wsa import FedWSA


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Flower's weighted mean of the clients' metrics, plus round facts a benchmark needs.

    Adds ``num-clients`` (replies aggregated), ``num-examples`` (their total) and
    ``train-time-max`` (the slowest client: a round's critical path when clients run in
    parallel).
    """
    merged = aggregate_metricrecords(records, weight_key)
    metrics = [next(iter(r.metric_records.values())) for r in records]
    merged["num-clients"] = len(records)
    merged["num-examples"] = int(sum(m[weight_key] for m in metrics))
    times = [m["train-time"] for m in metrics if "train-time" in m]
    if times:
        merged["train-time-max"] = float(max(times))
    sigmas = [list(m["scope-sigma"]) for m in metrics if "scope-sigma" in m]
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
    "fedavg": (lambda c: FedAvg(**_common(c)), "Flower FedAvg: data-size weighted mean"),
    "fedprox": (
        lambda c: FedProx(proximal_mu=c.proximal_mu, **_common(c)),
        "Flower FedProx: FedAvg + clients' proximal term (proximal-mu)",
    ),
    "fedavgm": (
        lambda c: FedAvgM(
            server_learning_rate=c.server_lr, server_momentum=c.server_momentum, **_common(c)
        ),
        "Flower FedAvgM: server momentum (server-lr, server-momentum)",
    ),
    "fedadam": (
        lambda c: FedAdam(**_fedopt(c), **_betas(c)),
        "Flower FedAdam: server Adam (fedopt-*)",
    ),
    "fedyogi": (
        lambda c: FedYogi(**_fedopt(c), **_betas(c)),
        "Flower FedYogi: server Yogi (fedopt-*)",
    ),
    "fedadagrad": (
        lambda c: FedAdagrad(**_fedopt(c)),
        "Flower FedAdagrad: server Adagrad (fedopt-eta, fedopt-tau)",
    ),
    "fedmedian": (
        lambda c: FedMedian(**_common(c)),
        "Flower FedMedian: coordinate-wise median",
    ),
    "fedtrimmedavg": (
        lambda c: FedTrimmedAvg(beta=c.trimmed_beta, **_common(c)),
        "Flower FedTrimmedAvg: coordinate-wise trimmed mean (trimmed-beta)",
    ),
    "fedwsa": (
        lambda c: FedWSA(
            lam=c.wsa_lambda,
            fusion=c.wsa_fusion,
            reverse=c.wsa_reverse,
            layers=c.wsa_layers,
            **_common(c),
        ),
        "fedmerge FedWSA: Weight Scope Alignment, fused target scope (wsa-*)",
    ),
}


def build_strategy(cfg: RunConfig) -> Strategy:
    """The strategy ``cfg.strategy`` names, configured from ``cfg``."""
    if cfg.strategy not in STRATEGIES:
        raise unknown_name("strategy", cfg.strategy, STRATEGIES)
    return STRATEGIES[cfg.strategy][0](cfg)
