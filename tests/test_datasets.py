"""Tests of fedmerge.datasets: the registry, loaders, splits, cache and errors."""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmerge import datasets as ds_mod
from fedmerge.datasets import DATASETS, describe_datasets, load_dataset
from fedmerge.errors import ConfigError, DatasetNotFoundError


def make_fake_cifar(
    root: str | Path,
    num_train_per_batch: int,
    num_test: int,
    cifar100: bool = False,
    seed: int = 0,
) -> dict[str, object]:
    """Write a tiny, valid CIFAR-10/100 file set in the python-pickle layout under ``root``.

    Returns the arrays written: ``x_train``/``x_test`` uint8 ``(N, 3, 32, 32)``,
    ``y_train``/``y_test`` int64 and ``classes``. CIFAR-10 gets five training batches of
    ``num_train_per_batch`` each; CIFAR-100 one ``train`` file of that many.
    """
    rng = np.random.default_rng(seed)
    num_classes = 100 if cifar100 else 10

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        return x, rng.integers(0, num_classes, size=n).astype(np.int64)

    def dump(path: Path, obj: dict[str, object]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as fh:
            pickle.dump(obj, fh)

    root = Path(root)
    if cifar100:
        folder, label_key = root / "cifar-100-python", "fine_labels"
        x_train, y_train = draw(num_train_per_batch)
        batches = [("train", x_train, y_train)]
        classes = tuple(f"fine_{i}" for i in range(100))
        dump(folder / "meta", {"fine_label_names": list(classes), "coarse_label_names": []})
    else:
        folder, label_key = root / "cifar-10-batches-py", "labels"
        drawn = [draw(num_train_per_batch) for _ in range(5)]
        batches = [(f"data_batch_{i + 1}", x, y) for i, (x, y) in enumerate(drawn)]
        x_train = np.concatenate([x for x, _ in drawn])
        y_train = np.concatenate([y for _, y in drawn])
        classes = tuple(f"class_{i}" for i in range(10))
        # bytes names here, str for CIFAR-100: the reader must accept both
        dump(folder / "batches.meta", {"label_names": [c.encode() for c in classes]})
    x_test, y_test = draw(num_test)
    batches.append(("test", x_test, y_test) if cifar100 else ("test_batch", x_test, y_test))
    for fname, x, y in batches:
        dump(folder / fname, {"data": x.reshape(len(x), -1), label_key: y.tolist()})
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_test": y_test,
        "classes": classes,
    }


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(x.ndim) if d != 1]
    return x.double().mean(dim=dims), x.double().std(dim=dims, correction=0)


