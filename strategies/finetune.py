"""FedAvg fine-tuned on the server's proxy slice: the fair control for NP Merge.

NP Merge (``fednpmerge``) learns its merging coefficients on labelled server data that FedAvg
never sees. To tell what the *merge* contributes from what the *labels* contribute, this
strategy gives FedAvg the same data: each round it averages the clients (Flower's FedAvg mean,
:class:`~.merges.FineTunedAverage` in a :class:`~.base.MergeStrategy`), then
trains the average with SGD for ``finetune-epochs`` epochs over the proxy slice (``proxy-size``
samples held out of the training split; never a client's data, never the test split), and
broadcasts the result. Round metrics name the proxy size and the fine-tuning time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedmerge.options import FineTuneOptions
from fedmerge.proxy import ProxyLike

from .base import MergeStrategy
from .fedmatch import run_proxy
from .merges import FineTunedAverage, RepairedAverage

if TYPE_CHECKING:
    from fedmerge.config import RunConfig


class FedAvgFineTuned(MergeStrategy):
    """FedAvg followed by server-side SGD on the proxy data.

    Parameters
    ----------
    model : torch.nn.Module
        Template of the architecture (a private copy is trained; any model).
    proxy : (inputs, labels), Dataset or DataLoader
        The server's labelled proxy data (required).
    options : FineTuneOptions, optional
        ``finetune-epochs``, ``finetune-lr``; the keywords ``epochs`` and ``lr`` change them.
    momentum, weight_decay, batch_size : SGD settings
        The clients' momentum and weight decay, ``np-batch-size`` in fedmerge runs.
    device : torch.device or str
        Where to fine-tune.
    seed : int
        Seeds the batch order (plus the round number).
    **kwargs
        ``epochs``, ``lr``, and FedAvg's.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        proxy: ProxyLike,
        options: FineTuneOptions | None = None,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        batch_size: int = 64,
        device: torch.device | str = "cpu",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        changes, rest = FineTuneOptions.split(kwargs)
        merge = FineTunedAverage(
            model,
            proxy,
            FineTuneOptions.build(options, **changes),
            momentum=momentum,
            weight_decay=weight_decay,
            batch_size=batch_size,
            device=device,
        )
        super().__init__(merge=merge, seed=seed, **rest)
        self.finetune = merge


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


def finetune_options(cfg: RunConfig) -> dict[str, Any]:
    """FedAvgFineTuned's keyword arguments from a :class:`fedmerge.config.RunConfig`."""
    from fedmerge.training import resolve_device

    model, proxy = run_proxy(cfg)
    return {
        "model": model,
        "proxy": proxy,
        "options": FineTuneOptions.from_config(cfg),
        "momentum": cfg.momentum,
        "weight_decay": cfg.weight_decay,
        "batch_size": cfg.np_batch_size,
        "device": resolve_device(cfg.device),
        "seed": cfg.seed,
    }
