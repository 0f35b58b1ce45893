"""From a RunConfig to a client's shard: the ``noise`` partition's feature noise."""

from __future__ import annotations

import pytest
import torch

from fedmerge.config import RunConfig
from fedmerge.federation import DataSpec, client_shard, load_data, partition_indices

NUM_CLIENTS = 4
SIGMA = 0.8


def _spec(**over) -> DataSpec:
    values = {
        "partition": "noise",
        "partition-sigma": SIGMA,
        "num-clients": NUM_CLIENTS,
        "seed": 3,
        **over,
    }
    return DataSpec.of(RunConfig.from_mapping(values))


def _clean(spec: DataSpec, pid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``pid``'s samples as the dataset holds them (no noise)."""
    data = load_data(spec)
    idx = torch.from_numpy(partition_indices(spec)[pid])
    return data.x_train.index_select(0, idx), data.y_train.index_select(0, idx)


def test_noise_partition_adds_noise_of_the_documented_scale_to_each_shard():
    # docs/user-guide.md, partition-sigma: client i adds N(0, (sigma * i / num-clients)^2).
    spec = _spec()
    for pid in range(NUM_CLIENTS):
        x, y = client_shard(spec, pid)
        x_clean, y_clean = _clean(spec, pid)
        assert torch.equal(y, y_clean)  # labels untouched
        noise = (x - x_clean).double()
        if pid == 0:
            assert torch.equal(x, x_clean)  # client 0: no noise
            continue
        std = SIGMA * pid / NUM_CLIENTS
        # ~23k draws per shard: the sample std is within a few percent of the true one.
        assert float(noise.std()) == pytest.approx(std, rel=0.05), pid
        assert abs(float(noise.mean())) < 0.05 * std, pid


def test_noise_is_deterministic_per_seed_and_differs_across_seeds_and_clients():
    spec = _spec()
    x, _ = client_shard(spec, 2)
    client_shard.cache_clear()
    again, _ = client_shard(spec, 2)
    assert again is not x and torch.equal(again, x)  # recomputed, same noise
    other_seed = _spec(seed=4)
    noise = (x - _clean(spec, 2)[0]).flatten()
    other = (client_shard(other_seed, 2)[0] - _clean(other_seed, 2)[0]).flatten()
    # Another seed, and another client, draw independent noises (not copies, not rescaled).
    n3 = (client_shard(spec, 3)[0] - _clean(spec, 3)[0]).flatten()
    for rival in (other, n3):
        m = min(len(noise), len(rival))
        corr = torch.corrcoef(torch.stack([noise[:m], rival[:m]]))[0, 1]
        assert abs(float(corr)) < 0.05


def test_other_partitions_and_zero_sigma_add_no_noise():
    for spec in (_spec(partition="iid"), _spec(**{"partition-sigma": 0.0})):
        for pid in range(NUM_CLIENTS):
            assert torch.equal(client_shard(spec, pid)[0], _clean(spec, pid)[0])


def test_the_data_spec_holds_every_data_and_partition_key_and_nothing_else():
    """DataSpec (the cache key of loaded data and partitions) lists the data and partition
    components' fields, the seed and the clients: a key added to a component and not here
    would let two different datasets share one cache entry."""
    from dataclasses import fields

    from fedmerge.components import DataOptions, PartitionOptions

    expected = {f.name for f in fields(DataOptions)} | {f.name for f in fields(PartitionOptions)}
    assert {f.name for f in fields(DataSpec)} == expected | {"seed", "num_clients"}