def _unnormalise_u8(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    return ((x.double() * s + m) * 255).round().to(torch.uint8).numpy()


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------


def test_registry_names_and_description() -> None:
    assert set(DATASETS) == {"digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "synthetic"}
    rows = {r["name"]: r for r in describe_datasets()}
    assert rows["digits"]["source"] == "embedded"
    assert rows["synthetic"]["source"] == "generated"
    assert rows["mnist"]["source"] == "needs files"
    assert "FashionMNIST/raw/train-images-idx3-ubyte" in rows["fashion-mnist"]["files"]
    assert rows["cifar100"]["num_classes"] == 100
    assert rows["cifar10"]["input_shape"] == (3, 32, 32)
    assert rows["synthetic"]["train_size"] is None


# --------------------------------------------------------------------------------------------
# digits (embedded)
# --------------------------------------------------------------------------------------------


def test_digits_shapes_and_normalisation() -> None:
    d = load_dataset("digits")
    assert d.x_train.shape == (1437, 1, 8, 8) and d.x_test.shape == (360, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.num_classes == 10 and d.classes == tuple(str(i) for i in range(10))
    assert d.input_shape == (1, 8, 8)
    assert d.groups is None
    assert d.x_proxy.shape == (0, 1, 8, 8) and d.y_proxy.shape == (0,)
    mean, std = _channel_stats(d.x_train)
    assert torch.allclose(mean, torch.zeros(1, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(std, torch.ones(1, dtype=torch.float64), atol=1e-5)
    # stratified split: every class appears in both
    assert set(d.y_train.tolist()) == set(d.y_test.tolist()) == set(range(10))
    assert len(d.mean) == len(d.std) == 1 and 0 < d.mean[0] < 1


def test_digits_test_split_independent_of_seed() -> None:
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=7, proxy_size=50, max_train_samples=300)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST from the shared real files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_mnist_like_from_shared_data(name: str, shared_data_root: Path) -> None:
    d = load_dataset(name, root=shared_data_root)
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert d.y_train.shape == (60000,) and d.y_test.shape == (10000,)
    assert d.num_classes == 10 and len(d.classes) == 10 and d.input_shape == (1, 28, 28)
    assert set(d.y_train.unique().tolist()) == set(range(10))
    mean, std = _channel_stats(d.x_train)
    assert abs(mean.item()) < 1e-4 and abs(std.item() - 1) < 1e-4
    if name == "mnist":  # the well-known constants
        assert d.mean[0] == pytest.approx(0.1307, abs=1e-4)
        assert d.std[0] == pytest.approx(0.3081, abs=1e-4)
    else:
        assert d.classes[0] == "T-shirt/top"
    # the test split is normalised with the training statistics, so only roughly standard
    assert abs(d.x_test.mean().item()) < 0.05


def test_cache_returns_without_reloading(shared_data_root: Path) -> None:
    load_dataset("mnist", root=shared_data_root)  # may already be cached by another test
    info = ds_mod._load_arrays.cache_info()
    a = load_dataset("mnist", root=shared_data_root)
    b = load_dataset("mnist", root=str(shared_data_root) + "/.")  # same resolved root
    after = ds_mod._load_arrays.cache_info()
    assert after.hits == info.hits + 2 and after.misses == info.misses
    assert a.x_train is b.x_train  # the very same cached tensor, not a copy
    c = load_dataset("mnist", root=shared_data_root, max_train_samples=100, seed=1)
    assert ds_mod._load_arrays.cache_info().misses == info.misses
    assert c.x_train.shape == (100, 1, 28, 28)


# --------------------------------------------------------------------------------------------
# missing files
# --------------------------------------------------------------------------------------------


def test_missing_root_names_expected_files_and_fix(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion-mnist", root=root)
    msg = str(err.value)
    assert str(root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte") in msg
    assert "does not exist" in msg
    assert "download=true" in msg and "data-root" in msg and "fashion-mnist" in msg
    assert not root.exists()  # nothing created when download is off


def test_missing_cifar_files_in_existing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar10", root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in msg
    assert "does not exist" not in msg
    assert "download" in msg and "data-root" in msg


def test_failed_download_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets as tvd

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tvd, "CIFAR100", offline)
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar100", root=tmp_path, download=True)
    msg = str(err.value)
    assert "download failed" in msg and "no network" in msg
    assert str(tmp_path / "cifar-100-python" / "train") in msg


def test_damaged_cifar_file_is_a_clear_error(tmp_path: Path) -> None:
    make_fake_cifar(tmp_path, 2, 2, cifar100=True)
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(DatasetNotFoundError, match="could not read"):
        load_dataset("cifar100", root=tmp_path)


# --------------------------------------------------------------------------------------------
# CIFAR from a tiny generated file set
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cifar100", [False, True])
def test_cifar_from_fake_files(tmp_path: Path, cifar100: bool) -> None:
    fake = make_fake_cifar(tmp_path, num_train_per_batch=8, num_test=5, cifar100=cifar100)
    name = "cifar100" if cifar100 else "cifar10"
    d = load_dataset(name, root=tmp_path)
    n_train = 8 if cifar100 else 40
    assert d.x_train.shape == (n_train, 3, 32, 32) and d.x_test.shape == (5, 3, 32, 32)
    assert d.num_classes == (100 if cifar100 else 10) and d.input_shape == (3, 32, 32)
    assert d.classes == fake["classes"]
    assert np.array_equal(d.y_train.numpy(), fake["y_train"])
    assert np.array_equal(d.y_test.numpy(), fake["y_test"])
    # pixels round-trip exactly through normalisation (channel order included)
    assert np.array_equal(_unnormalise_u8(d.x_train, d.mean, d.std), fake["x_train"])
    assert np.array_equal(_unnormalise_u8(d.x_test, d.mean, d.std), fake["x_test"])
    mean, std = _channel_stats(d.x_train)
    assert mean.shape == (3,)
    assert torch.allclose(mean, torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(std, torch.ones(3, dtype=torch.float64), atol=1e-5)


# --------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------


def _mean_pairwise_tv(labels: np.ndarray, groups: np.ndarray, n: int) -> float:
    hist = np.zeros((n, 10))
    np.add.at(hist, (groups, labels), 1)
    p = hist / hist.sum(axis=1, keepdims=True)
    tv = 0.5 * np.abs(p[:, None, :] - p[None, :, :]).sum(axis=2)
    return float(tv[np.triu_indices(n, 1)].mean())


def test_synthetic_shapes_and_groups() -> None:
    d = load_dataset("synthetic", num_clients=12, seed=3)
    assert d.x_train.ndim == 2 and d.x_train.shape[1] == 60 and d.input_shape == (60,)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.num_classes == 10
    assert d.groups is not None and len(d.groups) == len(d.y_train)
    assert len(np.unique(d.groups)) == 12 and d.groups.min() == 0 and d.groups.max() == 11
    counts = np.bincount(d.groups)
    assert counts.min() >= int(0.9 * 50)  # at least 50 samples per user, 90% in train
    # FedProx's per-user 90/10 split: test ~ 10% of all samples
    n_total = len(d.y_train) + len(d.y_test)
    assert 0.05 < len(d.y_test) / n_total < 0.15
    assert d.mean == () and d.std == ()  # features left as generated


def test_synthetic_deterministic_per_seed() -> None:
    a = load_dataset("synthetic", seed=5, num_clients=8)
    ds_mod.clear_dataset_cache()  # regenerate, not just a cache hit
    b = load_dataset("synthetic", seed=5, num_clients=8)
    c = load_dataset("synthetic", seed=6, num_clients=8)
    assert a.x_train is not b.x_train
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert np.array_equal(a.groups, b.groups)
    assert a.x_train.shape != c.x_train.shape or not torch.equal(a.x_train, c.x_train)


@pytest.mark.parametrize("ab", [1.0, 0.0])
def test_synthetic_is_natively_non_iid(ab: float) -> None:
    n = 20
    tvs, iid_tvs = [], []
    for seed in range(3):
        d = load_dataset(
            "synthetic", num_clients=n, seed=seed, synthetic_alpha=ab, synthetic_beta=ab
        )
        y, g = d.y_train.numpy(), d.groups
        tvs.append(_mean_pairwise_tv(y, g, n))
        # the same labels regrouped at random: an IID partition of equal sizes
        iid_g = np.random.default_rng(seed).permutation(g)
        iid_tvs.append(_mean_pairwise_tv(y, iid_g, n))
    # Users' label distributions are far apart (each user has its own W_k and v_k), even for
    # Synthetic(0, 0); an IID regrouping of the same samples is much closer.
    assert np.mean(tvs) > 0.6
    assert np.mean(tvs) > 2 * np.mean(iid_tvs)


# --------------------------------------------------------------------------------------------
# proxy split and subsample
# --------------------------------------------------------------------------------------------


def test_proxy_split_disjoint_sized_deterministic() -> None:
    full = load_dataset("digits")
    a = load_dataset("digits", proxy_size=100, seed=1)
    b = load_dataset("digits", proxy_size=100, seed=1)
    c = load_dataset("digits", proxy_size=100, seed=2)
    assert a.x_proxy.shape == (100, 1, 8, 8) and a.y_proxy.shape == (100,)
    assert len(a.y_train) == len(full.y_train) - 100
    assert torch.equal(a.x_proxy, b.x_proxy) and torch.equal(a.x_train, b.x_train)
    assert not torch.equal(a.x_proxy, c.x_proxy)
    # disjoint, and together they are exactly the full training split
    rows = {tuple(r) for r in full.x_train.flatten(1).tolist()}
    train_rows = [tuple(r) for r in a.x_train.flatten(1).tolist()]
    proxy_rows = [tuple(r) for r in a.x_proxy.flatten(1).tolist()]
    dup_free = len(rows) == len(full.x_train)
    if dup_free:
        assert not set(train_rows) & set(proxy_rows)
    assert sorted(train_rows + proxy_rows) == sorted(
        tuple(r) for r in full.x_train.flatten(1).tolist()
    )
    # stratified: every class present in the proxy set
    assert set(a.y_proxy.tolist()) == set(range(10))


def test_proxy_split_with_synthetic_keeps_groups_aligned() -> None:
    full = load_dataset("synthetic", num_clients=5, seed=2)
    d = load_dataset("synthetic", num_clients=5, seed=2, proxy_size=40, max_train_samples=200)
    assert len(d.y_proxy) == 40 and len(d.y_train) == 200 and len(d.groups) == 200
    # each kept sample still carries the user that generated it
    full_rows = {
        tuple(r): g for r, g in zip(full.x_train.tolist(), full.groups.tolist(), strict=True)
    }
    assert all(
        full_rows[tuple(r)] == g for r, g in zip(d.x_train.tolist(), d.groups.tolist(), strict=True)
    )
    assert not {tuple(r) for r in d.x_proxy.tolist()} & {tuple(r) for r in d.x_train.tolist()}


def test_max_train_samples_size_determinism_and_strata() -> None:
    a = load_dataset("digits", max_train_samples=200, seed=4)
    b = load_dataset("digits", max_train_samples=200, seed=4)
    c = load_dataset("digits", max_train_samples=200, seed=5)
    assert a.x_train.shape == (200, 1, 8, 8) and len(a.y_train) == 200
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_train, c.x_train)
    assert np.bincount(a.y_train.numpy(), minlength=10).min() >= 18  # ~20 per class
    assert len(a.y_test) == 360  # the test split is untouched
    everything = load_dataset("digits", max_train_samples=10**6)
    assert len(everything.y_train) == 1437


def test_max_test_samples_is_one_stratified_subset_for_every_seed() -> None:
    full = load_dataset("digits")
    a = load_dataset("digits", max_test_samples=100, seed=0)
    b = load_dataset("digits", max_test_samples=100, seed=7, max_train_samples=300)
    assert a.x_test.shape == (100, 1, 8, 8) and len(a.y_test) == 100
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)
    assert np.bincount(a.y_test.numpy(), minlength=10).min() >= 9  # ~10 per class
    pairs = zip(full.x_test.flatten(1).tolist(), full.y_test.tolist(), strict=True)
    rows = {tuple(r): y for r, y in pairs}
    picked = zip(a.x_test.flatten(1).tolist(), a.y_test.tolist(), strict=True)
    assert all(rows[tuple(r)] == y for r, y in picked)  # real test samples with their labels
    assert torch.equal(load_dataset("digits", max_test_samples=10**6).x_test, full.x_test)
    assert torch.equal(a.x_train, full.x_train)  # the training split is untouched


def _rows(x: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(r) for r in x.flatten(1).tolist()}


def test_validation_split_replaces_the_test_split_and_leaves_training_alone() -> None:
    # With a subsample, the validation samples come from the unused rest of the training
    # split: the clients train on exactly the samples they train on without it.
    keys = {"proxy_size": 50, "max_train_samples": 800, "seed": 2}
    plain = load_dataset("digits", **keys)
    tuned = load_dataset("digits", validation_size=200, **keys)
    assert plain.eval_split == "test" and tuned.eval_split == "validation"
    assert torch.equal(plain.x_train, tuned.x_train) and torch.equal(plain.x_proxy, tuned.x_proxy)
    assert len(tuned.y_test) == 200
    assert np.bincount(tuned.y_test.numpy(), minlength=10).min() >= 18  # stratified, ~20 a class
    full = load_dataset("digits")
    assert _rows(tuned.x_test) <= _rows(full.x_train)  # training samples, not test samples
    assert not _rows(tuned.x_test) & (_rows(tuned.x_train) | _rows(tuned.x_proxy))
    again = load_dataset("digits", validation_size=200, **keys)
    assert torch.equal(again.x_test, tuned.x_test)  # seeded
    # Without a subsample the validation samples are taken out of the clients' samples.
    whole = load_dataset("digits", validation_size=100, seed=0)
    assert len(whole.y_train) == len(full.y_train) - 100 and len(whole.y_test) == 100
    assert not _rows(whole.x_test) & _rows(whole.x_train)


def test_proxy_does_not_depend_on_max_train_samples() -> None:
    a = load_dataset("digits", proxy_size=64, seed=3)
    b = load_dataset("digits", proxy_size=64, max_train_samples=100, seed=3)
    assert torch.equal(a.x_proxy, b.x_proxy)


# --------------------------------------------------------------------------------------------
# configuration errors name their key
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"proxy_size": -1}, "proxy-size"),
        ({"proxy_size": 1437}, "proxy-size"),
        ({"max_train_samples": -5}, "max-train-samples"),
        ({"max_test_samples": -1}, "max-test-samples"),
        ({"validation_size": -1}, "validation-size"),
        ({"validation_size": 1437}, "validation-size"),
        ({"seed": -1}, "seed"),
        ({"name": "synthetic", "synthetic_alpha": -0.1}, "synthetic-alpha"),
        ({"name": "synthetic", "synthetic_beta": -1.0}, "synthetic-beta"),
        ({"name": "synthetic", "synthetic_beta": float("nan")}, "synthetic-beta"),
        ({"name": "synthetic", "num_clients": 0}, "num-clients"),
        ({"name": "imagenet"}, "dataset"),
    ],
)
def test_config_errors_name_their_key(kwargs: dict[str, object], key: str) -> None:
    kwargs = {"name": "digits", **kwargs}
    name = kwargs.pop("name")
    with pytest.raises(ConfigError) as err:
        load_dataset(name, **kwargs)  # type: ignore[arg-type]
    assert err.value.key == key
    assert f"'{key}'" in str(err.value)


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(ConfigError) as err:
        load_dataset("imagenet")
    assert "fashion-mnist" in str(err.value) and "synthetic" in str(err.value)


