"""FedMatch: neuron-matched averaging as a Flower strategy (docs/methods.md).

A :class:`~.base.MergeStrategy` (FedAvg with the aggregation replaced) whose merge function is
:class:`~.merges.MatchedMerge`: each round it aligns every client model's hidden units to a
reference (by default the global model the server sent) with a matcher of
:mod:`fedmerge.matching`, then takes the data-size weighted average. Any PyTorch model works:
its own ``permutation_spec()``, or a spec inferred from an example input. Data-based matchers
(``activation``, ``dual`` with beta < 1) and BatchNorm repair use the server's proxy slice
(``proxy-size`` samples held out of the training split, never a client's data nor the test
split); the round metrics name its size.

Sampling, messaging, metric aggregation and the reply contract are FedAvg's: the strategy runs
under ``fedmerge run``, ``flwr run`` and a real SuperLink like any other.
"""

from __future__ import annotations

from logging import INFO
from typing import Any

import torch
from flwr.supercore import log
from torch import nn

from fedmerge.options import MatchOptions
from fedmerge.proxy import ProxyLike

from .base import MergeStrategy
from .merges import MatchedMerge


class FedMatch(MergeStrategy):
    """Federated neuron-matched averaging.

    Parameters
    ----------
    model : torch.nn.Module
        Template of the architecture (any model; see :class:`~.merges.MatchedMerge`). Not
        modified.
    proxy : tensors, (inputs, labels), Dataset or DataLoader, optional
        The server's proxy data, for data-based matchers, BatchNorm repair and
        ``beta="auto"`` (labels needed for that one).
    options : MatchOptions, optional
        The ``match-*`` options; keyword arguments named as its fields (``method``,
        ``reference``, ``iterations``, ``beta``, ``bn_repair``, ``max_sweeps``) change them.
    example_input : Tensor, optional
        A batch of inputs to infer the spec from when the model has no ``permutation_spec()``
        (default: the first two proxy inputs).
    seed : int
        Seed of the matchers' visiting order (plus the round number).
    **kwargs
        The option fields above, and FedAvg's (``fraction_train``, ``min_train_nodes``, ...).

    Raises
    ------
    ConfigError
        A bad option (names its ``match-*`` key), or data needed but no proxy data (names
        ``proxy-size``).

    Examples
    --------
    >>> strategy = FedMatch(model=Net(), example_input=torch.randn(2, 3, 32, 32),
    ...                     method="weight", fraction_train=0.5)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        proxy: ProxyLike = None,
        options: MatchOptions | None = None,
        example_input: torch.Tensor | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        changes, rest = MatchOptions.split(kwargs)
        merge = MatchedMerge(
            model, MatchOptions.build(options, **changes), proxy, example_input=example_input
        )
        super().__init__(merge=merge, seed=seed, **rest)
        self.matched = merge

    @property
    def options(self) -> MatchOptions:
        """The ``match-*`` options in use."""
        return self.matched.options

    def summary(self) -> None:
        """Log the configuration."""
        super().summary()
        o = self.options
        log(
            INFO,
            "\t└──> matching: %s | reference %s | iterations %d | beta %s | sites %s | "
            "BN repair %s | proxy %d samples",
            o.method,
            o.reference,
            o.iterations,
            o.beta,
            o.sites,
            self.matched.repair,
            self.matched.proxy_size,
        )
