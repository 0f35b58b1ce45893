"""Datasets held in memory as normalised tensors: a registry, one loader, a per-process cache.

Every dataset fedmerge trains on is loaded whole into memory as ``torch.Tensor`` objects
(``float32`` inputs, ``int64`` labels) by :func:`load_dataset`, which returns a
:class:`FederatedDataset`. Partitioning among clients happens elsewhere; this module only
produces the training split (optionally subsampled, optionally with a server proxy slice held
out of it) and the fixed test split.

Registered datasets (see :data:`DATASETS` and :func:`describe_datasets`):

``digits``
    scikit-learn's bundled copy of the UCI handwritten digits (1797 images, 8x8, values
    0..16). Embedded: no files, no download. The default.
``mnist``, ``fashion-mnist``
    Read with ``torchvision.datasets.MNIST`` / ``FashionMNIST`` from ``<root>/MNIST/raw``
    and ``<root>/FashionMNIST/raw`` (the extracted IDX files).
``cifar10``, ``cifar100``
    Read from the python-pickle layout (``<root>/cifar-10-batches-py``,
    ``<root>/cifar-100-python``) by a small reader of this module; torchvision is only used
    to download missing files.
``synthetic``
    FedProx's Synthetic(alpha, beta), generated from the seed; it comes with the natural
    partition (one generating user per client) in :attr:`FederatedDataset.groups`.

Caching: what is read from disk (and normalised) is cached per process, keyed on the dataset
name and the resolved root, so the many clients of a simulation that share a process read
each file once; :func:`load_dataset` then only applies the seeded proxy split and subsample.
The tensors of a returned :class:`FederatedDataset` may be the cached ones themselves, so
callers must never modify them in place (index or ``clone()`` them first).
"""

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

from fedmerge.errors import ConfigError, DatasetNotFoundError, unknown_name

logger = logging.getLogger(__name__)

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "FederatedDataset",
    "clear_dataset_cache",
    "describe_datasets",
    "load_dataset",
]


# --------------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------------


