"""What the ServerApp needs from a strategy to checkpoint and resume a run.

:class:`RoundTracker` wraps the configured strategy for Flower's ``start()``, which it does not
override (it is ``Strategy.start`` itself, driving the wrapper's four hooks):

- **true round numbers.** ``start()`` numbers rounds from 1; a run resumed after round ``r``
  calls ``start(num_rounds=N - r)``, and the tracker adds ``r`` to the round number before the
  strategy sees it. So every hook, the ``server-round`` the clients receive (which seeds their
  training), the seeds the strategies derive from it (FedMatch, NP Merge, fedavg-ft) and
  FedAdam's bias correction are exactly those of an uninterrupted run.
- **round metrics as they happen.** It keeps each round's aggregated train (and client-side
  evaluate) metrics, so that the metrics written and checkpointed after a round include them:
  ``Result.train_metrics_clientapp`` only exists when ``start()`` returns.
- **a canonical reply order** (``sort_replies``). Flower's engines return replies in arrival
  order, and a float sum depends on the order of its terms; sorted by content, the aggregate
  no longer depends on which client finished first, so a run (and its resumption) gives the
  same numbers every time. The local engine returns them in node order already.

:func:`strategy_state` / :func:`load_strategy_state` save and restore a strategy's state across
rounds: Flower's FedAvgM (``current_arrays``, ``momentum_vector``), FedOpt family
(``current_arrays``, ``m_t``, ``v_t``) and any strategy with ``state_dict()`` /
``load_state_dict(state)`` methods (fedmerge's protocol: plain data and tensors; FedWSA keeps its
target and initial scopes there). The other registered strategies carry nothing across rounds:
FedMatch and FedNPMerge re-read the model sent in every ``configure_train``, fedavg-ft reloads
its model every round, and :class:`.validation.ValidatedReplies` forgets what it sent once the
round is aggregated.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

log = logging.getLogger(__name__)

#: Attributes of Flower's built-in strategies that carry state from one round to the next.
FLOWER_STATE = ("current_arrays", "momentum_vector", "m_t", "v_t")
_ARRAYS, _NDARRAY = "__arrayrecord__", "__ndarray__"


class RoundTracker(Strategy):
    """``strategy`` seen by ``start()`` with rounds offset and round metrics recorded.

    Parameters
    ----------
    strategy : Strategy
        The configured strategy; every hook is forwarded to it.
    round_offset : int
        Rounds already done (by the run this one resumes); round ``k`` of ``start()`` is round
        ``k + round_offset`` of the run.
    sort_replies : bool
        Hand replies to the strategy in a canonical order (by content) instead of arrival order.

    Attributes
    ----------
    train_metrics, evaluate_metrics : dict of int to MetricRecord
        The aggregated metrics of each (true) round.
    """

    def __init__(self, strategy: Strategy, round_offset: int = 0, sort_replies: bool = False):
        self.strategy, self.round_offset, self.sort_replies = strategy, round_offset, sort_replies
        self.train_metrics: dict[int, MetricRecord] = {}
        self.evaluate_metrics: dict[int, MetricRecord] = {}

    def summary(self) -> None:
        """The strategy's summary."""
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The strategy's train instructions for the true round."""
        return self.strategy.configure_train(server_round + self.round_offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The strategy's aggregate of the true round; its metrics kept."""
        true_round = server_round + self.round_offset
        arrays, metrics = self.strategy.aggregate_train(true_round, self._ordered(replies))
        if metrics is not None:
            self.train_metrics[true_round] = metrics
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The strategy's evaluate instructions for the true round."""
        true_round = server_round + self.round_offset
        return self.strategy.configure_evaluate(true_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The strategy's aggregate of the evaluate replies; its metrics kept."""
        true_round = server_round + self.round_offset
        metrics = self.strategy.aggregate_evaluate(true_round, self._ordered(replies))
        if metrics is not None:
            self.evaluate_metrics[true_round] = metrics
        return metrics

    def _ordered(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        return sorted(replies, key=reply_digest) if self.sort_replies else replies


def reply_digest(reply: Message) -> tuple[int, bytes]:
    """A key that orders replies by content, whoever sent them and whenever they arrived.

    Error replies first (by reason), then by a digest of the arrays' bytes and of the metrics,
    less those that measure time (``*time*``: they differ from run to run).
    """
    if reply.has_error():
        return 0, f"{reply.error.code}:{reply.error.reason}".encode()
    h = hashlib.blake2b(digest_size=16)
    content = reply.content
    for name, record in sorted(content.array_records.items()):
        h.update(name.encode())
        for key, array in record.items():
            h.update(key.encode())
            h.update(array.data)
    for name, metrics in sorted(content.metric_records.items()):
        h.update(name.encode())
        h.update(repr(sorted((k, v) for k, v in metrics.items() if "time" not in k)).encode())
    return 1, h.digest()


# -- strategy state -----------------------------------------------------------------------
def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """The state ``strategy`` carries across rounds, as plain data and tensors.

    Flower's attributes in :data:`FLOWER_STATE` that the strategy has, plus ``own``: what its
    ``state_dict()`` returns, if it has one.
    """
    state = {
        name: to_plain(getattr(strategy, name)) for name in FLOWER_STATE if hasattr(strategy, name)
    }
    own = getattr(strategy, "state_dict", None)
    if callable(own):
        state["own"] = own()
    return state


def load_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Restore what :func:`strategy_state` returned into a freshly built ``strategy``.

    Raises
    ------
    ValueError
        The state names attributes this strategy does not have (another strategy's state).
    """
    unknown = [k for k in state if k != "own" and not hasattr(strategy, k)]
    if unknown or ("own" in state) != callable(getattr(strategy, "load_state_dict", None)):
        raise ValueError(
            f"checkpointed strategy state ({sorted(state)}) does not fit {type(strategy).__name__}"
        )
    for name, value in state.items():
        if name == "own":
            strategy.load_state_dict(value)  # type: ignore[attr-defined]
        else:
            setattr(strategy, name, from_plain(value))


def to_plain(value: Any) -> Any:
    """``value`` with ArrayRecords and NumPy arrays as tagged tensors (``torch.load``-safe)."""
    if isinstance(value, ArrayRecord):
        return {_ARRAYS: {k: _tensor(a.numpy()) for k, a in value.items()}}
    if isinstance(value, np.ndarray | np.generic):
        return {_NDARRAY: _tensor(np.asarray(value))}
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    return value


def from_plain(value: Any) -> Any:
    """The inverse of :func:`to_plain` (tuples come back as lists)."""
    if isinstance(value, dict):
        if set(value) == {_ARRAYS}:
            return ArrayRecord({k: Array(t.numpy()) for k, t in value[_ARRAYS].items()})
        if set(value) == {_NDARRAY}:
            return value[_NDARRAY].numpy()
        return {k: from_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_plain(v) for v in value]
    return value


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True))  # own memory, same dtype and shape
