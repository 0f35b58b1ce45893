"""Fault injection for the local engine: clients that fail in chosen rounds, in chosen ways.

:class:`FaultyClientApp` wraps a ClientApp (or any ``(message, context) -> Message``
callable) for :class:`fedmerge.engine.local.LocalGrid`. Each :class:`Fault` names a kind, the
partitions it hits and the rounds (the ``server-round`` the strategy puts in every
instruction). The healthy reply is computed first and then spoiled, so a faulty reply looks
like a real one in every other respect.

Kinds: ``raise`` (the ClientApp raises; the grid turns it into an error reply), ``stall``
(the node hangs for ``stall_seconds`` without holding up the other clients, then replies as
usual: past the round's timeout, nobody takes the reply), and the reply faults
of :data:`REPLY_FAULTS`. Some reply faults (``string-examples``, ``bool-metric``, ...) write
values that Flower's ``MetricRecord`` refuses on assignment: they go around its type check,
as a buggy serialiser or a hostile client could; they exist to test the server's checks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict

from .local import ClientCallable, outside_client_lock

log = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    """Raised by a client that a ``raise`` fault hits."""


def _arrays(content: RecordDict) -> tuple[str, ArrayRecord]:
    return next(iter(content.array_records.items()))


def _metrics(content: RecordDict) -> tuple[str, MetricRecord]:
    return next(iter(content.metric_records.items()))


def _with(content: RecordDict, key: str, record: ArrayRecord | MetricRecord | None) -> RecordDict:
    """A copy of ``content`` with ``record`` under ``key`` (removed when None)."""
    out = RecordDict({k: v for k, v in content.items() if k != key})
    if record is not None:
        out[key] = record
    return out


def _first_float(arrays: ArrayRecord) -> str:
    return next(k for k, a in arrays.items() if np.dtype(a.dtype).kind == "f")


def _edit_array(content: RecordDict, edit: Callable[[np.ndarray], np.ndarray]) -> RecordDict:
    """Apply ``edit`` to the first floating array of the reply."""
    key, arrays = _arrays(content)
    name = _first_float(arrays)
    new = ArrayRecord({k: a for k, a in arrays.items()})
    new[name] = Array(edit(arrays[name].numpy().copy()))
    return _with(content, key, new)


def _poison(value: float) -> Callable[[np.ndarray], np.ndarray]:
    def edit(a: np.ndarray) -> np.ndarray:
        a.flat[0] = value
        return a

    return edit


def _force_metric(content: RecordDict, name: str | None, value: object) -> RecordDict:
    """Set a metric (the first non-weight one when ``name`` is None), bypassing type checks."""
    key, metrics = _metrics(content)
    if name is None:
        name = next((k for k in metrics if k != "num-examples"), "injected-metric")
    new = MetricRecord(dict(metrics.items()))
    # Flower's TypedDict keeps its items in `_data`; writing there skips the value check.
    new.__dict__["_data"][name] = value
    return _with(content, key, new)


def _drop_last_array(content: RecordDict) -> RecordDict:
    key, arrays = _arrays(content)
    names = list(arrays.keys())
    return _with(content, key, ArrayRecord({k: arrays[k] for k in names[:-1]}))


def _extra_array(content: RecordDict) -> RecordDict:
    key, arrays = _arrays(content)
    new = ArrayRecord({k: a for k, a in arrays.items()})
    new["injected.extra"] = Array(np.zeros(3, dtype=np.float32))
    return _with(content, key, new)


def _wrong_shape(a: np.ndarray) -> np.ndarray:
    return np.zeros(a.size + 1, dtype=a.dtype)


def _truncated_data(content: RecordDict) -> RecordDict:
    """Metadata unchanged, bytes cut in half: what a broken transfer would leave."""
    key, arrays = _arrays(content)
    name = _first_float(arrays)
    a = arrays[name]
    new = ArrayRecord({k: v for k, v in arrays.items()})
    new[name] = Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=a.data[:-8])
    return _with(content, key, new)


def _second_array_record(content: RecordDict) -> RecordDict:
    _, arrays = _arrays(content)
    out = RecordDict(dict(content.items()))
    out["injected-arrays"] = ArrayRecord({k: a for k, a in arrays.items()})
    return out


#: Faults that spoil a healthy reply: kind -> (reply content -> spoiled content).
REPLY_FAULTS: dict[str, Callable[[RecordDict], RecordDict]] = {
    "nan": lambda c: _edit_array(c, _poison(float("nan"))),
    "inf": lambda c: _edit_array(c, _poison(float("inf"))),
    "wrong-shape": lambda c: _edit_array(c, _wrong_shape),
    "wrong-dtype": lambda c: _edit_array(c, lambda a: a.astype(np.float64)),
    "missing-key": _drop_last_array,
    "extra-key": _extra_array,
    "truncated-data": _truncated_data,
    "no-arrays": lambda c: _with(c, _arrays(c)[0], None),
    "renamed-arrays": lambda c: _with(_with(c, _arrays(c)[0], None), "model", _arrays(c)[1]),
    "two-array-records": _second_array_record,
    "no-metrics": lambda c: _with(c, _metrics(c)[0], None),
    "zero-examples": lambda c: _force_metric(c, "num-examples", 0),
    "negative-examples": lambda c: _force_metric(c, "num-examples", -5),
    "string-examples": lambda c: _force_metric(c, "num-examples", "12"),
    "list-examples": lambda c: _force_metric(c, "num-examples", [3, 4]),
    "bool-metric": lambda c: _force_metric(c, None, True),
    "string-metric": lambda c: _force_metric(c, None, "low"),
    "nan-metric": lambda c: _force_metric(c, None, float("nan")),
}

#: Every fault kind: the reply faults, a raising client and a stalling one.
FAULT_KINDS: tuple[str, ...] = (*REPLY_FAULTS, "raise", "stall")


def spoil(reply: Message, instruction: Message, kind: str) -> Message:
    """The reply ``kind`` makes of a healthy ``reply`` to ``instruction``."""
    if kind not in REPLY_FAULTS:
        raise ValueError(f"fault {kind!r} is not a reply fault; one of {', '.join(REPLY_FAULTS)}")
    return Message(REPLY_FAULTS[kind](reply.content), reply_to=instruction)


@dataclass(frozen=True)
class Fault:
    """One fault: what goes wrong, for which partitions, in which rounds.

    Parameters
    ----------
    kind : str
        One of :data:`FAULT_KINDS`.
    partitions : collection of int
        Partition ids of the clients it hits.
    rounds : collection of int, optional
        Server rounds (from 1) it hits; None for every round.
    message_type : str
        ``"train"`` or ``"evaluate"`` instructions.
    """

    kind: str
    partitions: Collection[int]
    rounds: Collection[int] | None = None
    message_type: str = MessageType.TRAIN

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; one of {', '.join(FAULT_KINDS)}")

    def hits(self, message_type: str, partition: int, server_round: int) -> bool:
        """Whether this fault applies to an instruction."""
        return (
            message_type == self.message_type
            and partition in self.partitions
            and (self.rounds is None or server_round in self.rounds)
        )


class FaultyClientApp:
    """A ClientApp whose clients fail as ``faults`` say; otherwise the wrapped app's replies.

    Give it to :class:`~fedmerge.engine.local.LocalGrid` without ``batch_train``: the
    vectorised path trains a round's clients without calling the ClientApp.

    Parameters
    ----------
    client_app : callable
        The ClientApp (``(message, context) -> Message``).
    faults : sequence of Fault
        The faults; the first that hits an instruction applies.
    stall_seconds : float
        How long a stalled client waits before replying (or until :meth:`release`).

    Attributes
    ----------
    injected : list of (round, partition, kind, message type)
        Every fault applied, in order.
    """

    def __init__(
        self, client_app: ClientCallable, faults: Sequence[Fault], *, stall_seconds: float = 30.0
    ) -> None:
        self.client_app, self.faults, self.stall_seconds = client_app, list(faults), stall_seconds
        self.injected: list[tuple[int, int, str, str]] = []
        self._release = threading.Event()

    def fault_for(self, message: Message, context: Context) -> str | None:
        """The kind of fault that hits this instruction, if any."""
        config = next(iter(message.content.config_records.values()), None)
        value = config.get("server-round", 0) if config is not None else 0
        if isinstance(value, list):
            raise TypeError("config 'server-round': expected a number, got a list")
        server_round = int(value)
        partition = int(context.node_config["partition-id"])
        message_type = message.metadata.message_type
        for fault in self.faults:
            if fault.hits(message_type, partition, server_round):
                self.injected.append((server_round, partition, fault.kind, message_type))
                log.info("round %d: fault %r on partition %d", server_round, fault.kind, partition)
                return fault.kind
        return None

    def release(self) -> None:
        """Let every stalled client (now and later) reply at once."""
        self._release.set()

    def __call__(self, message: Message, context: Context) -> Message:
        """Reply to ``message`` as the wrapped app would, spoiled when a fault hits."""
        kind = self.fault_for(message, context)
        if kind == "raise":
            raise InjectedFault(
                f"injected fault on partition {context.node_config['partition-id']}"
            )
        if kind == "stall":
            with outside_client_lock():  # a hung node holds up no one else on the grid
                self._release.wait(self.stall_seconds)
        reply = self.client_app(message, context)
        if kind is None or kind == "stall" or reply.has_error():
            return reply
        return spoil(reply, message, kind)