# eq=False: the generated __eq__ would compare tensors element-wise and raise; identity
# equality (and hashing) is what a container of large arrays wants anyway.
@dataclass(frozen=True, eq=False)
class FederatedDataset:
    """One loaded dataset, whole, in memory.

    The tensors may be shared with the per-process cache (see the module docstring): never
    modify them in place.

    Attributes
    ----------
    name : str
        Registry name (``"digits"``, ``"mnist"``, ...).
    x_train : torch.Tensor
        ``float32`` training inputs, normalised; images ``(N, C, H, W)``, vectors ``(N, D)``.
    y_train : torch.Tensor
        ``int64`` training labels in ``[0, num_classes)``.
    x_test, y_test : torch.Tensor
        The fixed test split, normalised with the training statistics.
    x_proxy, y_proxy : torch.Tensor
        The server's proxy slice, held out of the training split (0 rows unless
        ``proxy_size > 0``); normalised like the rest.
    num_classes : int
        Number of classes.
    input_shape : tuple of int
        Shape of one input, e.g. ``(1, 28, 28)`` or ``(60,)``.
    classes : tuple of str
        Class names, indexed by label.
    groups : numpy.ndarray or None
        For ``synthetic``: the generating user (natural client id) of each training sample,
        aligned with ``x_train``; ``None`` for datasets without a natural partition.
    mean, std : tuple of float
        Per-channel statistics (in [0, 1] pixel units) of the full training split that were
        used to normalise; empty for ``synthetic``, whose features are left as generated.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_proxy: torch.Tensor
    y_proxy: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    classes: tuple[str, ...]
    groups: np.ndarray | None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a registered dataset.

    Attributes
    ----------
    name : str
        Registry name.
    input_shape : tuple of int
        Shape of one input.
    num_classes : int
        Number of classes.
    train_size, test_size : int or None
        Sizes of the full training and test splits; ``None`` where they depend on the run
        (``synthetic``).
    source : str
        ``"embedded"`` (ships with an installed package), ``"needs files"`` (read from
        ``data-root``) or ``"generated"`` (made from the seed).
    description : str
        One line for listings.
    files : tuple of str
        The files expected under ``data-root`` (paths relative to it); empty when none.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    train_size: int | None
    test_size: int | None
    source: str
    description: str
    files: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR100_DIR = "cifar-100-python"
_CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
_CIFAR100_FILES = ("train", "test", "meta")

_DIGIT_CLASSES = tuple(str(i) for i in range(10))
_FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: The registered datasets, by name.
DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "digits",
            (1, 8, 8),
            10,
            1437,
            360,
            "embedded",
            "UCI handwritten digits 8x8 bundled in scikit-learn (fixed 80/20 stratified split)",
        ),
        DatasetInfo(
            "mnist",
            (1, 28, 28),
            10,
            60000,
            10000,
            "needs files",
            "MNIST handwritten digits 28x28 (torchvision layout)",
            tuple(f"MNIST/raw/{f}" for f in _MNIST_FILES),
        ),
        DatasetInfo(
            "fashion-mnist",
            (1, 28, 28),
            10,
            60000,
            10000,
            "needs files",
            "Fashion-MNIST clothing images 28x28 (torchvision layout)",
            tuple(f"FashionMNIST/raw/{f}" for f in _MNIST_FILES),
        ),
        DatasetInfo(
            "cifar10",
            (3, 32, 32),
            10,
            50000,
            10000,
            "needs files",
            "CIFAR-10 colour images 32x32 (python-pickle layout)",
            tuple(f"{_CIFAR10_DIR}/{f}" for f in _CIFAR10_FILES),
        ),
        DatasetInfo(
            "cifar100",
            (3, 32, 32),
            100,
            50000,
            10000,
            "needs files",
            "CIFAR-100 colour images 32x32, 100 fine labels (python-pickle layout)",
            tuple(f"{_CIFAR100_DIR}/{f}" for f in _CIFAR100_FILES),
        ),
        DatasetInfo(
            "synthetic",
            (60,),
            10,
            None,
            None,
            "generated",
            "FedProx Synthetic(alpha, beta): 60-dim vectors, one generating user per client",
        ),
    )
}


def describe_datasets() -> list[dict[str, Any]]:
    """Describe every registered dataset, for a ``fedmerge datasets`` listing.

    Returns
    -------
    list of dict
        One dict per dataset with keys ``name``, ``input_shape`` (tuple), ``num_classes``,
        ``train_size`` and ``test_size`` (``None`` where they vary), ``source``
        (``"embedded"``, ``"needs files"`` or ``"generated"``), ``description`` and
        ``files`` (paths expected under ``data-root``, possibly empty).
    """
    return [
        {
            "name": info.name,
            "input_shape": info.input_shape,
            "num_classes": info.num_classes,
            "train_size": info.train_size,
            "test_size": info.test_size,
            "source": info.source,
            "description": info.description,
            "files": list(info.files),
        }
        for info in DATASETS.values()
    ]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

# Independent seeded streams, so e.g. the proxy slice does not change with max_train_samples.
_STREAM_SYNTHETIC = 0
_STREAM_PROXY = 1
_STREAM_SUBSAMPLE = 2


def load_dataset(
    name: str,
    *,
    root: str | Path = "data",
    download: bool = False,
    proxy_size: int = 0,
    max_train_samples: int = 0,
    seed: int = 0,
    num_clients: int = 10,
    synthetic_alpha: float = 1.0,
    synthetic_beta: float = 1.0,
) -> FederatedDataset:
    """Load a registered dataset into memory as normalised tensors.

    Parameters
    ----------
    name : str
        A key of :data:`DATASETS`.
    root : str or Path
        Folder holding the files of ``mnist``, ``fashion-mnist``, ``cifar10`` and
        ``cifar100`` in torchvision's layout (run-config key ``data-root``); resolved
        against the current directory. Ignored by ``digits`` and ``synthetic``.
    download : bool
        Let torchvision download missing files into ``root`` (needs internet).
    proxy_size : int
        Samples held out of the full training split (seeded, class-stratified) as the
        server's proxy set; ``0`` for none. Must be smaller than the training split.
    max_train_samples : int
        ``0`` keeps the whole training split (less the proxy); otherwise a seeded,
        class-stratified subsample of that many samples is kept (for quick runs and tests;
        a value at least the size of the split keeps it all). The proxy is drawn first from
        the full split, so it does not depend on this value.
    seed : int
        Seed (``>= 0``) of the proxy split, the subsample and the ``synthetic`` generator.
        The test split never depends on it, except for ``synthetic``, which is generated
        from it.
    num_clients : int
        ``synthetic`` only: the number of generating users (one per client).
    synthetic_alpha, synthetic_beta : float
        ``synthetic`` only: FedProx's alpha (model heterogeneity) and beta (feature
        heterogeneity), both ``>= 0``.

    Returns
    -------
    FederatedDataset
        The dataset; its tensors may be shared with the per-process cache, so they must
        not be modified in place.

    Raises
    ------
    ConfigError
        A value is out of range (the error names its run-config key), or ``name`` is not
        registered (key ``dataset``).
    DatasetNotFoundError
        The files are missing (and ``download`` is off, or the download failed) or
        unreadable; the message lists the expected files and how to get them.
    """
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)
    _check_int("proxy-size", proxy_size, minimum=0)
    _check_int("max-train-samples", max_train_samples, minimum=0)
    _check_int("seed", seed, minimum=0)
    _check_int("num-clients", num_clients, minimum=1)
    _check_nonnegative_float("synthetic-alpha", synthetic_alpha)
    _check_nonnegative_float("synthetic-beta", synthetic_beta)

    info = DATASETS[name]
    if name == "synthetic":
        arrays = _synthetic_arrays(num_clients, float(synthetic_alpha), float(synthetic_beta), seed)
    elif info.files:
        root_path = Path(root).expanduser().resolve()
        _ensure_files(info, root_path, Path(root), download=download)
        arrays = _load_arrays(name, str(root_path))
    else:
        arrays = _load_arrays(name, "")

    n_train = len(arrays.y_train)
    if proxy_size >= n_train:
        raise ConfigError(
            "proxy-size",
            proxy_size,
            f"an integer >= 0 and < {n_train} (the training split of {name!r} has "
            f"{n_train} samples)",
            hint="The proxy set is held out of the training split, so some must remain",
        )

    y_all = arrays.y_train.numpy()
    keep = np.arange(n_train)
    proxy_idx = np.empty(0, dtype=np.int64)
    if proxy_size > 0:
        proxy_idx = _stratified_indices(y_all, proxy_size, _rng(seed, _STREAM_PROXY))
        keep = np.setdiff1d(keep, proxy_idx, assume_unique=True)
    if 0 < max_train_samples < len(keep):
        chosen = _stratified_indices(y_all[keep], max_train_samples, _rng(seed, _STREAM_SUBSAMPLE))
        keep = keep[chosen]

    if len(keep) == n_train:
        # Nothing removed: hand out the cached tensors themselves (no copy, see docstring).
        x_train, y_train, groups = arrays.x_train, arrays.y_train, arrays.groups
    else:
        keep_t = torch.from_numpy(keep)
        x_train, y_train = arrays.x_train[keep_t], arrays.y_train[keep_t]
        groups = None if arrays.groups is None else _read_only(arrays.groups[keep])
    proxy_t = torch.from_numpy(proxy_idx)
    return FederatedDataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=arrays.x_test,
        y_test=arrays.y_test,
        x_proxy=arrays.x_train[proxy_t],
        y_proxy=arrays.y_train[proxy_t],
        num_classes=info.num_classes,
        input_shape=tuple(arrays.x_train.shape[1:]),
        classes=arrays.classes,
        groups=groups,
        mean=arrays.mean,
        std=arrays.std,
    )


def clear_dataset_cache() -> None:
    """Drop every dataset cached in this process (frees its memory once unreferenced)."""
    _load_arrays.cache_clear()
    _synthetic_arrays.cache_clear()


# --------------------------------------------------------------------------------------------
# Validation and small helpers
# --------------------------------------------------------------------------------------------


def _check_int(key: str, value: object, *, minimum: int) -> None:
    # bool is an int subclass, but `proxy-size = true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(key, value, f"an integer >= {minimum}")


def _check_nonnegative_float(key: str, value: object) -> None:
    ok = isinstance(value, int | float | np.number) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)) or float(value) < 0:  # type: ignore[arg-type]
        raise ConfigError(key, value, "a finite number >= 0")


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _stratified_indices(y: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``k`` distinct indices of ``y`` keeping class proportions; sorted ascending.

    Each class gets ``k * n_c / n`` rounded by largest remainder (ties broken at random), so
    the counts add up to exactly ``k``.
    """
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    exact = k * counts / len(y)
    quota = np.floor(exact).astype(np.int64)
    short = k - int(quota.sum())
    if short > 0:
        # lexsort: last key is primary -> largest remainder first, random among ties.
        order = np.lexsort((rng.random(len(classes)), -(exact - quota)))
        quota[order[:short]] += 1
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    picks = [
        rng.choice(idx, size=q, replace=False) for idx, q in zip(by_class, quota, strict=True) if q
    ]
    if not picks:
        return np.empty(0, dtype=np.int64)
    return np.sort(np.concatenate(picks)).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Files: presence, download, the error message
