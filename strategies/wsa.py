"""FedWSA: Weight Scope Alignment as a Flower strategy (arXiv 2408.12237; docs/methods.md).

A :class:`~.base.MergeStrategy`. ``configure_train`` adds the target scope to every train
instruction's config; ``aggregate_train`` aggregates (FedAvg's mean, or any merge function
given), measures each client's scope from the arrays it sent (clients need report nothing
about scopes), and fuses them into the next round's target. Round 1's
target is the scope of the initial global model. Clients add the WSA term only when a target
arrives, so the same ClientApp serves every strategy; a user's own ClientApp gets the term
from :func:`fedmerge.client_side.loss_terms`.

Config keys of the target in the message (``ConfigRecord``): ``wsa-names`` (list of tensor
names), ``wsa-mu``, ``wsa-sigma`` (lists of floats), ``wsa-lambda`` (float), ``wsa-reverse``
(bool).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log
from torch import nn

from fedmerge.options import MatchOptions, WSAOptions
from fedmerge.proxy import ProxyLike
from fedmerge.scopes import Scope, fuse_scopes, scope_names, scope_of, target_to_config

from .base import MergeStrategy
from .merges import MatchedMerge, MergeFn


class FedWSA(MergeStrategy):
    """Federated learning with Weight Scope Alignment.

    Parameters
    ----------
    options : WSAOptions, optional
        The ``wsa-*`` options; keyword arguments named as its fields (``lam``, ``fusion``,
        ``reverse``, ``layers``) change them.
    merge : callable or {"average", "matched"}, optional
        Aggregate with this merge function (:mod:`.merges`) instead of FedAvg's mean;
        ``"matched"`` builds :class:`~.merges.MatchedMerge` from ``model``, ``proxy`` and
        ``match`` (the default when ``options.merge == "matched"``).
    model, proxy, match, example_input :
        For ``merge="matched"`` only (see :class:`~.fedmatch.FedMatch`).
    seed : int
        The merge's seed (plus the round number).
    **kwargs
        The option fields above, and FedAvg's (sampling, minimum nodes, metric aggregation).
    """

    def __init__(
        self,
        *,
        options: WSAOptions | None = None,
        merge: MergeFn | str | None = None,
        model: nn.Module | None = None,
        proxy: ProxyLike = None,
        match: MatchOptions | None = None,
        example_input: torch.Tensor | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        changes, rest = WSAOptions.split(kwargs)
        if isinstance(merge, str):
            changes["merge"] = merge
        self.options = WSAOptions.build(options, **changes)
        if callable(merge):
            fn: MergeFn | None = merge
        elif self.options.merge == "matched":
            if model is None:
                raise TypeError("FedWSA(merge='matched') needs model= (the architecture)")
            fn = MatchedMerge(model, match, proxy, example_input=example_input)
        else:
            fn = None
        super().__init__(merge=fn, seed=seed, **rest)
        self.initial: Scope | None = None
        self.target: Scope | None = None

    @property
    def lam(self) -> float:
        """``wsa-lambda``."""
        return self.options.lam

    def summary(self) -> None:
        """Log the configuration."""
        super().summary()
        o = self.options
        log(
            INFO,
            "\t└──> WSA: lambda %s | fusion %s | reverse %s | layers %s",
            o.lam,
            o.fusion,
            o.reverse,
            o.layers,
        )

    def state_dict(self) -> dict[str, dict[str, list] | None]:
        """The state carried across rounds (checkpoints): the target and initial scopes."""
        return {"target": _scope_to_plain(self.target), "initial": _scope_to_plain(self.initial)}

    def load_state_dict(self, state: Mapping[str, Mapping[str, list] | None]) -> None:
        """Restore what :meth:`state_dict` returned (resuming a run)."""
        self.target = _scope_from_plain(state["target"])
        self.initial = _scope_from_plain(state["initial"])

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the current target scope with the train instruction (round 1: the initial
        model's scope)."""
        if self.target is None:
            state = arrays.to_torch_state_dict()
            self.initial = self.target = scope_of(state, scope_names(state, self.options.layers))
        o = self.options
        for key, value in target_to_config(self.target, o.lam, o.reverse).items():
            config[key] = value
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate, then fuse the clients' scopes into the next target."""
        arrays, metrics, states, weights = self.aggregate_states(server_round, replies)
        if arrays is None or self.target is None:
            return arrays, metrics
        names = self.target.names
        scopes = [scope_of(s, names) for s in states]
        global_scope = scope_of(arrays.to_torch_state_dict(), names)
        self.target = fuse_scopes(
            scopes, weights, self.options.fusion, global_scope=global_scope, initial=self.initial
        )
        metrics = metrics if metrics is not None else MetricRecord()
        metrics["wsa-target-sigma"] = [float(v) for v in self.target.sigma]
        metrics["wsa-target-mu"] = [float(v) for v in self.target.mu]
        return arrays, metrics


def _scope_to_plain(scope: Scope | None) -> dict[str, list] | None:
    if scope is None:
        return None
    return {
        "names": list(scope.names),
        "mu": [float(v) for v in scope.mu],  # float64 either way: exact
        "sigma": [float(v) for v in scope.sigma],
    }


def _scope_from_plain(plain: Mapping[str, list] | None) -> Scope | None:
    if plain is None:
        return None
    return Scope(tuple(plain["names"]), tuple(plain["mu"]), tuple(plain["sigma"]))
