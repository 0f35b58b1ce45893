"""Merges fine-tuned on the server's proxy slice: the fair controls for NP Merge.

NP Merge (``fednpmerge``) learns its merging coefficients on labelled server data that FedAvg
never sees. To tell what the *merge* contributes from what the *labels* contribute, these
strategies give a plain merge the same data: each round they merge the clients (FedAvg's mean
in ``fedavg-ft``; FedMatch's matched average, aligned exactly as NP Merge aligns them, in
``fedmatch-ft``), then fine-tune the merged model on the proxy slice (``proxy-size`` samples
held out of the training split; never a client's data, never the test split) and broadcast
it. By default (``finetune-budget = np``) the fine-tuning spends NP Merge's label budget: the
same optimiser, learning rate, batch size, epochs per learning problem times the problems NP
Merge would solve on the round's clients, and early stopping on the same held-out share
(:mod:`fedmerge.npmerge.finetune`). Round metrics: ``proxy-size``, ``finetune-steps`` (to check
against NP Merge's ``np-steps``), ``finetune-epochs``, ``finetune-loss``,
``finetune-holdout-loss-start`` / ``-end``, and the base merge's own (``units-moved``, ...).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedmerge.npmerge import NPOptions
from fedmerge.options import FineTuneOptions, MatchOptions
from fedmerge.proxy import ProxyLike

from .base import MergeStrategy
from .merges import FineTunedAverage, MatchedMerge, RepairedAverage


class FedAvgFineTuned(MergeStrategy):
    """FedAvg followed by fine-tuning on the server's proxy data.

    Parameters
    ----------
    model : torch.nn.Module
        Template of the architecture (a private copy is trained; any model).
    proxy : (inputs, labels), Dataset or DataLoader
        The server's labelled proxy data (required).
    options : FineTuneOptions, optional
        ``finetune-budget``, ``-epochs``, ``-lr``; the keywords ``budget``, ``epochs`` and
        ``lr`` change them.
    np_options : NPOptions, optional
        The NP Merge options whose label budget ``finetune-budget = np`` spends.
    base : merge function, optional
        What is fine-tuned (``merge(states, weights, reference, seed=...)``, see
        :mod:`.merges`); None: FedAvg's weighted mean.
    momentum, weight_decay, batch_size : SGD settings
        Of ``finetune-budget = epochs``: the clients' momentum and weight decay,
        ``np-batch-size`` in fedmerge runs.
    device : torch.device or str
        Where to fine-tune.
    seed : int
        Seeds the held-out split and the batch order (plus the round number).
    **kwargs
        ``budget``, ``epochs``, ``lr``, and FedAvg's.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        proxy: ProxyLike,
        options: FineTuneOptions | None = None,
        np_options: NPOptions | None = None,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        batch_size: int = 64,
        device: torch.device | str = "cpu",
        seed: int = 0,
        base: Any = None,
        **kwargs: Any,
    ) -> None:
        changes, rest = FineTuneOptions.split(kwargs)
        merge = FineTunedAverage(
            model,
            proxy,
            FineTuneOptions.build(options, **changes),
            np_options=np_options,
            base=base,
            momentum=momentum,
            weight_decay=weight_decay,
            batch_size=batch_size,
            device=device,
        )
        super().__init__(merge=merge, seed=seed, **rest)
        self.finetune = merge


class FedMatchFineTuned(FedAvgFineTuned):
    """FedMatch's matched average, then the same fine-tuning as :class:`FedAvgFineTuned`:
    the control NP Merge must beat (same alignment, same labels, no learned coefficients).

    Parameters
    ----------
    model, proxy, options, np_options, momentum, weight_decay, batch_size, device, seed
        As :class:`FedAvgFineTuned`.
    match : MatchOptions, optional
        How the clients are aligned (``match-*``, as FedMatch and NP Merge).
    example_input : Tensor, optional
        For spec inference when the model declares no ``permutation_spec()``.
    **kwargs
        ``budget``, ``epochs``, ``lr``, and FedAvg's.

    Examples
    --------
    >>> FedMatchFineTuned(model=Net(), proxy=(x, y), fraction_train=0.5)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        proxy: ProxyLike,
        match: MatchOptions | None = None,
        example_input: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        base = MatchedMerge(model, match, proxy, example_input=example_input)
        super().__init__(model=model, proxy=proxy, base=base, **kwargs)
        self.matched = base


class FedAvgRepaired(MergeStrategy):
    """FedAvg with BatchNorm statistics recomputed on the proxy data every round: the control
    for FedMatch's and FedNPMerge's BatchNorm repair (:class:`~.merges.RepairedAverage`).

    Parameters
    ----------
    model : torch.nn.Module
        Template of the architecture.
    proxy : tensors, Dataset or DataLoader
        The server's proxy data (inputs are enough).
    **kwargs
        FedAvg's.
    """

    def __init__(self, *, model: nn.Module, proxy: ProxyLike, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(merge=RepairedAverage(model, proxy), seed=seed, **kwargs)
