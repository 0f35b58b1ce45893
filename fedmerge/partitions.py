"""Seeded Non-IID partitions of a labelled data set among federated clients.

The schemes follow NIID-Bench: Q. Li, Y. Diao, Q. Chen and B. He, "Federated Learning on Non-IID
Data Silos: An Experimental Study", ICDE 2022 (code: ``Xtra-Computing/NIID-Bench``,
``utils.partition_data``):

``iid``
    A random permutation split as evenly as possible.
``dirichlet``
    Label distribution skew ``Dir(beta)``: for each class, split its samples among the clients by
    proportions drawn from ``Dirichlet(beta)``; a client that already holds ``N / num_clients``
    samples gets no more (NIID-Bench's balancing trick); re-draw the whole partition until every
    client has at least ``min_size`` samples.
``label-quantity``
    Label quantity skew ``#C=k``: client ``i`` holds label ``i % num_classes`` plus ``k - 1`` other
    distinct labels drawn at random; each label's samples are split evenly among its holders.
``quantity-skew``
    Client sizes from ``Dirichlet(beta)`` (re-drawn until every client has ``min_size`` samples),
    labels IID.
``noise``
    Feature skew by Gaussian noise: an IID split; client ``i`` then adds noise to its inputs with
    :func:`add_feature_noise`.
``natural``
    One client per natural group (e.g. the users of FedProx's Synthetic data set).

Every scheme is a pure function of ``(labels, num_clients, scheme, params, seed)``: it draws only
from the ``numpy.random.Generator`` it is given (:func:`make_partition` builds it from the seed),
never mutates its inputs, and returns one sorted ``int64`` index array per client.

Deviations from NIID-Bench
--------------------------
* NIID-Bench draws from NumPy's global RNG; fedmerge draws from a ``Generator`` built from the
  seed, so a seed gives the same partition here, but not the same one as NIID-Bench's.
* Index arrays are returned sorted (NIID-Bench shuffles each client's indices); clients shuffle
  their own data when they train.
* ``dirichlet`` and ``quantity-skew`` stop after :data:`MAX_REDRAWS` and :data:`MAX_SIZE_REDRAWS`
  re-draws and raise a
  :class:`~fedmerge.errors.ConfigError` instead of looping forever when ``min_size`` is out of
  reach. ``dirichlet`` skips classes with no samples, and when the balancing trick leaves no
  probability mass on the clients still open (an underflow that only tiny ``beta`` produces, and
  on which NIID-Bench divides by zero) it draws the proportions from ``Dirichlet(beta)`` over the
  open clients only, which by the Dirichlet's aggregation property is the same distribution.
* ``quantity-skew`` checks ``min_size`` on the integer client sizes after the cumulative-sum split
  (NIID-Bench checks ``proportions * N`` before rounding, which can leave a client one sample
  short), so every client really has at least ``min_size`` samples. Its re-draws are drawn in
  batches of 1,000 (the first that fits is used, as in a loop) and capped at
  :data:`MAX_SIZE_REDRAWS`: small ``beta`` needs thousands of them.
* ``label-quantity``: samples of a label that no client holds are dropped from the partition, as
  in NIID-Bench (this happens when ``num_clients * k < num_classes``). The ``k - 1`` extra labels
  are a uniform random subset of the other labels (NIID-Bench's rejection sampling draws from the
  same distribution).
* ``noise``: the noise std of client ``i`` is ``sigma * i / num_clients`` (as in fedmerge's spec;
  NIID-Bench uses ``sigma * i / (num_clients - 1)``), and the noise is drawn once per seed and
  client (NIID-Bench adds fresh noise each time a sample is loaded).
* ``num_classes`` defaults to ``labels.max() + 1`` (NIID-Bench hard-codes 10).

flwr-datasets partitioners (any object with ``load_partition`` and ``num_partitions``) are
accepted through :class:`FlwrDatasetsPartitioner`; flwr-datasets and ``datasets`` are imported
only there, so the library core stays free of Flower.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from fedmerge.errors import ConfigError, unknown_name

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_REDRAWS",
    "MAX_SIZE_REDRAWS",
    "PARTITIONS",
    "FlwrDatasetsPartitioner",
    "PartitionFn",
    "PartitionerLike",
    "add_feature_noise",
    "dirichlet",
    "iid",
    "label_counts",
    "label_quantity",
    "label_skew",
    "make_partition",
    "natural",
    "noise",
    "quantity_skew",
    "size_skew",
]

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


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
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
    if not _is_int(num_clients) or not 1 <= num_clients <= num_samples:  # type: ignore[operator]
        raise ConfigError(
            "num-clients",
            num_clients,
            f"an integer from 1 to the number of training samples ({num_samples})",
        )
    return int(num_clients)  # type: ignore[arg-type]


def _check_beta(beta: object) -> float:
    if not _is_real(beta) or not np.isfinite(beta) or beta <= 0:  # type: ignore[arg-type,operator]
        raise ConfigError(
            "partition-beta", beta, "a finite float > 0", hint="smaller beta = more skew"
        )
    return float(beta)  # type: ignore[arg-type]


def _check_min_size(min_size: object, num_clients: int, num_samples: int) -> int:
    if not _is_int(min_size) or min_size < 0:  # type: ignore[operator]
        raise ConfigError("partition-min-size", min_size, "an integer >= 0")
    if min_size * num_clients > num_samples:  # type: ignore[operator]
        raise ConfigError(
            "partition-min-size",
            min_size,
            f"an integer with partition-min-size * num-clients ({num_clients}) <= the number of "
            f"training samples ({num_samples})",
            hint="lower partition-min-size or num-clients",
        )
    return int(min_size)  # type: ignore[arg-type]


def _sorted_parts(parts: list[np.ndarray] | list[list[int]]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


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
    if not _is_int(k) or not 1 <= k <= n_cls:  # type: ignore[operator]
        raise ConfigError("partition-k", k, f"an integer from 1 to the number of classes ({n_cls})")
    k = int(k)
    holders: list[list[int]] = [[] for _ in range(n_cls)]  # label -> clients holding it
    for i in range(n_clients):
        own = i % n_cls
        others = np.delete(np.arange(n_cls), own)
        extra = rng.choice(others, size=k - 1, replace=False) if k > 1 else []
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


# ---------------------------------------------------------------------------------------------
# feature noise
# ---------------------------------------------------------------------------------------------


def add_feature_noise(
    x: torch.Tensor, client_id: int, num_clients: int, sigma: float, seed: int
) -> torch.Tensor:
    """Return ``x`` plus Gaussian noise of std ``sigma * client_id / num_clients``.

    The noise is drawn from a ``torch.Generator`` seeded from ``(seed, client_id)``, so it is the
    same for the same arguments and independent across clients. Client 0 gets no noise. ``x`` is
    never modified; a new tensor is returned (floating point: integer inputs are converted to the
    default float dtype).

    Parameters
    ----------
    x : torch.Tensor
        Inputs of one client (any shape, any device).
    client_id : int
        The client's id, ``0 <= client_id < num_clients``.
    num_clients : int
        Number of clients.
    sigma : float
        Noise scale (``partition-sigma``), ``>= 0``.
    seed : int
        Run seed (``seed``), ``>= 0``.

    Returns
    -------
    torch.Tensor
        ``x + N(0, (sigma * client_id / num_clients)^2)``, same shape and device as ``x``.
    """
    if not _is_int(num_clients) or num_clients < 1:
        raise ConfigError("num-clients", num_clients, "an integer >= 1")
    if not _is_int(client_id) or not 0 <= client_id < num_clients:
        raise ConfigError(
            "num-clients",
            num_clients,
            f"an integer > client id {client_id!r} (client ids run 0 .. num-clients - 1)",
        )
    if not _is_real(sigma) or not np.isfinite(sigma) or sigma < 0:
        raise ConfigError("partition-sigma", sigma, "a finite float >= 0")
    if not _is_int(seed) or seed < 0:
        raise ConfigError("seed", seed, "an integer >= 0")
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    std = float(sigma) * int(client_id) / int(num_clients)
    if std == 0.0:
        return x.to(dtype=dtype, copy=True)
    torch_seed = int(np.random.SeedSequence([int(seed), int(client_id)]).generate_state(1)[0])
    gen = torch.Generator(device="cpu").manual_seed(torch_seed)
    eps = torch.randn(x.shape, generator=gen, dtype=torch.float32)
    return x.to(dtype=dtype) + (std * eps).to(device=x.device, dtype=dtype)


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


# ---------------------------------------------------------------------------------------------
# flwr-datasets adapter
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class PartitionerLike(Protocol):
    """What fedmerge needs of a flwr-datasets partitioner."""

    def load_partition(self, partition_id: int) -> Any:
        """Return partition ``partition_id`` as a ``datasets.Dataset``."""
        ...


def _is_partitioner_like(obj: object) -> bool:
    # ``dir`` lists ``num_partitions`` without evaluating it (a property that raises before a
    # dataset is assigned, as in flwr-datasets' DirichletPartitioner).
    return callable(getattr(obj, "load_partition", None)) and "num_partitions" in dir(obj)


class FlwrDatasetsPartitioner:
    """Use any flwr-datasets partitioner as a fedmerge partition scheme.

    The labels are wrapped in a ``datasets.Dataset`` with columns ``label`` and ``_index`` (the
    sample's position), assigned to the partitioner, and each partition's ``_index`` column is
    read back. The label column is called ``label``, so partitioners that group by label must be
    built with ``partition_by="label"``, e.g.
    ``DirichletPartitioner(num_partitions=10, partition_by="label", alpha=0.5, seed=42)``.
    The partitioner's own ``seed`` drives its randomness (fedmerge's ``seed`` does not), and a
    flwr-datasets partitioner accepts a data set only once, so pass a fresh one for each split.

    Parameters
    ----------
    partitioner : object
        A flwr-datasets ``Partitioner`` (or anything with ``num_partitions``, a settable
        ``dataset`` and ``load_partition(i)``).
    """

    def __init__(self, partitioner: Any) -> None:
        if not _is_partitioner_like(partitioner):
            raise ConfigError(
                "partition",
                type(partitioner).__name__,
                "a scheme name or a flwr-datasets partitioner (with load_partition and "
                "num_partitions)",
            )
        self.partitioner = partitioner

    def __call__(
        self,
        labels: np.ndarray,
        num_clients: int,
        rng: np.random.Generator | None = None,
        **_ignored: object,
    ) -> list[np.ndarray]:
        """Partition ``labels`` with the wrapped partitioner.

        Parameters
        ----------
        labels : np.ndarray
            1-D integer class labels, one per sample.
        num_clients : int
            Number of clients; must equal the partitioner's ``num_partitions``.
        rng : np.random.Generator, optional
            Unused: the partitioner has its own seed.
        **_ignored
            fedmerge's scheme parameters, unused here.

        Returns
        -------
        list of np.ndarray
            Per client, its sorted ``int64`` sample indices.
        """
        arr, _ = _check_labels(labels)
        n_clients = _check_num_clients(num_clients, arr.size)
        try:
            from datasets import Dataset
        except ImportError as exc:
            raise ConfigError(
                "partition",
                type(self.partitioner).__name__,
                "a flwr-datasets partitioner, with flwr-datasets installed",
                hint=f"flwr-datasets / datasets is not installed: {_FLWR_DATASETS_HINT}",
            ) from exc
        is_assigned = getattr(self.partitioner, "is_dataset_assigned", None)
        if callable(is_assigned) and is_assigned():
            raise ConfigError(
                "partition",
                type(self.partitioner).__name__,
                "a flwr-datasets partitioner that has no data set assigned yet",
                hint="build a fresh partitioner for each partition",
            )
        ds = Dataset.from_dict({"label": arr.tolist(), "_index": list(range(arr.size))})
        self.partitioner.dataset = ds
        n_parts = int(self.partitioner.num_partitions)
        if n_parts != n_clients:
            raise ConfigError(
                "num-clients",
                n_clients,
                f"{n_parts} (the partitioner's num_partitions)",
                hint="set num-clients to the partitioner's num_partitions",
            )
        return [
            np.sort(np.asarray(self.partitioner.load_partition(i)["_index"], dtype=np.int64))
            for i in range(n_parts)
        ]


# ---------------------------------------------------------------------------------------------
# front door
# ---------------------------------------------------------------------------------------------


def make_partition(
    scheme: str | PartitionerLike,
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    *,
    beta: float = 0.5,
    k: int = 2,
    min_size: int = 10,
    num_classes: int | None = None,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Partition sample indices among clients with a named scheme (or a flwr-datasets partitioner).

    A pure function of its arguments: the randomness comes from ``np.random.default_rng(seed)``.
    Each parameter is validated only by the schemes that use it (``beta``: dirichlet,
    quantity-skew; ``k``: label-quantity; ``min_size``: dirichlet, quantity-skew; ``groups``:
    natural).

    Parameters
    ----------
    scheme : str or flwr-datasets partitioner
        One of :data:`PARTITIONS` (config key ``partition``), or an object with
        ``load_partition`` and ``num_partitions`` (see :class:`FlwrDatasetsPartitioner`).
    labels : np.ndarray
        1-D integer class labels, one per sample.
    num_clients : int
        Number of clients (``num-clients``), ``1 <= num_clients <= len(labels)``.
    seed : int
        Run seed (``seed``), ``>= 0``.
    beta : float, default 0.5
        Dirichlet concentration (``partition-beta``), ``> 0``.
    k : int, default 2
        Labels per client for label-quantity (``partition-k``).
    min_size : int, default 10
        Fewest samples per client for dirichlet / quantity-skew (``partition-min-size``).
    num_classes : int, optional
        Number of classes; ``labels.max() + 1`` by default.
    groups : np.ndarray, optional
        Natural group id of each sample (needed by ``natural``).

    Returns
    -------
    list of np.ndarray
        Per client, its sorted ``int64`` sample indices; disjoint.

    Raises
    ------
    ConfigError
        On any bad argument, naming the config key.
    """
    fn: PartitionFn
    if isinstance(scheme, str):
        if scheme not in PARTITIONS:
            raise unknown_name("partition", scheme, PARTITIONS)
        fn = PARTITIONS[scheme]
    elif isinstance(scheme, FlwrDatasetsPartitioner):
        fn = scheme
    elif _is_partitioner_like(scheme):
        fn = FlwrDatasetsPartitioner(scheme)
    else:
        raise unknown_name("partition", scheme, PARTITIONS)
    if not _is_int(seed) or seed < 0:  # type: ignore[operator]
        raise ConfigError("seed", seed, "an integer >= 0")
    rng = np.random.default_rng(int(seed))
    parts = fn(
        labels,
        num_clients,
        rng,
        beta=beta,
        k=k,
        min_size=min_size,
        num_classes=num_classes,
        groups=groups,
    )
    logger.debug(
        "partition %s: %d clients, sizes %s",
        scheme if isinstance(scheme, str) else type(scheme).__name__,
        len(parts),
        [len(p) for p in parts],
    )
    return parts
