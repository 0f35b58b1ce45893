"""An adapter that runs a flwr-datasets partitioner on fedmerge's in-memory labels."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import ConfigError
from .common import _FLWR_DATASETS_HINT, _check_labels, _check_num_clients

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
