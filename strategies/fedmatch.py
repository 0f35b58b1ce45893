"""FedMatch: neuron-matched averaging as a Flower strategy (docs/methods.md).

A ``FedAvg`` subclass that overrides aggregation only: each round it aligns every client
model's hidden units to a reference (by default the global model the server sent) with a
matcher of :mod:`fedmerge.matching`, then takes the data-size weighted average
(:func:`fedmerge.merging.matched_average`). Data-based matchers (``activation``, ``dual`` with
beta < 1) and BatchNorm repair use the server's proxy slice (``proxy-size`` samples held out of
the training split, never a client's data nor the test split); the round metrics name its size.

Sampling, messaging, metric aggregation and the reply contract are FedAvg's: the strategy runs
under ``fedmerge run``, ``flwr run`` and a real SuperLink like any other.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log
from torch import nn

from fedmerge.errors import ConfigError, unknown_name
from fedmerge.merging import (
    MATCHER_NAMES,
    REFERENCES,
    MatchReport,
    has_batchnorm,
    matched_average,
    repair_batchnorm,
    select_beta,
)
from fedmerge.models import model_spec

from .validation import client_states

#: Matchers that read activations, i.e. need the proxy slice.
DATA_MATCHERS = ("activation", "dual")


class FedMatch(FedAvg):
    """Federated neuron-matched averaging.

    Parameters
    ----------
    model : torch.nn.Module
        Template of the architecture (its permutation spec and, for data-based matchers,
        its forward pass). Not modified.
    matcher : {"weight", "activation", "dual"}
        How units are matched (``match-method``).
    reference : {"global", "largest", "barycenter"}
        What clients are aligned to (``match-reference``).
    iterations : int
        Align-then-average passes (``match-iterations``).
    beta : float or "auto"
        Weight-space share of the dual matcher (``match-beta``); 1 is data-free. ``"auto"``
        chooses it every round from :data:`fedmerge.merging.BETA_GRID` by the proxy loss of
        the merged model (MuDSC's selection; needs ``proxy_labels``).
    proxy : Tensor, optional
        The server's proxy inputs, for data-based matchers and BatchNorm repair.
    proxy_labels : Tensor, optional
        Their labels (for ``beta="auto"``).
    bn_repair : bool
        Recompute BatchNorm statistics of the merged model on the proxy slice
        (``match-bn-repair``); ignored for models without BatchNorm.
    seed : int
        Seed of the matchers' visiting order.
    max_sweeps : int
        Coordinate-descent sweeps per matching.
    **kwargs
        Passed to ``FedAvg``.

    Raises
    ------
    ConfigError
        Unknown matcher or reference, or data needed but no proxy slice (names ``proxy-size``).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        matcher: str = "weight",
        reference: str = "global",
        iterations: int = 1,
        beta: float | str = 0.5,
        proxy: torch.Tensor | None = None,
        proxy_labels: torch.Tensor | None = None,
        bn_repair: bool = True,
        seed: int = 0,
        max_sweeps: int = 100,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if matcher not in MATCHER_NAMES:
            raise unknown_name("match-method", matcher, MATCHER_NAMES)
        if reference not in REFERENCES:
            raise unknown_name("match-reference", reference, REFERENCES)
        proxy_size = 0 if proxy is None else len(proxy)
        auto = matcher == "dual" and beta == "auto"
        if beta != "auto" and (isinstance(beta, str) or not 0 <= beta <= 1):
            raise ConfigError("match-beta", beta, "a number in [0, 1], or auto")
        if auto and (proxy_labels is None or len(proxy_labels) != proxy_size):
            raise ConfigError(
                "match-beta",
                beta,
                "a number in [0, 1] without a labelled proxy slice",
                hint="auto scores each candidate on the server's labelled proxy slice "
                "(proxy-size > 0)",
            )
        needs_data = matcher == "activation" or (matcher == "dual" and (auto or beta < 1))
        if needs_data and proxy_size == 0:
            raise ConfigError(
                "proxy-size",
                0,
                f"> 0 for match-method={matcher}",
                hint="Data-based matching runs on the server's proxy slice; or use "
                "match-method=weight",
            )
        self.repair = bn_repair and has_batchnorm(model)
        if self.repair and proxy_size == 0:
            raise ConfigError(
                "proxy-size",
                0,
                "> 0 for BatchNorm repair of a model with BatchNorm",
                hint="Or set match-bn-repair=false (the merged model keeps averaged statistics)",
            )
        self.model, self.spec = model, model_spec(model)
        self.matcher, self.reference, self.iterations, self.beta = (
            matcher,
            reference,
            iterations,
            beta,
        )
        self.proxy, self.proxy_labels, self.proxy_size = proxy, proxy_labels, proxy_size
        self.seed, self.max_sweeps = seed, max_sweeps
        self._sent: dict[str, torch.Tensor] | None = None

    def summary(self) -> None:
        """Log the configuration."""
        super().summary()
        log(
            INFO,
            "\t└──> matching: %s | reference %s | iterations %d | beta %s | BN repair %s | "
            "proxy %d samples",
            self.matcher,
            self.reference,
            self.iterations,
            self.beta,
            self.repair,
            self.proxy_size,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model sent (the default matching reference)."""
        self._sent = arrays.to_torch_state_dict()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's checks and metrics, then the matched average of the client models."""
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        start = time.perf_counter()
        states, weights = client_states(replies, self.weighted_by_key)
        merged, facts = self.merge(states, weights, self._sent, server_round)
        metrics = metrics if metrics is not None else MetricRecord()
        for key, value in facts.items():
            metrics[key] = value
        metrics["merge-time"] = time.perf_counter() - start
        metrics["proxy-size"] = self.proxy_size
        return ArrayRecord(merged), metrics

    def merge(
        self,
        states: list[dict[str, torch.Tensor]],
        weights: list[float],
        reference: dict[str, torch.Tensor] | None,
        server_round: int = 0,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The matched average of ``states`` (BatchNorm-repaired), and round metrics."""
        seed = self.seed + server_round
        facts: dict[str, float] = {}
        beta = self.beta
        if self.matcher == "dual" and beta == "auto":
            assert self.proxy is not None and self.proxy_labels is not None
            choice = select_beta(
                states,
                weights,
                reference=reference,
                spec=self.spec,
                model=self.model,
                inputs=self.proxy,
                labels=self.proxy_labels,
                mode=self.reference,
                iterations=self.iterations,
                bn_repair=self.repair,
                seed=seed,
                max_sweeps=self.max_sweeps,
            )
            beta = facts["match-beta"] = choice.beta
        report = MatchReport()
        merged = matched_average(
            states,
            weights,
            reference=reference,
            spec=self.spec,
            matcher=self.matcher,
            mode=self.reference,
            iterations=self.iterations,
            beta=0.5 if beta == "auto" else float(beta),  # auto: only the dual matcher reads it
            model=self.model,
            inputs=self.proxy,
            seed=seed,
            max_sweeps=self.max_sweeps,
            report=report,
        )
        if self.repair:
            merged = repair_batchnorm(self.model, merged, self.proxy)
        facts["match-time"] = report.seconds
        facts["units-moved"] = report.units_moved
        return merged, facts


def fedmatch_options(cfg) -> dict:
    """FedMatch's keyword arguments from a :class:`fedmerge.config.RunConfig`.

    Loads the run's data (cached per process) for the model template and the proxy slice.
    """
    from fedmerge.federation import DataSpec, load_data, make_model

    data = load_data(DataSpec.of(cfg))
    return {
        "model": make_model(cfg, data, seed=cfg.seed),
        "matcher": cfg.match_method,
        "reference": cfg.match_reference,
        "iterations": cfg.match_iterations,
        "beta": cfg.match_beta,
        "proxy": data.x_proxy if len(data.x_proxy) else None,
        "proxy_labels": data.y_proxy if len(data.y_proxy) else None,
        "bn_repair": cfg.match_bn_repair,
        "seed": cfg.seed,
        "max_sweeps": cfg.match_max_sweeps,
    }


def matched_merge(cfg):
    """A ``merge(states, weights, reference)`` function for FedWSA's ``merge=`` hook: FedMatch's
    merge with the run's ``match-*`` keys."""
    matcher = FedMatch(**fedmatch_options(cfg))

    def merge(states, weights, reference):
        return matcher.merge(list(states), list(weights), reference)[0]

    merge.__name__ = f"matched-{matcher.matcher}"
    return merge