# --------------------------------------------------------------------------------------------


def _ensure_files(info: DatasetInfo, root: Path, given_root: Path, *, download: bool) -> None:
    """Return when all of ``info.files`` exist under ``root``; download them or raise."""
    missing = [f for f in info.files if not (root / f).is_file()]
    if not missing:
        return
    if not download:
        raise DatasetNotFoundError(_not_found_message(info, root, given_root, missing))
    logger.info("dataset %s: downloading into %s (torchvision)", info.name, root)
    try:
        _download(info.name, root)
    # Deliberately broad: a failed download surfaces as URLError, HTTPError, socket and SSL
    # errors, OSError or torchvision's RuntimeError (checksum); all mean the same to the user.
    except Exception as exc:
        reason = f"the download failed ({type(exc).__name__}: {exc})"
        raise DatasetNotFoundError(
            _not_found_message(info, root, given_root, missing, reason=reason)
        ) from exc
    missing = [f for f in info.files if not (root / f).is_file()]
    if missing:
        reason = "the download finished but some files are still missing"
        raise DatasetNotFoundError(_not_found_message(info, root, given_root, missing, reason))


def _download(name: str, root: Path) -> None:
    # Imported here: torchvision is slow to import and only the file-backed datasets need it.
    import torchvision.datasets as tvd

    root.mkdir(parents=True, exist_ok=True)
    if name in ("mnist", "fashion-mnist"):
        cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
        cls(str(root), train=True, download=True)  # fetches all four files
    elif name == "cifar10":
        tvd.CIFAR10(str(root), train=True, download=True)
    elif name == "cifar100":
        tvd.CIFAR100(str(root), train=True, download=True)
    else:  # pragma: no cover - only file-backed datasets reach here
        raise AssertionError(name)