def test_unit_input_scaling_is_torchvision_to_tensor(shared_data_root: Path) -> None:
    """``input-scaling=unit``: pixels in [0, 1], as ``ToTensor`` alone (Flower's NIID-Bench)."""
    import torchvision

    std = load_dataset("fashion-mnist", root=shared_data_root, proxy_size=50)
    unit = load_dataset("fashion-mnist", root=shared_data_root, proxy_size=50, input_scaling="unit")
    raw = torchvision.datasets.FashionMNIST(root=str(shared_data_root), train=False, download=False)
    to_tensor = raw.data.float().div(255).unsqueeze(1)
    torch.testing.assert_close(unit.x_test, to_tensor, rtol=0, atol=1e-6)
    assert unit.x_train.min() >= 0 and unit.x_train.max() <= 1 + 1e-6
    assert unit.x_proxy.shape == std.x_proxy.shape and unit.x_proxy.min() >= 0
    assert abs(float(std.x_train.mean())) < 1e-3 and unit.mean == (0.0,) and unit.std == (1.0,)
    torch.testing.assert_close(std.y_train, unit.y_train)  # the same samples, rescaled


def test_input_scaling_errors_name_the_key() -> None:
    digits = load_dataset("digits", input_scaling="unit")
    assert float(digits.x_train.min()) >= 0 and float(digits.x_train.max()) <= 1 + 1e-6
    with pytest.raises(ConfigError, match="input-scaling.*standard, unit"):
        load_dataset("digits", input_scaling="minmax")
    with pytest.raises(ConfigError, match="input-scaling.*not images"):
        load_dataset("synthetic", input_scaling="unit")
