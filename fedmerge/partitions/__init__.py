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

import numpy as np

from ..errors import ConfigError, unknown_name
from .common import MAX_REDRAWS, MAX_SIZE_REDRAWS, PartitionFn, _is_int
from .feature_noise import add_feature_noise
from .flwr_adapter import FlwrDatasetsPartitioner, PartitionerLike, _is_partitioner_like
from .measures import label_counts, label_skew, size_skew
from .schemes import (
    PARTITIONS,
    dirichlet,
    iid,
    label_quantity,
    natural,
    noise,
    quantity_skew,
)

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
    if not _is_int(seed) or seed < 0:
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
