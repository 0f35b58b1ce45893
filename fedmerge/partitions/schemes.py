"""The partition schemes (NIID-Bench's and the natural split) and their registry."""

from __future__ import annotations

import logging

import numpy as np

from ..errors import ConfigError
from .common import (
    MAX_REDRAWS,
    MAX_SIZE_REDRAWS,
    PartitionFn,
    _check_beta,
    _check_labels,
    _check_min_size,
    _check_num_clients,
    _is_int,
    _sorted_parts,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# the schemes
# ---------------------------------------------------------------------------------------------


def iid(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, **_ignored: object
) -> list[np.ndarray]:
    """Split a random permutation of the samples as evenly as possible.

    Parameters
    ----------
    labels : np.ndarray
        1-D integer class labels, one per sample.
    num_clients : int
        Number of clients (``1 <= num_clients <= len(labels)``).
    rng : np.random.Generator
        Source of randomness.
    **_ignored
        Other schemes' parameters, accepted so that every scheme takes the same keywords.

    Returns
    -------
    list of np.ndarray
        Per client, its sorted ``int64`` sample indices; sizes differ by at most one.
    """
    arr, _ = _check_labels(labels)
    n = _check_num_clients(num_clients, arr.size)
    return _sorted_parts(np.array_split(rng.permutation(arr.size), n))


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    beta: float = 0.5,
    min_size: int = 10,
    num_classes: int | None = None,
    **_ignored: object,
) -> list[np.ndarray]:
    """Label distribution skew ``Dir(beta)`` (NIID-Bench ``noniid-labeldir``).

    Repeats until every client holds at least ``min_size`` samples: for each class, shuffle its
    indices, draw proportions from ``Dirichlet(beta * ones(num_clients))``, zero the proportion of
    every client that already holds ``len(labels) / num_clients`` samples or more, renormalise,
    and split the class's indices at the cumulative proportions.

    Parameters
    ----------
    labels : np.ndarray
        1-D integer class labels, one per sample.
    num_clients : int
        Number of clients.
    rng : np.random.Generator
        Source of randomness.
    beta : float, default 0.5
        Dirichlet concentration (``partition-beta``); smaller means more skew.
    min_size : int, default 10
        Fewest samples any client may get (``partition-min-size``).
    num_classes : int, optional
        Number of classes; ``labels.max() + 1`` by default.
    **_ignored
        Other schemes' parameters.

    Returns
    -------
    list of np.ndarray
        Per client, its sorted ``int64`` sample indices.

    Raises
    ------
    ConfigError
        On a bad parameter, or (key ``partition-min-size``) when :data:`MAX_REDRAWS` draws all
        left some client with fewer than ``min_size`` samples.
    """
    arr, n_cls = _check_labels(labels, num_classes)
    n_clients = _check_num_clients(num_clients, arr.size)
    b = _check_beta(beta)
    need = _check_min_size(min_size, n_clients, arr.size)
    total = arr.size
    by_class = [np.flatnonzero(arr == k) for k in range(n_cls)]
    by_class = [idx for idx in by_class if idx.size > 0]

    for attempt in range(1, MAX_REDRAWS + 1):
        batches: list[list[int]] = [[] for _ in range(n_clients)]
        for cls_idx in by_class:
            idx_k = rng.permutation(cls_idx)
            sizes = np.fromiter((len(bt) for bt in batches), dtype=np.int64, count=n_clients)
            open_ = sizes < total / n_clients
            props = rng.dirichlet(np.full(n_clients, b)) * open_
            mass = props.sum()
            if not (np.isfinite(mass) and mass > 0):
                # Underflow (tiny beta): draw over the open clients only; same distribution.
                props = np.zeros(n_clients)
                props[open_] = rng.dirichlet(np.full(int(open_.sum()), b))
                mass = props.sum()
            props = props / mass
            cuts = (np.cumsum(props) * idx_k.size).astype(np.int64)[:-1]
            for batch, piece in zip(batches, np.split(idx_k, cuts), strict=True):
                batch.extend(piece.tolist())
        smallest = min(len(bt) for bt in batches)
        if smallest >= need:
            logger.debug("dirichlet(beta=%g): %d draw(s), smallest client %d", b, attempt, smallest)
            return _sorted_parts(batches)
    raise ConfigError(
        "partition-min-size",
        need,
        f"a size that a Dir({b:g}) partition of {total} samples among {n_clients} clients reaches",
        hint=(
            f"no draw in {MAX_REDRAWS} gave every client {need} samples; lower "
            "partition-min-size, raise partition-beta or use fewer num-clients"
        ),
    )


