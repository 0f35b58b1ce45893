"""Reading each dataset from disk into normalised tensors, cached per process."""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DatasetNotFoundError
from .files import _unreadable
from .registry import _CIFAR10_DIR, _CIFAR100_DIR, _DIGIT_CLASSES, _FASHION_CLASSES

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Cached, normalised arrays
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Arrays:
    """The full, normalised splits of one dataset, as cached per process."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    groups: np.ndarray | None = None


@functools.lru_cache(maxsize=4)
def _load_arrays(name: str, root: str) -> _Arrays:
    """Read dataset ``name`` from the resolved ``root`` ("" if it needs none) and normalise.

    Cached (few entries: a CIFAR copy is about 700 MB) so each process reads a file once.
    """
    logger.info("dataset %s: loading%s", name, f" from {root}" if root else "")
    return _LOADERS[name](Path(root))


def _images_to_normalised(
    train_u8: np.ndarray, test_u8: np.ndarray, max_value: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[float, ...], tuple[float, ...]]:
    """Turn integer images ``(N, C, H, W)`` into normalised ``float32`` tensors.

    The per-channel mean and std of the training split are computed exactly from value
    histograms (cheap, no float64 copy of the data). Dividing by ``max_value`` and then
    normalising equals normalising raw values with the statistics in raw units, so the
    conversion is a single pass; the statistics are returned in [0, 1] units (the familiar
    constants, e.g. 0.1307 / 0.3081 for MNIST).
    """
    channels = train_u8.shape[1]
    values = np.arange(256, dtype=np.float64)
    means_raw, stds_raw = [], []
    for c in range(channels):
        counts = np.bincount(train_u8[:, c].ravel(), minlength=256).astype(np.float64)
        total = counts.sum()
        mean = float((values * counts).sum() / total)
        var = float((((values - mean) ** 2) * counts).sum() / total)
        means_raw.append(mean)
        # A constant channel has std 0: leave it centred rather than divide by zero.
        stds_raw.append(math.sqrt(var) if var > 0 else 1.0)
    shape = (1, channels, 1, 1)
    m = torch.tensor(means_raw, dtype=torch.float32).view(shape)
    s = torch.tensor(stds_raw, dtype=torch.float32).view(shape)
    x_train = torch.from_numpy(np.ascontiguousarray(train_u8)).float().sub_(m).div_(s)
    x_test = torch.from_numpy(np.ascontiguousarray(test_u8)).float().sub_(m).div_(s)
    mean_01 = tuple(v / max_value for v in means_raw)
    std_01 = tuple(v / max_value for v in stds_raw)
    return x_train, x_test, mean_01, std_01


def _labels(y: np.ndarray | list[int] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(y), dtype=torch.int64)


def _digits_file() -> Path:
    # scikit-learn ships the UCI handwritten digits as a CSV inside its wheel. Reading the file
    # directly skips `import sklearn.datasets` (about 3 s on 2 cores), most of a default run.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(
            "dataset 'digits' comes with scikit-learn, which is not installed: "
            "pip install scikit-learn (a dependency of fedmerge)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"


def _stratified_split(target: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask of ``ceil(test_fraction * n)`` samples (scikit-learn's count), spread
    over the classes in proportion (largest remainders), chosen at random within each class."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(target, return_counts=True)
    n_test = math.ceil(test_fraction * len(target))
    exact = counts * n_test / len(target)
    quota = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - quota), kind="stable")[: n_test - quota.sum()]:
        quota[i] += 1
    test = np.zeros(len(target), dtype=bool)
    for c, q in zip(classes, quota, strict=True):
        test[rng.permutation(np.flatnonzero(target == c))[:q]] = True
    return test


def _load_digits(_root: Path) -> _Arrays:
    table = np.loadtxt(_digits_file(), delimiter=",", dtype=np.float64)
    images = table[:, :64].astype(np.uint8).reshape(-1, 1, 8, 8)  # values 0..16
    target = table[:, 64].astype(np.int64)
    # A fixed seed, not the run seed: the test split must be the same in every run.
    test = _stratified_split(target, 0.2, seed=0)
    x_train, x_test, mean, std = _images_to_normalised(images[~test], images[test], max_value=16)
    return _Arrays(
        x_train, _labels(target[~test]), x_test, _labels(target[test]), _DIGIT_CLASSES, mean, std
    )


def _load_mnist_like(name: str, root: Path) -> _Arrays:
    import torchvision.datasets as tvd

    cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
    classes = _DIGIT_CLASSES if name == "mnist" else _FASHION_CLASSES
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    # Broad on purpose: torchvision's IDX reader raises assorted errors on damaged files.
    except Exception as exc:
        raise _unreadable(name, root / cls.__name__ / "raw", exc) from exc
    x_train, x_test, mean, std = _images_to_normalised(
        train.data.numpy()[:, None], test.data.numpy()[:, None], max_value=255
    )
    return _Arrays(
        x_train, _labels(train.targets), x_test, _labels(test.targets), classes, mean, std
    )


def _unpickle(name: str, path: Path) -> dict[str, Any]:
    # CIFAR ships as pickles; loading one runs code it contains, so only point data-root at
    # files from a trusted source (the same holds for torchvision's own CIFAR classes).
    try:
        with path.open("rb") as fh:
            obj = pickle.load(fh, encoding="latin1")  # Python 2 pickles, as torchvision reads
    # Broad on purpose: unpickling damaged data can raise nearly any exception type.
    except Exception as exc:
        raise _unreadable(name, path, exc) from exc
    if not isinstance(obj, dict):
        raise _unreadable(name, path, f"expected a dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _cifar_batch(
    name: str, path: Path, label_key: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(name, path)
    if "data" not in d or label_key not in d:
        raise _unreadable(name, path, f"keys 'data' and {label_key!r} expected")
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise _unreadable(name, path, f"data of shape {data.shape} for {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise _unreadable(name, path, f"labels outside 0..{num_classes - 1}")
    # Rows are 1024 red, then green, then blue values, each row-major 32x32.
    return data.reshape(-1, 3, 32, 32), labels


def _names(name: str, path: Path, key: str, num_classes: int) -> tuple[str, ...]:
    d = _unpickle(name, path)
    raw = d.get(key)
    if not isinstance(raw, list | tuple) or len(raw) != num_classes:
        raise _unreadable(name, path, f"a list of {num_classes} names under {key!r} expected")
    return tuple(v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in raw)


def _load_cifar10(root: Path) -> _Arrays:
    folder = root / _CIFAR10_DIR
    parts = [_cifar_batch("cifar10", folder / f"data_batch_{i}", "labels", 10) for i in range(1, 6)]
    te_x, te_y = _cifar_batch("cifar10", folder / "test_batch", "labels", 10)
    classes = _names("cifar10", folder / "batches.meta", "label_names", 10)
    tr_x = np.concatenate([p[0] for p in parts])
    tr_y = np.concatenate([p[1] for p in parts])
    x_train, x_test, mean, std = _images_to_normalised(tr_x, te_x, max_value=255)
    return _Arrays(x_train, _labels(tr_y), x_test, _labels(te_y), classes, mean, std)


def _load_cifar100(root: Path) -> _Arrays:
    folder = root / _CIFAR100_DIR
    tr_x, tr_y = _cifar_batch("cifar100", folder / "train", "fine_labels", 100)
    te_x, te_y = _cifar_batch("cifar100", folder / "test", "fine_labels", 100)
    classes = _names("cifar100", folder / "meta", "fine_label_names", 100)
    x_train, x_test, mean, std = _images_to_normalised(tr_x, te_x, max_value=255)
    return _Arrays(x_train, _labels(tr_y), x_test, _labels(te_y), classes, mean, std)


_LOADERS: dict[str, Callable[[Path], _Arrays]] = {
    "digits": _load_digits,
    "mnist": functools.partial(_load_mnist_like, "mnist"),
    "fashion-mnist": functools.partial(_load_mnist_like, "fashion-mnist"),
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
}
