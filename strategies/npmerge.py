"""FedNPMerge: NP Merge (arXiv 2412.15467) as a Flower strategy (docs/methods.md, NP Merge).

A :class:`~.fedmatch.FedMatch` subclass: the clients are aligned exactly as FedMatch aligns
them (``match-*`` keys), then merged with per-parameter coefficients learned on the server's
proxy slice (``proxy-size`` labelled samples held out of the training split: never a client's
data, never the test split) by :func:`fedmerge.npmerge.np_merge` (``np-*`` keys), and the
merged model is broadcast. The proxy set is an advantage FedAvg does not get: every round's
metrics name its size (``proxy-size``).

Round metrics, besides FedAvg's: ``proxy-size``, ``match-time``, ``units-moved``,
``merge-time`` (alignment + learning + BN repair), ``np-time`` (learning only), ``np-steps``,
``np-epochs``, ``np-proxy-loss-start`` / ``np-proxy-loss-end`` (mean cross-entropy on the
whole proxy slice of the aligned weighted average, i.e. FedMatch's merge, and of the learned
merge), ``np-holdout-loss-start`` / ``np-holdout-loss-end`` (the same on its held-out part),
``np-state-mb`` (counted bytes of the learning problem's tensors) and, on CUDA,
``np-peak-cuda-mb`` (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from logging import INFO

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedmerge.errors import ConfigError
from fedmerge.npmerge import Alignment, NPOptions, NPReport, np_merge
from fedmerge.training import resolve_device

from .fedmatch import FedMatch, fedmatch_options
from .validation import client_states

_MB = 2**20


class FedNPMerge(FedMatch):
    """Federated NP Merge: align the clients, learn per-parameter coefficients on the proxy.

    Parameters
    ----------
    proxy : Tensor
        The server's proxy inputs (``proxy-size`` > 0 samples).
    proxy_labels : Tensor
        Their labels.
    options : NPOptions
        The ``np-*`` keys.
    device : torch.device or str
        Where the coefficients are learned.
    **kwargs
        FedMatch's (``model``, ``matcher``, ``reference``, ``iterations``, ``beta``,
        ``bn_repair``, ``seed``, ``max_sweeps``) and FedAvg's.

    Raises
    ------
    ConfigError
        No proxy slice (names ``proxy-size``), or FedMatch's errors.
    """

    def __init__(
        self,
        *,
        proxy: torch.Tensor | None,
        proxy_labels: torch.Tensor | None,
        options: NPOptions | None = None,
        device: torch.device | str = "cpu",
        **kwargs,
    ) -> None:
        if proxy is None or proxy_labels is None or len(proxy) == 0:
            raise ConfigError(
                "proxy-size",
                0,
                "> 0 for strategy fednpmerge",
                hint="NP Merge learns its coefficients on the server's labelled proxy slice; "
                "set e.g. proxy-size=500",
            )
        if len(proxy_labels) != len(proxy):
            raise ValueError(f"{len(proxy)} proxy inputs but {len(proxy_labels)} labels")
        if kwargs.get("matcher") == "dual" and kwargs.get("beta") == "auto":
            raise ConfigError(
                "match-beta",
                "auto",
                "a number in [0, 1] for strategy fednpmerge",
                hint="NP Merge aligns with one beta; fedmatch and fedwsa (wsa-merge=matched) "
                "choose it on the proxy slice",
            )
        super().__init__(proxy=proxy, proxy_labels=proxy_labels, **kwargs)
        self.options = options if options is not None else NPOptions()
        self.device = torch.device(device)
        self.alignment = Alignment(
            self.spec,
            matcher=self.matcher,
            mode=self.reference,
            iterations=self.iterations,
            beta=self.beta,
            max_sweeps=self.max_sweeps,
        )

    def summary(self) -> None:
        """Log the configuration."""
        super().summary()
        o = self.options
        log(
            INFO,
            "\t└──> NP Merge: %s | align %s | init %s | params %s | lr %g | epochs %d | "
            "batch %d | hold-out %g | patience %d | BN %s | device %s",
            o.form,
            o.align,
            o.init,
            o.params,
            o.lr,
            o.epochs,
            o.batch_size,
            o.holdout,
            o.patience,
            o.bn_mode,
            self.device,
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's checks and metrics, then NP Merge of the client models."""
        replies = list(replies)
        # FedAvg's, not FedMatch's: the matched average would be computed and thrown away.
        arrays, metrics = FedAvg.aggregate_train(self, server_round, replies)
        if arrays is None:
            return arrays, metrics
        start = time.perf_counter()
        states, weights = client_states(replies, self.weighted_by_key)
        report = NPReport()
        merged = np_merge(
            states,
            weights,
            reference=self._sent,
            model=self.model,
            x=self.proxy,
            y=self.proxy_labels,
            alignment=self.alignment,
            options=self.options,
            seed=self.seed + server_round,
            device=self.device,
            bn_repair=self.repair,
            report=report,
        )
        metrics = metrics if metrics is not None else MetricRecord()
        metrics["proxy-size"] = self.proxy_size
        metrics["match-time"] = report.match_seconds
        metrics["units-moved"] = report.units_moved
        metrics["merge-time"] = time.perf_counter() - start
        metrics["np-time"] = report.seconds
        metrics["np-steps"] = report.steps
        metrics["np-epochs"] = report.epochs
        for key, value in (
            ("np-proxy-loss-start", report.loss_start),
            ("np-proxy-loss-end", report.loss_end),
            ("np-holdout-loss-start", report.holdout_start),
            ("np-holdout-loss-end", report.holdout_end),
        ):
            if math.isfinite(value):  # NaN when one client replied or there is no hold-out
                metrics[key] = value
        metrics["np-state-mb"] = report.state_bytes / _MB
        if self.device.type == "cuda":
            metrics["np-peak-cuda-mb"] = report.peak_cuda_bytes / _MB
        return ArrayRecord(merged), metrics


def fednpmerge_options(cfg) -> dict:
    """FedNPMerge's keyword arguments from a :class:`fedmerge.config.RunConfig`."""
    from fedmerge.federation import DataSpec, load_data

    data = load_data(DataSpec.of(cfg))  # cached: the same object fedmatch_options loaded
    return {
        **fedmatch_options(cfg),
        "proxy_labels": data.y_proxy if len(data.y_proxy) else None,
        "options": NPOptions.from_config(cfg),
        "device": resolve_device(cfg.device),
    }