def label_quantity(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    k: int = 2,
    num_classes: int | None = None,
    **_ignored: object,
) -> list[np.ndarray]:
    """Label quantity skew ``#C=k`` (NIID-Bench ``noniid-#label{k}``).

    Client ``i`` holds label ``i % num_classes`` and ``k - 1`` other distinct labels drawn at
    random; each label's shuffled samples are split evenly (``np.array_split``) among the clients
    that hold it. Samples of a label that no client holds are dropped, as in NIID-Bench; this
    can happen whenever the random draws leave a label unchosen (certainly when
    ``num_clients * k < num_classes``), and is logged as a warning.

    Parameters
    ----------
    labels : np.ndarray
        1-D integer class labels, one per sample.
    num_clients : int
        Number of clients.
    rng : np.random.Generator
        Source of randomness.
    k : int, default 2
        Labels per client (``partition-k``), ``1 <= k <= num_classes``.
    num_classes : int, optional
        Number of classes; ``labels.max() + 1`` by default.
    **_ignored
        Other schemes' parameters.

    Returns
    -------
    list of np.ndarray
        Per client, its sorted ``int64`` sample indices.
    """
    arr, n_cls = _check_labels(labels, num_classes)
    n_clients = _check_num_clients(num_clients, arr.size)
    if not _is_int(k) or not 1 <= k <= n_cls:
        raise ConfigError("partition-k", k, f"an integer from 1 to the number of classes ({n_cls})")
    k = int(k)
    holders: list[list[int]] = [[] for _ in range(n_cls)]  # label -> clients holding it
    for i in range(n_clients):
        own = i % n_cls
        others = np.delete(np.arange(n_cls), own)
        extra: np.ndarray | list[int] = (
            rng.choice(others, size=k - 1, replace=False) if k > 1 else []
        )
        for label in [own, *(int(e) for e in extra)]:
            holders[label].append(i)

    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    dropped = 0
    for label in range(n_cls):
        idx = rng.permutation(np.flatnonzero(arr == label))
        if not holders[label]:
            dropped += idx.size
            continue
        for client, piece in zip(
            holders[label], np.array_split(idx, len(holders[label])), strict=True
        ):
            parts[client].append(piece)
    if dropped:
        logger.warning("label-quantity(k=%d): %d samples of unheld labels dropped", k, dropped)
    return _sorted_parts([np.concatenate(p) if p else np.empty(0, dtype=np.int64) for p in parts])


