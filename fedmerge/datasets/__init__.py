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

from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, unknown_name
from .common import (
    _STREAM_PROXY,
    _STREAM_SUBSAMPLE,
    _STREAM_TEST,
    _STREAM_VALIDATION,
    _check_int,
    _check_nonnegative_float,
    _read_only,
    _rng,
    _stratified_indices,
)
from .files import _ensure_files
from .input_scaling import INPUT_SCALINGS, to_unit_range
from .loaders import _load_arrays
from .registry import DATASETS, DatasetInfo, FederatedDataset, describe_datasets
from .synthetic import _synthetic_arrays

__all__ = [
    "DATASETS",
    "INPUT_SCALINGS",
    "DatasetInfo",
    "FederatedDataset",
    "clear_dataset_cache",
    "describe_datasets",
    "load_dataset",
]

# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    *,
    root: str | Path = "data",
    download: bool = False,
    proxy_size: int = 0,
    max_train_samples: int = 0,
    max_test_samples: int = 0,
    validation_size: int = 0,
    seed: int = 0,
    num_clients: int = 10,
    synthetic_alpha: float = 1.0,
    synthetic_beta: float = 1.0,
    input_scaling: str = "standard",
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
    max_test_samples : int
        ``0`` keeps the whole test split; otherwise a class-stratified subsample of that many
        test samples, drawn with a fixed seed (the same subset for every ``seed``, so runs of
        several seeds are scored on the same samples): for evaluations that would otherwise
        cost more than the training they score.
    validation_size : int
        ``0`` evaluates on the test split. Otherwise that many training samples (seeded,
        class-stratified) are held out as a validation split and take the test split's place
        (``x_test``/``y_test``; :attr:`FederatedDataset.eval_split` says ``"validation"``), so
        that hyper-parameters can be chosen without reading the test split. They are drawn
        from the training samples the proxy and the subsample left unused, so the clients
        train on the same samples as with ``validation_size = 0``; only when too few are left
        (``max_train_samples`` = 0 or close to the split) are they taken out of the clients'
        samples.
    seed : int
        Seed (``>= 0``) of the proxy split, the validation split, the subsample and the
        ``synthetic`` generator.
        The test split never depends on it, except for ``synthetic``, which is generated
        from it.
    num_clients : int
        ``synthetic`` only: the number of generating users (one per client).
    synthetic_alpha, synthetic_beta : float
        ``synthetic`` only: FedProx's alpha (model heterogeneity) and beta (feature
        heterogeneity), both ``>= 0``.
    input_scaling : {"standard", "unit"}
        Image inputs standardised per channel with the full training split's mean and std
        (``standard``), or pixel values in [0, 1] (``unit``: what ``ToTensor`` alone gives, as
        in Flower's NIID-Bench baseline). ``synthetic`` accepts only ``standard`` (its
        features are left as generated either way).

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
    _check_int("max-test-samples", max_test_samples, minimum=0)
    _check_int("validation-size", validation_size, minimum=0)
    _check_int("seed", seed, minimum=0)
    _check_int("num-clients", num_clients, minimum=1)
    _check_nonnegative_float("synthetic-alpha", synthetic_alpha)
    _check_nonnegative_float("synthetic-beta", synthetic_beta)
    if input_scaling not in INPUT_SCALINGS:
        raise unknown_name("input-scaling", input_scaling, INPUT_SCALINGS)

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

    validation_idx = np.empty(0, dtype=np.int64)
    if validation_size > 0:
        keep, validation_idx = _validation_split(y_all, proxy_idx, keep, validation_size, seed)

    if len(keep) == n_train:
        # Nothing removed: hand out the cached tensors themselves (no copy, see docstring).
        x_train, y_train, groups = arrays.x_train, arrays.y_train, arrays.groups
    else:
        keep_t = torch.from_numpy(keep)
        x_train, y_train = arrays.x_train[keep_t], arrays.y_train[keep_t]
        groups = None if arrays.groups is None else _read_only(arrays.groups[keep])
    proxy_t = torch.from_numpy(proxy_idx)
    x_test, x_proxy, mean, std = arrays.x_test, arrays.x_train[proxy_t], arrays.mean, arrays.std
    y_test = arrays.y_test
    eval_split = "test"
    if validation_size > 0:
        validation_t = torch.from_numpy(validation_idx)
        x_test, y_test = arrays.x_train[validation_t], arrays.y_train[validation_t]
        eval_split = "validation"
    elif 0 < max_test_samples < len(y_test):
        chosen = _stratified_indices(y_test.numpy(), max_test_samples, _rng(0, _STREAM_TEST))
        test_t = torch.from_numpy(np.sort(chosen))
        x_test, y_test = x_test[test_t], y_test[test_t]
    if input_scaling == "unit":
        if not mean:
            raise ConfigError(
                "input-scaling",
                input_scaling,
                f"standard for {name!r} (its features are not images)",
            )
        x_train, x_test, x_proxy = (to_unit_range(x, mean, std) for x in (x_train, x_test, x_proxy))
        mean, std = (0.0,) * len(mean), (1.0,) * len(std)  # what x = (pixel - mean) / std now holds
    return FederatedDataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        x_proxy=x_proxy,
        y_proxy=arrays.y_train[proxy_t],
        num_classes=info.num_classes,
        input_shape=tuple(arrays.x_train.shape[1:]),
        classes=arrays.classes,
        groups=groups,
        mean=mean,
        std=std,
        eval_split=eval_split,
    )


def _validation_split(
    y_all: np.ndarray, proxy_idx: np.ndarray, keep: np.ndarray, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(training indices, validation indices)``: ``size`` class-stratified samples from
    the training samples neither the proxy nor the clients use; when fewer than ``size`` are
    unused, from the clients' samples (which then lose them)."""
    rng = _rng(seed, _STREAM_VALIDATION)
    unused = np.setdiff1d(np.arange(len(y_all)), np.concatenate([proxy_idx, keep]))
    if len(unused) >= size:
        return keep, unused[_stratified_indices(y_all[unused], size, rng)]
    if size >= len(keep):
        raise ConfigError(
            "validation-size",
            size,
            f"an integer >= 0 and < {len(keep)} (the training samples left after the proxy "
            "slice and the subsample)",
            hint="The validation split is held out of the training split, so some must remain",
        )
    chosen = _stratified_indices(y_all[keep], size, rng)
    return np.delete(keep, chosen), keep[chosen]


def clear_dataset_cache() -> None:
    """Drop every dataset cached in this process (frees its memory once unreferenced)."""
    _load_arrays.cache_clear()
    _synthetic_arrays.cache_clear()
