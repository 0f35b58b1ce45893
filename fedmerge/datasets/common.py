"""Argument checks, seeded random streams and index helpers of the dataset loader."""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError

# Independent seeded streams, so e.g. the proxy slice does not change with max_train_samples.
_STREAM_SYNTHETIC = 0
_STREAM_PROXY = 1
_STREAM_SUBSAMPLE = 2
_STREAM_TEST = 3
_STREAM_VALIDATION = 4


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