def quantity_skew(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    beta: float = 0.5,
    min_size: int = 10,
    **_ignored: object,
) -> list[np.ndarray]:
    """Quantity skew (NIID-Bench ``iid-diff-quantity``): Dirichlet sizes, IID labels.

    Client shares are drawn from ``Dirichlet(beta * ones(num_clients))`` until every client's
    integer size is at least ``min_size``; a random permutation of the samples is then split at
    the cumulative shares.

    Parameters
    ----------
    labels : np.ndarray
        1-D integer class labels, one per sample.
    num_clients : int
        Number of clients.
    rng : np.random.Generator
        Source of randomness.
    beta : float, default 0.5
        Dirichlet concentration (``partition-beta``); smaller means more unequal sizes.
    min_size : int, default 10
        Fewest samples any client may get (``partition-min-size``).
    **_ignored
        Other schemes' parameters.

    Returns
    -------
    list of np.ndarray
        Per client, its sorted ``int64`` sample indices.
    """
    arr, _ = _check_labels(labels)
    n_clients = _check_num_clients(num_clients, arr.size)
    b = _check_beta(beta)
    need = _check_min_size(min_size, n_clients, arr.size)
    perm = rng.permutation(arr.size)
    batch = 1000
    for start in range(0, MAX_SIZE_REDRAWS, batch):
        # ``batch`` successive re-draws at once; the first that fits is taken, as in a loop.
        props = rng.dirichlet(np.full(n_clients, b), size=min(batch, MAX_SIZE_REDRAWS - start))
        props = props / props.sum(axis=1, keepdims=True)
        cuts = (np.cumsum(props, axis=1) * arr.size).astype(np.int64)[:, :-1]
        edges = np.concatenate(
            [np.zeros((len(cuts), 1), np.int64), cuts, np.full((len(cuts), 1), arr.size)], axis=1
        )
        fits = np.flatnonzero(np.diff(edges, axis=1).min(axis=1) >= need)
        if fits.size:
            row = int(fits[0])
            logger.debug("quantity-skew(beta=%g): %d draw(s)", b, start + row + 1)
            return _sorted_parts(np.split(perm, cuts[row]))
    raise ConfigError(
        "partition-min-size",
        need,
        f"a size that Dir({b:g}) client sizes of {arr.size} samples among {n_clients} clients "
        "reach",
        hint=(
            f"no draw in {MAX_SIZE_REDRAWS} gave every client {need} samples; lower "
            "partition-min-size, raise partition-beta or use fewer num-clients"
        ),
    )


def noise(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, **_ignored: object
) -> list[np.ndarray]:
    """Index split of the feature-noise scheme: IID (the skew comes from :func:`add_feature_noise`).

    Parameters
    ----------
    labels : np.ndarray
        1-D integer class labels, one per sample.
    num_clients : int
        Number of clients.
    rng : np.random.Generator
        Source of randomness.
    **_ignored
        Other schemes' parameters.

    Returns
    -------
    list of np.ndarray
        Per client, its sorted ``int64`` sample indices (the same as :func:`iid`'s).
    """
    return iid(labels, num_clients, rng)


def natural(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    groups: np.ndarray | None = None,
    **_ignored: object,
) -> list[np.ndarray]:
    """One client per natural group (e.g. a user of FedProx's Synthetic data set).

    Client ``i`` gets the samples of the ``i``-th group id in sorted order. Uses no randomness.

    Parameters
    ----------
    labels : np.ndarray
        1-D integer class labels, one per sample.
    num_clients : int
        Number of clients; must equal the number of distinct group ids.
    rng : np.random.Generator
        Unused (kept for the common signature).
    groups : np.ndarray
        Group id of each sample, same length as ``labels``.
    **_ignored
        Other schemes' parameters.

    Returns
    -------
    list of np.ndarray
        Per client, its sorted ``int64`` sample indices.
    """
    arr, _ = _check_labels(labels)
    if groups is None:
        raise ConfigError(
            "partition", "natural", "natural needs a dataset with natural clients (synthetic)"
        )
    g = np.asarray(groups)
    if g.shape != arr.shape:
        raise ConfigError(
            "dataset",
            f"group ids of shape {g.shape}",
            f"one natural group id per sample (shape {arr.shape})",
        )
    uniq, inverse = np.unique(g, return_inverse=True)
    if not _is_int(num_clients) or num_clients != uniq.size:
        raise ConfigError(
            "num-clients",
            num_clients,
            f"{uniq.size} (the number of natural groups in this data set)",
            hint="partition=natural gives one client per natural group",
        )
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=uniq.size))[:-1]
    return _sorted_parts(np.split(order, bounds))


#: Partition schemes by their ``partition`` config name.
PARTITIONS: dict[str, PartitionFn] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "label-quantity": label_quantity,
    "quantity-skew": quantity_skew,
    "noise": noise,
    "natural": natural,
}