def _not_found_message(
    info: DatasetInfo,
    root: Path,
    given_root: Path,
    missing: list[str],
    reason: str | None = None,
) -> str:
    lines = [f"dataset '{info.name}': its files were not found in {root}"]
    if str(given_root) != str(root):
        lines[0] += f" (data-root {str(given_root)!r}, resolved from {Path.cwd()})"
    if reason:
        lines.append(f"{reason[0].upper()}{reason[1:]}.")
    if not root.exists():
        lines.append(f"The folder {root} does not exist.")
    lines.append("Expected files:")
    lines += [f"  {root / f}{'  (missing)' if f in missing else ''}" for f in info.files]
    lines.append(
        "To get them, either set download=true on a machine with internet access, e.g.\n"
        f"  fedmerge run dataset={info.name} data-root={root} download=true\n"
        "or copy the files into that folder in torchvision's layout (as listed above)."
    )
    lines.append("The run-config key that sets this folder is 'data-root'.")
    return "\n".join(lines)


def _unreadable(info_name: str, path: Path, exc: BaseException | str) -> DatasetNotFoundError:
    detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return DatasetNotFoundError(
        f"dataset '{info_name}': could not read {path} ({detail}). The file is damaged or "
        "not in the expected format: delete it and set download=true on a machine with "
        "internet access, or copy a good copy there (run-config key 'data-root')."
    )


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


# --------------------------------------------------------------------------------------------
# FedProx Synthetic(alpha, beta)
# --------------------------------------------------------------------------------------------

