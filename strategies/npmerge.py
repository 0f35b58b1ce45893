"""FedNPMerge: NP Merge (arXiv 2412.15467) as a Flower strategy (docs/methods.md, NP Merge).

A :class:`~.base.MergeStrategy` whose merge function is :class:`~.merges.NPMerge`: the clients
are aligned exactly as FedMatch aligns them (``match-*`` keys), then merged with per-parameter
coefficients learned on the server's proxy slice (``proxy-size`` labelled samples held out of
the training split: never a client's data, never the test split) by
:func:`fedmerge.npmerge.np_merge` (``np-*`` keys), and the merged model is broadcast. The proxy
set is an advantage FedAvg does not get: every round's metrics name its size (``proxy-size``).

Round metrics, besides FedAvg's: ``proxy-size``, ``match-time``, ``units-moved``,
``merge-time`` (alignment + learning + BN repair), ``np-time`` (learning only), ``np-steps``
(Adam steps over all learning problems: the label budget a control must match), ``np-epochs``,
``np-problems`` (N - 1 pairwise problems, or 1 softmax), ``np-proxy-loss-start`` /
``np-proxy-loss-end`` (mean cross-entropy on the whole proxy slice of the aligned weighted
average, i.e. FedMatch's merge, and of the learned merge), ``np-holdout-loss-start-mean`` /
``-end-mean`` (each learning problem's held-out loss at its start and the best it reached,
averaged over the problems) and ``np-holdout-loss-start-last`` / ``-end-last`` (the last
problem's, whose result is the merged model),
``np-state-mb`` (counted bytes of the learning problem's tensors) and, on CUDA,
``np-peak-cuda-mb`` (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

from logging import INFO
from typing import Any

import torch
from flwr.supercore import log
from torch import nn

from fedmerge.npmerge import NPOptions
from fedmerge.options import MatchOptions
from fedmerge.proxy import ProxyLike

from .base import MergeStrategy
from .merges import NPMerge


class FedNPMerge(MergeStrategy):
    """Federated NP Merge: align the clients, learn per-parameter coefficients on the proxy.

    Parameters
    ----------
    model : torch.nn.Module
        Template of the architecture (any model; see :class:`~.merges.MatchedMerge`).
    proxy : (inputs, labels), Dataset or DataLoader
        The server's labelled proxy data (required).
    match : MatchOptions, optional
        How clients are aligned (``match-*``).
    options : NPOptions, optional
        The ``np-*`` options.
    device : torch.device or str
        Where the coefficients are learned.
    example_input : Tensor, optional
        For spec inference (default: the first two proxy inputs).
    seed : int
        Seeds alignment and learning (plus the round number).
    **kwargs
        Fields of :class:`MatchOptions` or :class:`NPOptions` by name (``method="dual"``,
        ``epochs=5``) and FedAvg's.

    Raises
    ------
    ConfigError
        No labelled proxy data (names ``proxy-size``), ``match-beta=auto``, or a bad option.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        proxy: ProxyLike,
        match: MatchOptions | None = None,
        options: NPOptions | None = None,
        device: torch.device | str = "cpu",
        example_input: torch.Tensor | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        match_changes, rest = MatchOptions.split(kwargs)
        np_changes, rest = NPOptions.split(rest)
        merge = NPMerge(
            model,
            proxy,
            MatchOptions.build(match, **match_changes),
            NPOptions.build(options, **np_changes),
            device=device,
            example_input=example_input,
        )
        super().__init__(merge=merge, seed=seed, **rest)
        self.np = merge

    @property
    def options(self) -> NPOptions:
        """The ``np-*`` options in use."""
        return self.np.options

    def summary(self) -> None:
        """Log the configuration."""
        super().summary()
        o, m = self.options, self.np.match
        log(
            INFO,
            "\t└──> NP Merge: %s | align %s (%s, reference %s) | init %s | params %s | lr %g | "
            "epochs %d | batch %d | hold-out %g | patience %d | BN %s | device %s | proxy %d",
            o.form,
            o.align,
            m.method,
            m.reference,
            o.init,
            o.params,
            o.lr,
            o.epochs,
            o.batch_size,
            o.holdout,
            o.patience,
            o.bn_mode,
            self.np.device,
            len(self.np.proxy),
        )
