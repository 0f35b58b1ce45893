"""Constants and argument checks shared by the partition schemes."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import TypeGuard

import numpy as np

from ..errors import ConfigError

#: Most re-draws ``dirichlet`` tries before giving up on ``min_size``.
MAX_REDRAWS = 1000
#: Most client-size draws ``quantity-skew`` tries (cheap, drawn in batches): with ``beta = 0.1``
#: and 10 clients, under one draw in a thousand gives every client 10 of 3,000 samples.
MAX_SIZE_REDRAWS = 100_000

#: ``fn(labels, num_clients, rng, **params) -> list of sorted int64 index arrays``.
PartitionFn = Callable[..., list[np.ndarray]]

_FLWR_DATASETS_HINT = "pip install 'fedmerge[flwr-datasets]'"

# ---------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------


def _is_int(value: object) -> TypeGuard[int]:
    """An integer, not a bool (NumPy integers too: the guard types them as ``int``)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> TypeGuard[float]:
    """A real number, not a bool (NumPy numbers too: the guard types them as ``float``)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_labels(labels: np.ndarray, num_classes: int | None = None) -> tuple[np.ndarray, int]:
    """Return ``labels`` as a 1-D int64 array (no copy if already int64) and the class count."""
    arr = np.asarray(labels)
    described = f"array of shape {arr.shape} and dtype {arr.dtype}"
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(
            "dataset",
            described,
            "a data set whose labels are a non-empty 1-D array of integer class ids",
        )
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0:
        raise ConfigError("dataset", described, "class ids >= 0", hint=f"found label {lo}")
    if num_classes is None:
        num_classes = hi + 1
    elif not _is_int(num_classes) or num_classes < 1:
        raise ConfigError("dataset", num_classes, "a number of classes that is an integer >= 1")
    elif hi >= num_classes:
        raise ConfigError(
            "dataset",
            described,
            f"class ids below num_classes={num_classes}",
            hint=f"found label {hi}",
        )
    return arr.astype(np.int64, copy=False), int(num_classes)


def _check_num_clients(num_clients: object, num_samples: int) -> int:
    if not _is_int(num_clients) or not 1 <= num_clients <= num_samples:
        raise ConfigError(
            "num-clients",
            num_clients,
            f"an integer from 1 to the number of training samples ({num_samples})",
        )
    return int(num_clients)


def _check_beta(beta: object) -> float:
    if not _is_real(beta) or not np.isfinite(beta) or beta <= 0:
        raise ConfigError(
            "partition-beta", beta, "a finite float > 0", hint="smaller beta = more skew"
        )
    return float(beta)


def _check_min_size(min_size: object, num_clients: int, num_samples: int) -> int:
    if not _is_int(min_size) or min_size < 0:
        raise ConfigError("partition-min-size", min_size, "an integer >= 0")
    if min_size * num_clients > num_samples:
        raise ConfigError(
            "partition-min-size",
            min_size,
            f"an integer with partition-min-size * num-clients ({num_clients}) <= the number of "
            f"training samples ({num_samples})",
            hint="lower partition-min-size or num-clients",
        )
    return int(min_size)


def _sorted_parts(parts: list[np.ndarray] | list[list[int]]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
