"""Tests of fedmerge.partitions: the NIID-Bench partition schemes and the flwr-datasets adapter."""

from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmerge.errors import ConfigError
from fedmerge.partitions import (
    MAX_REDRAWS,
    MAX_SIZE_REDRAWS,
    PARTITIONS,
    FlwrDatasetsPartitioner,
    add_feature_noise,
    label_counts,
    label_skew,
    make_partition,
    size_skew,
)

NUM_CLASSES = 10
NUM_CLIENTS = 10
RANDOM_SCHEMES = [s for s in PARTITIONS if s != "natural"]


def _labels(n_per_class: int = 300, seed: int = 0) -> np.ndarray:
    """Shuffled labels, 10 classes of slightly unequal sizes (like a real data set)."""
    rng = np.random.default_rng(seed)
    sizes = n_per_class + rng.integers(-n_per_class // 5, n_per_class // 5 + 1, NUM_CLASSES)
    return rng.permutation(np.repeat(np.arange(NUM_CLASSES), sizes)).astype(np.int64)


def _groups(n: int, num_groups: int = NUM_CLIENTS, seed: int = 1) -> np.ndarray:
    """Natural group ids (user ids), every group present, unequal group sizes."""
    rng = np.random.default_rng(seed)
    g = rng.integers(0, num_groups, n)
    g[:num_groups] = np.arange(num_groups)
    return g * 7 + 3  # ids need not be 0..n-1


LABELS = _labels()
GROUPS = _groups(LABELS.size)


def _part(scheme: str, labels: np.ndarray = LABELS, seed: int = 0, **kw: Any) -> list[np.ndarray]:
    if scheme == "natural":
        kw.setdefault("groups", GROUPS if labels is LABELS else _groups(labels.size))
    kw.setdefault("num_clients", NUM_CLIENTS)
    num_clients = kw.pop("num_clients")
    return make_partition(scheme, labels, num_clients, seed, **kw)


def _held_labels(scheme: str, parts: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """Return the indices a scheme must cover: all, or for label-quantity those of held labels."""
    if scheme != "label-quantity":
        return np.arange(labels.size)
    held = np.unique(np.concatenate([labels[p] for p in parts]))
    return np.flatnonzero(np.isin(labels, held))


# ---------------------------------------------------------------------------------------------
# properties of every scheme
# ---------------------------------------------------------------------------------------------


def test_registry_names() -> None:
    assert set(PARTITIONS) == {
        "iid",
        "dirichlet",
        "label-quantity",
        "quantity-skew",
        "noise",
        "natural",
    }


@pytest.mark.parametrize("scheme", list(PARTITIONS))
def test_disjoint_complete_sorted(scheme: str) -> None:
    parts = _part(scheme)
    assert len(parts) == NUM_CLIENTS
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)  # sorted, no duplicates within a client
    union = np.concatenate(parts)
    assert union.size == np.unique(union).size  # disjoint
    np.testing.assert_array_equal(np.sort(union), _held_labels(scheme, parts, LABELS))


@pytest.mark.parametrize("scheme", list(PARTITIONS))
def test_deterministic_per_seed(scheme: str) -> None:
    a, b = _part(scheme, seed=3), _part(scheme, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    c = _part(scheme, seed=4)
    same = all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert same is (scheme == "natural")


@pytest.mark.parametrize("scheme", list(PARTITIONS))
def test_pure_does_not_mutate_inputs(scheme: str) -> None:
    labels = LABELS.copy()
    labels.flags.writeable = False  # any in-place write would raise
    groups = GROUPS.copy()
    groups.flags.writeable = False
    parts = make_partition(scheme, labels, NUM_CLIENTS, 0, groups=groups)
    np.testing.assert_array_equal(labels, LABELS)
    np.testing.assert_array_equal(groups, GROUPS)
    assert sum(p.size for p in parts) > 0


@pytest.mark.parametrize("scheme", list(PARTITIONS))
def test_registry_function_matches_front_door(scheme: str) -> None:
    fn = PARTITIONS[scheme]
    direct = fn(LABELS, NUM_CLIENTS, np.random.default_rng(5), groups=GROUPS, k=2, beta=0.5)
    front = _part(scheme, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(direct, front, strict=True))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(30, 400),
    num_classes=st.integers(1, 12),
    num_clients=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    scheme=st.sampled_from(["iid", "dirichlet", "label-quantity", "quantity-skew", "noise"]),
)
def test_property_disjoint_complete(
    n: int, num_classes: int, num_clients: int, seed: int, scheme: str
) -> None:
    labels = np.random.default_rng(seed).integers(0, num_classes, n)
    k = min(2, int(labels.max()) + 1)
    parts = make_partition(scheme, labels, num_clients, seed, k=k, beta=1.0, min_size=2)
    union = np.concatenate(parts)
    assert union.size == np.unique(union).size
    np.testing.assert_array_equal(np.sort(union), _held_labels(scheme, parts, labels))


# ---------------------------------------------------------------------------------------------
# NIID-Bench properties
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_label_quantity_k_labels_each(k: int) -> None:
    parts = _part("label-quantity", k=k)
    counts = label_counts(parts, LABELS, NUM_CLASSES)
    for i, row in enumerate(counts):
        assert np.count_nonzero(row) == k
        assert row[i % NUM_CLASSES] > 0


def test_label_quantity_even_split_and_dropped_labels() -> None:
    # 4 clients x 1 label: labels 4..9 are held by nobody and dropped (as in NIID-Bench).
    parts = _part("label-quantity", num_clients=4, k=1)
    union = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(union, np.flatnonzero(LABELS < 4))
    # 20 clients x 1 label: each label's samples split evenly between its 2 holders.
    parts = _part("label-quantity", num_clients=20, k=1)
    for i in range(NUM_CLASSES):
        a, b = parts[i].size, parts[i + NUM_CLASSES].size
        assert abs(a - b) <= 1
        assert a + b == np.count_nonzero(LABELS == i)


def test_label_quantity_all_labels_is_balanced() -> None:
    parts = _part("label-quantity", k=NUM_CLASSES)
    counts = label_counts(parts, LABELS, NUM_CLASSES)
    assert np.all(counts.max(axis=0) - counts.min(axis=0) <= 1)


def test_dirichlet_mnist_sized() -> None:
    labels = np.random.default_rng(0).integers(0, 10, 60_000)
    parts = make_partition("dirichlet", labels, 10, 0, beta=0.5)
    sizes = np.array([p.size for p in parts])
    assert sizes.min() >= 10
    assert sizes.sum() == 60_000
    assert label_skew(parts, labels) > 0.2  # really Non-IID
    counts = label_counts(parts, labels, 10)
    np.testing.assert_array_equal(counts.sum(axis=0), np.bincount(labels, minlength=10))


@pytest.mark.parametrize("min_size", [10, 50])
def test_dirichlet_min_size(min_size: int) -> None:
    for seed in range(5):
        parts = _part("dirichlet", seed=seed, beta=0.1, min_size=min_size)
        assert min(p.size for p in parts) >= min_size


def test_dirichlet_skew_grows_as_beta_falls() -> None:
    def mean_skew(scheme: str, beta: float) -> float:
        return float(
            np.mean([label_skew(_part(scheme, seed=s, beta=beta), LABELS) for s in range(4)])
        )

    iid_skew = mean_skew("iid", 0.5)
    s100, s05, s01 = (mean_skew("dirichlet", b) for b in (100.0, 0.5, 0.1))
    assert iid_skew < 0.1
    assert s100 < 0.1
    assert s100 < s05 < s01
    assert s01 > 0.5


def test_quantity_skew_iid_labels_unequal_sizes() -> None:
    def mean_size_skew(beta: float) -> float:
        return float(
            np.mean([size_skew(_part("quantity-skew", seed=s, beta=beta)) for s in range(4)])
        )

    assert mean_size_skew(0.1) > mean_size_skew(0.5) > mean_size_skew(5.0) > 0.0
    assert size_skew(_part("iid")) < 0.01
    for seed in range(4):
        parts = _part("quantity-skew", seed=seed, beta=0.5)
        assert min(p.size for p in parts) >= 10
        assert size_skew(parts) > 0.2
        # IID label mix: large clients look like the global distribution ...
        big = [p for p in parts if p.size >= 300]
        assert big
        assert label_skew(big, LABELS) < 0.1
        # ... and far less skewed than Dir(0.5) label skew.
        assert label_skew(parts, LABELS) < 0.5 * label_skew(_part("dirichlet", seed=seed), LABELS)


def test_noise_split_is_iid() -> None:
    for seed in range(3):
        a, b = _part("noise", seed=seed), _part("iid", seed=seed)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("client_id", [0, 1, 5, 9])
def test_add_feature_noise_std(client_id: int) -> None:
    x = torch.linspace(-1.0, 1.0, 40_000).reshape(100, 1, 20, 20)
    before = x.clone()
    y = add_feature_noise(x, client_id, 10, sigma=0.5, seed=7)
    torch.testing.assert_close(x, before, rtol=0, atol=0)  # input not mutated
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    assert y is not x
    expected = 0.5 * client_id / 10
    std = float((y - x).std())
    if client_id == 0:
        assert torch.equal(y, x)
    else:
        assert abs(std - expected) < 0.03 * expected
        assert abs(float((y - x).mean())) < 0.03 * expected


def test_add_feature_noise_deterministic_and_independent() -> None:
    x = torch.zeros(5000)
    a = add_feature_noise(x, 3, 10, 1.0, seed=1)
    torch.testing.assert_close(a, add_feature_noise(x, 3, 10, 1.0, seed=1), rtol=0, atol=0)
    assert not torch.equal(a, add_feature_noise(x, 3, 10, 1.0, seed=2))
    b = add_feature_noise(x, 4, 10, 1.0, seed=1)
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert abs(corr) < 0.1  # clients' noises are independent, not rescaled copies


def test_add_feature_noise_integer_input() -> None:
    x = torch.arange(100, dtype=torch.int64)
    y = add_feature_noise(x, 2, 4, 0.1, seed=0)
    assert y.is_floating_point()
    assert x.dtype == torch.int64


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"client_id": 10, "num_clients": 10, "sigma": 0.1, "seed": 0}, "num-clients"),
        ({"client_id": -1, "num_clients": 10, "sigma": 0.1, "seed": 0}, "num-clients"),
        ({"client_id": 0, "num_clients": 0, "sigma": 0.1, "seed": 0}, "num-clients"),
        ({"client_id": 1, "num_clients": 10, "sigma": -0.1, "seed": 0}, "partition-sigma"),
        ({"client_id": 1, "num_clients": 10, "sigma": 0.1, "seed": -1}, "seed"),
    ],
)
def test_add_feature_noise_bad_input(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        add_feature_noise(torch.zeros(3), **kwargs)


def test_natural_one_client_per_group() -> None:
    parts = _part("natural")
    for i, gid in enumerate(np.unique(GROUPS)):
        np.testing.assert_array_equal(parts[i], np.flatnonzero(GROUPS == gid))


def test_label_counts_and_skew_helpers() -> None:
    parts = _part("dirichlet")
    counts = label_counts(parts, LABELS, NUM_CLASSES)
    assert counts.shape == (NUM_CLIENTS, NUM_CLASSES)
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts.sum(axis=1), [p.size for p in parts])
    one_class = [np.flatnonzero(LABELS == c) for c in range(NUM_CLASSES)]
    assert label_skew(one_class, LABELS) > 0.85
    assert label_skew([np.arange(LABELS.size)], LABELS) == 0.0
    assert size_skew([np.arange(5), np.arange(5)]) == 0.0


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "kwargs", "key"),
    [
        ("fedavg-split", {}, "partition"),
        ("iid", {"num_clients": 0}, "num-clients"),
        ("iid", {"num_clients": LABELS.size + 1}, "num-clients"),
        ("iid", {"num_clients": 2.5}, "num-clients"),
        ("dirichlet", {"beta": 0.0}, "partition-beta"),
        ("dirichlet", {"beta": -1.0}, "partition-beta"),
        ("quantity-skew", {"beta": float("nan")}, "partition-beta"),
        ("label-quantity", {"k": 0}, "partition-k"),
        ("label-quantity", {"k": NUM_CLASSES + 1}, "partition-k"),
        ("dirichlet", {"min_size": -1}, "partition-min-size"),
        ("dirichlet", {"min_size": LABELS.size // NUM_CLIENTS + 1}, "partition-min-size"),
        ("quantity-skew", {"min_size": LABELS.size}, "partition-min-size"),
        ("natural", {"groups": None}, "partition"),
        ("natural", {"num_clients": NUM_CLIENTS - 1}, "num-clients"),
        ("natural", {"groups": GROUPS[:-1]}, "dataset"),
        ("iid", {"seed": -1}, "seed"),
    ],
)
def test_bad_input_names_key(scheme: str, kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        _part(scheme, **kwargs)


def test_unknown_scheme_lists_choices() -> None:
    with pytest.raises(ConfigError, match="dirichlet, iid, label-quantity") as info:
        make_partition("diriclet", LABELS, 10, 0)
    assert info.value.key == "partition"
    with pytest.raises(ConfigError, match="'partition'"):
        make_partition(42, LABELS, 10, 0)  # type: ignore[arg-type]


def test_natural_wrong_num_clients_names_group_count() -> None:
    with pytest.raises(ConfigError, match=f"{NUM_CLIENTS} \\(the number of natural groups"):
        _part("natural", num_clients=3)
    with pytest.raises(ConfigError, match="natural clients \\(synthetic\\)"):
        make_partition("natural", LABELS, NUM_CLIENTS, 0)


@pytest.mark.parametrize(
    "labels",
    [np.zeros((10, 2), dtype=np.int64), np.array([], dtype=np.int64), np.linspace(0, 1, 50)],
)
def test_bad_labels(labels: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="'dataset'"):
        make_partition("iid", labels, 2, 0)


def test_labels_out_of_range() -> None:
    with pytest.raises(ConfigError, match="'dataset'"):
        make_partition("dirichlet", np.array([0, 1, -1] * 20), 2, 0)
    with pytest.raises(ConfigError, match="'dataset'"):
        make_partition("dirichlet", LABELS, 2, 0, num_classes=5)


@pytest.mark.parametrize("scheme", ["dirichlet", "quantity-skew"])
def test_unreachable_min_size_gives_up(scheme: str) -> None:
    # 100 samples, 10 clients, min 10 each: only an exact 10/10/.../10 split would do.
    labels = np.repeat(np.arange(10), 10)
    with pytest.raises(ConfigError, match="'partition-min-size'") as info:
        make_partition(scheme, labels, 10, 0, beta=0.05, min_size=10)
    cap = MAX_REDRAWS if scheme == "dirichlet" else MAX_SIZE_REDRAWS
    assert str(cap) in str(info.value)


# ---------------------------------------------------------------------------------------------
# flwr-datasets adapter
# ---------------------------------------------------------------------------------------------


class _FakeDataset:
    """Column store standing in for ``datasets.Dataset``."""

    def __init__(self, columns: dict[str, list[int]]) -> None:
        self.columns = columns

    @classmethod
    def from_dict(cls, mapping: dict[str, Any]) -> _FakeDataset:
        return cls({name: list(values) for name, values in mapping.items()})

    def __getitem__(self, name: str) -> list[int]:
        return self.columns[name]


class _FakePartitioner:
    """Duck-typed flwr-datasets partitioner: round-robin rows, returned in reverse order."""

    def __init__(self, num_partitions: int) -> None:
        self.num_partitions = num_partitions
        self.dataset: Any = None

    def load_partition(self, partition_id: int) -> dict[str, list[int]]:
        rows = self.dataset["_index"][partition_id :: self.num_partitions]
        assert self.dataset["label"][0] == int(LABELS[0])
        return {"_index": rows[::-1], "label": []}


@pytest.fixture
def fake_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("datasets")
    module.Dataset = _FakeDataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)


@pytest.mark.usefixtures("fake_datasets")
def test_adapter_with_fake_partitioner() -> None:
    parts = make_partition(_FakePartitioner(4), LABELS, 4, 0)
    assert len(parts) == 4
    for i, p in enumerate(parts):
        np.testing.assert_array_equal(p, np.arange(i, LABELS.size, 4))
        assert p.dtype == np.int64
    wrapped = FlwrDatasetsPartitioner(_FakePartitioner(3))
    assert len(make_partition(wrapped, LABELS, 3, 0)) == 3
    with pytest.raises(ConfigError, match=r"'num-clients'.*num_partitions"):
        make_partition(_FakePartitioner(4), LABELS, 5, 0)


def test_adapter_without_datasets_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r"'partition'.*pip install 'fedmerge\[flwr-datasets\]'"):
        make_partition(_FakePartitioner(4), LABELS, 4, 0)


def test_adapter_with_real_flwr_datasets() -> None:
    fp = pytest.importorskip(
        "flwr_datasets.partitioner", reason="flwr-datasets not installed (dev extra)"
    )
    parts = make_partition(fp.IidPartitioner(num_partitions=5), LABELS, 5, 0)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(LABELS.size))

    def dirichlet_parts() -> list[np.ndarray]:
        p = fp.DirichletPartitioner(num_partitions=5, partition_by="label", alpha=0.5, seed=42)
        return make_partition(p, LABELS, 5, 0)

    parts = dirichlet_parts()
    union = np.concatenate(parts)
    assert union.size == np.unique(union).size == LABELS.size
    assert all(np.all(np.diff(p) > 0) for p in parts)
    assert label_skew(parts, LABELS) > 0.1
    again = dirichlet_parts()  # seeded by the partitioner's own seed
    assert all(np.array_equal(x, y) for x, y in zip(parts, again, strict=True))

    used = fp.IidPartitioner(num_partitions=5)
    make_partition(used, LABELS, 5, 0)
    with pytest.raises(ConfigError, match="fresh partitioner"):
        make_partition(used, LABELS, 5, 0)
