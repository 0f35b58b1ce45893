"""``MergeStrategy``: Flower's FedAvg with the aggregation replaced by a merge function.

Sampling, messaging, the reply checks, metric aggregation and evaluation are Flower FedAvg's;
only the arrays change. ``configure_train`` remembers the model it sent (as Flower's FedOpt
does), and ``aggregate_train`` deserialises each client's arrays once and calls
``merge(states, weights, reference, seed=...)`` (:mod:`.merges`) with that model as the
reference. No FedAvg average is computed and thrown away. Without a merge function the
arrays are FedAvg's weighted mean, to the bit (:func:`.merges.fedavg_average`).

Round metrics, besides the clients' (weighted by ``num-examples``): whatever the merge function
reports, and ``merge-time`` (seconds).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Iterable, Iterator, Sequence
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedmerge.permutations import State
from fedmerge.spread import SharePool, spreading

from .merges import MergeFn, fedavg_average
from .replies import client_states


def _takes_seed(merge: MergeFn) -> bool:
    """Whether ``merge`` accepts a ``seed`` keyword."""
    try:
        params = inspect.signature(merge).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return any(p.name == "seed" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class MergeStrategy(FedAvg):
    """FedAvg whose aggregation is a merge function of the client models.

    Parameters
    ----------
    merge : callable, optional
        ``merge(states, weights, reference, *, seed) -> (merged, report)`` (see
        :mod:`.merges`; ``seed`` may be left out and ``report`` too). ``None``: FedAvg's mean.
    seed : int
        Each round's merge gets ``seed + server_round``.
    merge_threads : int
        Torch threads the merge runs on, set for the merge and restored after it (run-config
        key ``merge-threads``). 1 (default): as under fedmerge's engines, whose server runs on
        one thread; in a user's ServerApp beside Ray actors or other processes it keeps the
        merge from oversubscribing the cores. 0: torch's setting as it is.
    **kwargs
        Passed to ``FedAvg`` (``fraction_train``, ``min_train_nodes``, ...).

    Examples
    --------
    >>> def keep_first(states, weights, reference):
    ...     return dict(states[0]), {}
    >>> strategy = MergeStrategy(merge=keep_first, fraction_evaluate=0.0)
    """

    def __init__(
        self,
        *,
        merge: MergeFn | None = None,
        seed: int = 0,
        merge_threads: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if merge is not None and not callable(merge):
            raise TypeError(f"merge must be a function, got {type(merge).__name__}")
        if isinstance(merge_threads, bool) or not isinstance(merge_threads, int):
            raise TypeError(f"merge_threads must be an int, got {merge_threads!r}")
        if merge_threads < 0:
            raise ValueError(f"merge_threads must be >= 0 (0: torch's), got {merge_threads}")
        self.merge_fn = merge
        self.seed = seed
        self.merge_threads = merge_threads
        self._merge_takes_seed = merge is not None and _takes_seed(merge)
        self._sent: dict[str, torch.Tensor] | None = None
        self._pool: SharePool | None = None

    @property
    def merge_name(self) -> str:
        """What aggregates: the merge function's name, or ``fedavg``."""
        if self.merge_fn is None:
            return "fedavg"
        return getattr(self.merge_fn, "__name__", type(self.merge_fn).__name__)

    def summary(self) -> None:
        """Log the configuration."""
        super().summary()
        log(INFO, "\t└──> merge: %s | seed %d", self.merge_name, self.seed)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the model sent (the merge's reference), then FedAvg's sampling."""
        self._sent = arrays.to_torch_state_dict()
        # The local engine's worker processes (None on other grids): idle while the merge runs.
        self._pool = getattr(grid, "pool", None)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's reply checks and metrics; the arrays from the merge function."""
        arrays, metrics, _, _ = self.aggregate_states(server_round, replies)
        return arrays, metrics

    def aggregate_states(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None, list[State], list[float]]:
        """``aggregate_train``'s work, also returning the client states it read (for subclasses
        that need them again, such as FedWSA's scopes)."""
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None, [], []
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        states, weights = client_states(valid, self.weighted_by_key)
        start = time.perf_counter()
        merged, report = self.merge_states(states, weights, server_round)
        metrics = metrics if metrics is not None else MetricRecord()
        for key, value in report.items():
            metrics[key] = value
        if self.merge_fn is not None:
            metrics["merge-time"] = time.perf_counter() - start
        return ArrayRecord(merged), metrics, states, weights

    @contextlib.contextmanager
    def merge_resources(self) -> Iterator[None]:
        """What a merge runs on: torch on :attr:`merge_threads` threads (its setting restored
        after), and under the local engine its idle worker processes, which the merge's
        divisible work may use (:mod:`fedmerge.spread`)."""
        previous = torch.get_num_threads()
        if self.merge_threads:
            torch.set_num_threads(self.merge_threads)
        try:
            with spreading(self._pool):
                yield
        finally:
            if torch.get_num_threads() != previous:
                torch.set_num_threads(previous)

    def merge_states(
        self, states: Sequence[State], weights: Sequence[float], server_round: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """One round's merge (in :meth:`merge_resources`): the merge function's (merged,
        report), or FedAvg's mean."""
        if self.merge_fn is None:
            return fedavg_average(states, weights), {}
        reference = self._sent if self._sent is not None else dict(states[0])
        with self.merge_resources():
            if self._merge_takes_seed:
                out = self.merge_fn(states, weights, reference, seed=self.seed + server_round)
            else:
                out = self.merge_fn(states, weights, reference)
        if isinstance(out, tuple):
            merged, report = out
            return merged, dict(report)
        return out, {}