_SYNTHETIC_DIM = 60
_SYNTHETIC_CLASSES = 10


@functools.lru_cache(maxsize=4)
def _synthetic_arrays(num_users: int, alpha: float, beta: float, seed: int) -> _Arrays:
    """Generate FedProx's Synthetic(alpha, beta) (Li et al., MLSys 2020).

    Follows ``generate_synthetic(alpha, beta, iid=False)`` of the FedProx repository:

    - samples of user k: ``int(lognormal(4, 2)) + 50`` -- uncapped, as in FedProx. The tail
      is heavy (median about 105, mean about 450, and a user with tens of thousands of
      samples is possible with many users), but one sample is 240 bytes, so memory stays
      small;
    - ``u_k ~ N(0, alpha)``, ``W_k ~ N(u_k, 1)`` (60x10), ``b_k ~ N(u_k, 1)`` (10);
    - ``B_k ~ N(0, beta)``, ``v_k ~ N(B_k, 1)`` (60), ``x ~ N(v_k, Sigma)`` with
      ``Sigma = diag(j ** -1.2)``, j = 1..60;
    - ``y = argmax(softmax(x W_k + b_k))``.

    As in FedProx's code, alpha and beta are passed as the *scale* (standard deviation) of
    the normal draws. A property of FedProx's generator worth knowing: ``u_k`` shifts every
    entry of ``W_k`` and ``b_k`` alike, hence every logit of a sample by the same amount, so
    the labels do not depend on alpha at all (here, for one seed, alpha changes neither
    ``x`` nor ``y``: the normal draws are ``loc + scale * z`` from the same stream). Even
    Synthetic(0, 0) is strongly non-IID, since each user has its own ``W_k`` and ``v_k``.

    Each user's samples are split 90% train / 10% test (FedProx's ``int(0.9 * n)``); the
    test split is the union of the users' test parts. Features are left as generated (not
    standardised), as FedProx trains on them; ``mean``/``std`` stay empty to say so.
    """
    rng = _rng(seed, _STREAM_SYNTHETIC)
    sizes = rng.lognormal(4, 2, num_users).astype(np.int64) + 50
    u = rng.normal(0.0, alpha, num_users)  # mean of W_k and of b_k
    big_b = rng.normal(0.0, beta, num_users)
    v = rng.normal(big_b[:, None], 1.0, (num_users, _SYNTHETIC_DIM))
    # Sigma is diagonal, so independent normals with these std devs equal the
    # multivariate_normal draw of FedProx (and cost far less).
    sd = np.arange(1, _SYNTHETIC_DIM + 1, dtype=np.float64) ** (-1.2 / 2)

    parts: dict[str, list[np.ndarray]] = {"xtr": [], "ytr": [], "xte": [], "yte": [], "g": []}
    for k in range(num_users):
        w = rng.normal(u[k], 1.0, (_SYNTHETIC_DIM, _SYNTHETIC_CLASSES))
        b = rng.normal(u[k], 1.0, _SYNTHETIC_CLASSES)
        x = v[k] + rng.standard_normal((int(sizes[k]), _SYNTHETIC_DIM)) * sd
        y = np.argmax(x @ w + b, axis=1)  # softmax is monotone: argmax of the logits
        n_tr = int(0.9 * sizes[k])
        parts["xtr"].append(x[:n_tr])
        parts["ytr"].append(y[:n_tr])
        parts["xte"].append(x[n_tr:])
        parts["yte"].append(y[n_tr:])
        parts["g"].append(np.full(n_tr, k, dtype=np.int64))
    logger.info(
        "dataset synthetic(%g, %g): %d users, %d samples (seed %d)",
        alpha,
        beta,
        num_users,
        int(sizes.sum()),
        seed,
    )

    def cat(key: str) -> np.ndarray:
        return np.concatenate(parts[key])

    return _Arrays(
        x_train=torch.from_numpy(cat("xtr").astype(np.float32)),
        y_train=_labels(cat("ytr")),
        x_test=torch.from_numpy(cat("xte").astype(np.float32)),
        y_test=_labels(cat("yte")),
        classes=tuple(str(i) for i in range(_SYNTHETIC_CLASSES)),
        groups=_read_only(cat("g")),
    )
