"""From a :class:`RunConfig` to the pieces of a federation: dataset, client shards, model.

Both Flower apps call these. Every client process recomputes its own shard from the config
(partitions are pure functions of labels, scheme and seed), and caches what it loaded, so a
process that serves many virtual clients (the local engine, a Ray actor) loads a file once
and partitions once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from .config import RunConfig
from .datasets import FederatedDataset, load_dataset
from .errors import ConfigError
from .models import build_model
from .partitions import add_feature_noise, make_partition

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSpec:
    """The config fields that decide the data; the cache key of loaded data and partitions."""

    dataset: str
    data_root: str
    download: bool
    max_train_samples: int
    max_test_samples: int
    validation_size: int
    proxy_size: int
    input_scaling: str
    seed: int
    num_clients: int
    synthetic_alpha: float
    synthetic_beta: float
    partition: str
    partition_beta: float
    partition_k: int
    partition_sigma: float
    partition_min_size: int

    @classmethod
    def of(cls, cfg: RunConfig, num_clients: int | None = None) -> DataSpec:
        """The data spec of ``cfg``, optionally for another number of clients."""
        names = cls.__dataclass_fields__
        values = {name: getattr(cfg, name) for name in names}
        if num_clients is not None:
            values["num_clients"] = num_clients
        return cls(**values)


@lru_cache(maxsize=4)
def load_data(spec: DataSpec) -> FederatedDataset:
    """Load (once per process) the dataset a spec names."""
    return load_dataset(
        spec.dataset,
        root=spec.data_root,
        download=spec.download,
        proxy_size=spec.proxy_size,
        max_train_samples=spec.max_train_samples,
        max_test_samples=spec.max_test_samples,
        validation_size=spec.validation_size,
        seed=spec.seed,
        num_clients=spec.num_clients,
        synthetic_alpha=spec.synthetic_alpha,
        synthetic_beta=spec.synthetic_beta,
        input_scaling=spec.input_scaling,
    )


@lru_cache(maxsize=4)
def partition_indices(spec: DataSpec) -> tuple[np.ndarray, ...]:
    """Every client's training-sample indices (computed once per process)."""
    data = load_data(spec)
    parts = make_partition(
        spec.partition,
        data.y_train.numpy(),
        spec.num_clients,
        spec.seed,
        beta=spec.partition_beta,
        k=spec.partition_k,
        min_size=spec.partition_min_size,
        num_classes=data.num_classes,
        groups=data.groups,
    )
    return tuple(parts)


# Unbounded in practice: all shards together hold one copy of the training split per device.
@lru_cache(maxsize=65536)
def client_shard(
    spec: DataSpec, partition_id: int, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of one client (its partition; feature noise applied when asked).

    Cached per process and ``device``: on a GPU the shard stays in device memory across
    rounds, so the data path costs no host-to-device copy per round.
    """
    if not 0 <= partition_id < spec.num_clients:
        raise ConfigError(
            "partition-id", partition_id, f"0..{spec.num_clients - 1} (num-partitions)"
        )
    data = load_data(spec)
    idx = torch.from_numpy(partition_indices(spec)[partition_id])
    x, y = data.x_train.index_select(0, idx), data.y_train.index_select(0, idx)
    if spec.partition == "noise":
        x = add_feature_noise(x, partition_id, spec.num_clients, spec.partition_sigma, spec.seed)
    return x.to(device), y.to(device)


def make_model(cfg: RunConfig, data: FederatedDataset, *, seed: int | None = None) -> nn.Module:
    """The configured model, sized for ``data``; seeded initialisation when ``seed`` is given."""
    return build_model(
        cfg.model,
        data.input_shape,
        data.num_classes,
        width=cfg.model_width,
        norm=cfg.model_norm,
        hidden=cfg.hidden_sizes,
        seed=seed,
    )


def client_seed(seed: int, partition_id: int, server_round: int) -> int:
    """A client's training seed for a round: independent streams per (seed, client, round).

    It depends on the partition id, never on a node id, so that every engine (whose node
    ids differ) trains each client identically.
    """
    state = np.random.SeedSequence([seed, partition_id, server_round]).generate_state(1)
    return int(state[0])
