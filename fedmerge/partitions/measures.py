"""How skewed a partition is: label counts, label skew, size skew."""

from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------------------------------------
# measures
# ---------------------------------------------------------------------------------------------


def label_counts(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Count each client's samples per class.

    Parameters
    ----------
    parts : list of np.ndarray
        Per client, its sample indices.
    labels : np.ndarray
        1-D integer class labels of the whole data set.
    num_classes : int
        Number of classes.

    Returns
    -------
    np.ndarray
        ``int64`` matrix of shape ``(num_clients, num_classes)``.
    """
    arr = np.asarray(labels)
    out = np.zeros((len(parts), num_classes), dtype=np.int64)
    for i, p in enumerate(parts):
        out[i] = np.bincount(arr[np.asarray(p, dtype=np.int64)], minlength=num_classes)[
            :num_classes
        ]
    return out


def label_skew(
    parts: list[np.ndarray], labels: np.ndarray, num_classes: int | None = None
) -> float:
    """Mean over clients of the total-variation distance to the global label distribution.

    0 for a perfectly IID split; approaches 1 when each client holds one rare class. Clients with
    no samples are left out of the mean.

    Parameters
    ----------
    parts : list of np.ndarray
        Per client, its sample indices.
    labels : np.ndarray
        1-D integer class labels of the whole data set.
    num_classes : int, optional
        Number of classes; ``labels.max() + 1`` by default.

    Returns
    -------
    float
        ``mean_i 0.5 * sum_c |p_i(c) - p(c)|``, in ``[0, 1]``.
    """
    arr = np.asarray(labels)
    n_cls = int(arr.max()) + 1 if num_classes is None else num_classes
    counts = label_counts(parts, arr, n_cls)
    sizes = counts.sum(axis=1)
    counts = counts[sizes > 0]
    if counts.size == 0:
        return 0.0
    glob = np.bincount(arr, minlength=n_cls)[:n_cls] / arr.size
    local = counts / counts.sum(axis=1, keepdims=True)
    return float(np.mean(0.5 * np.abs(local - glob).sum(axis=1)))


def size_skew(parts: list[np.ndarray]) -> float:
    """Coefficient of variation (std / mean) of the client sizes; 0 when all are equal.

    Parameters
    ----------
    parts : list of np.ndarray
        Per client, its sample indices.

    Returns
    -------
    float
        ``std(sizes) / mean(sizes)``.
    """
    sizes = np.array([len(p) for p in parts], dtype=np.float64)
    mean = sizes.mean() if sizes.size else 0.0
    return float(sizes.std() / mean) if mean > 0 else 0.0
