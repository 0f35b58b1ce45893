"""FedAvg fine-tuned on the server's proxy slice: the fair control for NP Merge.

NP Merge (``fednpmerge``) learns its merging coefficients on labelled server data that FedAvg
never sees. To tell what the *merge* contributes from what the *labels* contribute, this
strategy gives FedAvg the same data: each round it averages the clients (Flower's FedAvg), then
trains the average with SGD for ``finetune-epochs`` epochs over the proxy slice (``proxy-size``
samples held out of the training split; never a client's data, never the test split), and
broadcasts the result. Round metrics name the proxy size and the fine-tuning time.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedmerge.errors import ConfigError
from fedmerge.training import train


class FedAvgFineTuned(FedAvg):
    """FedAvg followed by server-side SGD on the proxy slice.

    Parameters
    ----------
    model : torch.nn.Module
        Template of the architecture (a private copy is trained).
    proxy, proxy_labels : Tensor
        The server's labelled proxy slice.
    epochs, lr, momentum, weight_decay, batch_size : SGD settings
        ``finetune-epochs``, ``finetune-lr``, the clients' momentum and weight decay,
        ``np-batch-size``.
    seed : int
        Seeds the batch order (plus the round number).
    device : torch.device or str
        Where to fine-tune.
    **kwargs
        Passed to ``FedAvg``.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        proxy: torch.Tensor | None,
        proxy_labels: torch.Tensor | None,
        epochs: int = 1,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        batch_size: int = 64,
        seed: int = 0,
        device: torch.device | str = "cpu",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if proxy is None or proxy_labels is None or len(proxy) == 0:
            raise ConfigError(
                "proxy-size", 0, "> 0 for strategy fedavg-ft", hint="set e.g. proxy-size=500"
            )
        self.model, self.proxy, self.proxy_labels = model, proxy, proxy_labels
        self.sgd = {
            "epochs": epochs,
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "batch_size": batch_size,
        }
        self.seed, self.device = seed, device

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg, then SGD on the proxy slice."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        start = time.perf_counter()
        self.model.load_state_dict(arrays.to_torch_state_dict())
        result = train(
            self.model,
            self.proxy,
            self.proxy_labels,
            seed=self.seed + server_round,
            device=self.device,
            **self.sgd,
        )
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        metrics = metrics if metrics is not None else MetricRecord()
        metrics["finetune-time"] = time.perf_counter() - start
        metrics["finetune-loss"] = result.loss
        metrics["proxy-size"] = len(self.proxy)
        return ArrayRecord(state), metrics


def finetune_options(cfg) -> dict:
    """FedAvgFineTuned's keyword arguments from a :class:`fedmerge.config.RunConfig`."""
    from fedmerge.federation import DataSpec, load_data, make_model
    from fedmerge.training import resolve_device

    data = load_data(DataSpec.of(cfg))
    return {
        "model": make_model(cfg, data, seed=cfg.seed),
        "proxy": data.x_proxy if len(data.x_proxy) else None,
        "proxy_labels": data.y_proxy if len(data.y_proxy) else None,
        "epochs": cfg.finetune_epochs,
        "lr": cfg.finetune_lr,
        "momentum": cfg.momentum,
        "weight_decay": cfg.weight_decay,
        "batch_size": cfg.np_batch_size,
        "seed": cfg.seed,
        "device": resolve_device(cfg.device),
    }
