"""FedWSA: Weight Scope Alignment as a Flower strategy (arXiv 2408.12237; docs/methods.md).

A ``FedAvg`` subclass. ``configure_train`` adds the target scope to every train instruction's
config; ``aggregate_train`` aggregates (FedAvg, or any merge function given), measures each
client's scope from the arrays it sent, and fuses them into the next round's target. Round 1's
target is the scope of the initial global model. Clients add the WSA term only when a target
arrives, so the same ClientApp serves every strategy.

Config keys of the target in the message (``ConfigRecord``): ``wsa-names`` (list of tensor
names), ``wsa-mu``, ``wsa-sigma`` (lists of floats), ``wsa-lambda`` (float), ``wsa-reverse``
(bool).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedmerge.errors import unknown_name
from fedmerge.scopes import (
    FUSION_RULES,
    LAYER_SETS,
    Scope,
    fuse_scopes,
    scope_names,
    scope_of,
    target_to_config,
)

from .validation import client_states

#: ``merge(states, weights, reference) -> state``: a fedmerge merge function.
MergeFn = Callable[
    [Sequence[Mapping[str, torch.Tensor]], Sequence[float], Mapping[str, torch.Tensor]],
    dict[str, torch.Tensor],
]


class FedWSA(FedAvg):
    """Federated learning with Weight Scope Alignment.

    Parameters
    ----------
    lam : float
        Weight of the scope regularizer on the clients (``wsa-lambda``).
    fusion : {"moment", "mean", "global", "fixed"}
        How the clients' scopes become the next target (``wsa-fusion``).
    reverse : bool
        Clients use ``KL(target || current)`` (``wsa-reverse``).
    layers : {"conv-linear", "all"}
        Which tensors have a scope (``wsa-layers``).
    merge : callable, optional
        Aggregate with this fedmerge merge function instead of FedAvg's weighted mean.
    **kwargs
        Passed to ``FedAvg`` (sampling, minimum nodes, metric aggregation).
    """

    def __init__(
        self,
        *,
        lam: float = 0.01,
        fusion: str = "moment",
        reverse: bool = False,
        layers: str = "conv-linear",
        merge: MergeFn | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if fusion not in FUSION_RULES:
            raise unknown_name("wsa-fusion", fusion, FUSION_RULES)
        if layers not in LAYER_SETS:
            raise unknown_name("wsa-layers", layers, LAYER_SETS)
        self.lam, self.fusion, self.reverse, self.layers = lam, fusion, reverse, layers
        self.merge = merge
        self._sent: dict[str, torch.Tensor] | None = None
        self.initial: Scope | None = None
        self.target: Scope | None = None

    def summary(self) -> None:
        """Log the configuration."""
        super().summary()
        log(
            INFO,
            "\t└──> WSA: lambda %s | fusion %s | reverse %s | layers %s | merge %s",
            self.lam,
            self.fusion,
            self.reverse,
            self.layers,
            getattr(self.merge, "__name__", "fedavg") if self.merge else "fedavg",
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
        """Send the current target scope with the train instruction.

        With a merge function, also remember the model sent: it is the merge's reference (the
        global model, as for FedMatch), not the round's FedAvg average.
        """
        if self.merge is not None:
            self._sent = arrays.to_torch_state_dict()
        if self.target is None:
            state = arrays.to_torch_state_dict()
            self.initial = self.target = scope_of(state, scope_names(state, self.layers))
        for key, value in target_to_config(self.target, self.lam, self.reverse).items():
            config[key] = value
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate, then fuse the clients' scopes into the next target."""
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or self.target is None:
            return arrays, metrics
        states, weights = client_states(replies, self.weighted_by_key)
        if self.merge is not None:
            reference = self._sent if self._sent is not None else arrays.to_torch_state_dict()
            arrays = ArrayRecord(self.merge(states, weights, reference))
        names = self.target.names
        scopes = [scope_of(s, names) for s in states]
        global_scope = scope_of(arrays.to_torch_state_dict(), names)
        self.target = fuse_scopes(
            scopes, weights, self.fusion, global_scope=global_scope, initial=self.initial
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
