"""Reply validation: a strategy drops malformed client replies instead of dying on them.

Flower's ``FedAvg`` checks the reply contract (one ArrayRecord, one MetricRecord with
``num-examples``) and raises ``InconsistentMessageReplies`` out of ``start()`` when a reply
breaks it; NaN arrays, wrong shapes or a zero weight pass and poison the global model. Here
every reply is checked on its own (:func:`validate_reply`) and against the others
(:func:`filter_replies`); :class:`ValidatedReplies` puts that in front of any FedAvg-family
strategy, so the round goes on with the replies that pass.

What a train reply must hold
----------------------------
- no error (a ClientApp that raised comes back as an error reply);
- exactly one ArrayRecord and exactly one MetricRecord, as FedAvg expects; the ArrayRecord
  under the strategy's ``arrayrecord_key`` (``arrays``), where fedmerge's strategies read it;
- the keys of the global model the server sent, each array with its shape and dtype, stored
  as NumPy ``.npy`` bytes that agree with that metadata, and finite values;
- ``num-examples`` a single finite number > 0 (not a bool, not a list);
- every metric an int (within int64, as on the wire) or a finite float, or a list of them;
- the same metric keys, and the same list lengths, as most other valid replies (Flower's
  metric mean needs that).

Evaluate replies are checked the same way, less the arrays.

Cost: shapes and dtypes come from the arrays' metadata and the ``.npy`` header; the finiteness
check reads each floating array once through a zero-copy NumPy view of the bytes the message
already holds (a boolean temporary, no float copy), so FedAvg's own deserialisation stays the
only copy of the data.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TypeVar, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .replies import _dtype, _view

log = logging.getLogger(__name__)

#: name -> (shape, dtype) of the arrays a reply must return.
ArraySignature = dict[str, tuple[tuple[int, ...], str]]
#: What replies are checked against: the ArrayRecord sent, or its signature.
Reference = ArrayRecord | Mapping[str, tuple[tuple[int, ...], str]]

_MAX_LISTED = 3  # keys named in a reason before "..."
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def array_signature(arrays: ArrayRecord) -> ArraySignature:
    """The name, shape and dtype of every array (metadata only, no deserialisation)."""
    return {k: (tuple(int(d) for d in a.shape), str(a.dtype)) for k, a in arrays.items()}


def validate_reply(
    reply: Message,
    reference: Reference | None,
    *,
    weighted_by_key: str = "num-examples",
    train: bool = True,
    array_key: str | None = None,
) -> str | None:
    """Why a reply cannot be aggregated, or None when it can.

    Parameters
    ----------
    reply : Message
        A client's reply (possibly an error reply).
    reference : ArrayRecord or mapping, optional
        The global arrays sent with the instruction, or their :func:`array_signature`. None
        checks the arrays for readability and finiteness only.
    weighted_by_key : str
        The metric that weighs the reply (FedAvg's ``weighted_by_key``).
    train : bool
        A train reply (must carry arrays); False for an evaluate reply (metrics only).
    array_key : str, optional
        The key the ArrayRecord must have (the strategy's ``arrayrecord_key``, which
        fedmerge's own strategies read replies by); None accepts any key, as FedAvg does.

    Returns
    -------
    str or None
        A one-line reason, or None for a valid reply.
    """
    if reply.has_error():
        return f"error reply (code {reply.error.code}): {reply.error.reason}"
    content = reply.content
    if train and len(content.array_records) != 1:
        return f"expected exactly one ArrayRecord, got {len(content.array_records)}"
    if train and array_key is not None and array_key not in content.array_records:
        return f"the ArrayRecord is under {next(iter(content.array_records))!r}, not {array_key!r}"
    if len(content.metric_records) != 1:
        return f"expected exactly one MetricRecord, got {len(content.metric_records)}"
    reason = _metrics_reason(next(iter(content.metric_records.values())), weighted_by_key)
    if reason is None and train:
        if isinstance(reference, ArrayRecord):
            reference = array_signature(reference)
        reason = _arrays_reason(next(iter(content.array_records.values())), reference)
    return reason


def filter_replies(
    replies: Iterable[Message],
    reference: Reference | None,
    *,
    weighted_by_key: str = "num-examples",
    train: bool = True,
    array_key: str | None = None,
    per_node: Mapping[int, Reference] | None = None,
) -> tuple[list[Message], list[str]]:
    """Split replies into those that can be aggregated and the reasons for the others.

    Each reply is checked by :func:`validate_reply` (the keyword arguments are its own)
    against ``reference``, or against its node's own entry of ``per_node`` (a strategy that
    sends each node different arrays, as FedMA does);
    then the valid ones must agree with the
    most common metric layout (keys, and list lengths) and, when ``reference`` is None, the
    most common array signature. Ties go to the earliest reply.

    Returns
    -------
    valid : list of Message
        The replies to aggregate, in their original order.
    reasons : list of str
        ``"node <id>: <reason>"`` for every rejected reply.
    """
    if isinstance(reference, ArrayRecord):
        reference = array_signature(reference)
    valid: list[Message] = []
    reasons: list[str] = []
    for reply in replies:
        own = per_node.get(reply.metadata.src_node_id, reference) if per_node else reference
        reason = validate_reply(
            reply, own, weighted_by_key=weighted_by_key, train=train, array_key=array_key
        )
        if reason is None:
            valid.append(reply)
        else:
            reasons.append(f"node {reply.metadata.src_node_id}: {reason}")
    checks = [("metrics", _metric_layout)]
    if train and reference is None and not per_node:
        checks.append(("arrays", _array_layout))
    for what, layout in checks:
        layouts = [layout(r) for r in valid]
        if len(set(layouts)) > 1:
            common = Counter(layouts).most_common(1)[0][0]
            kept = [r for r, lay in zip(valid, layouts, strict=True) if lay == common]
            reasons += [
                f"node {r.metadata.src_node_id}: {what} differ from the other replies' "
                f"({_layout_diff(lay, common)})"
                for r, lay in zip(valid, layouts, strict=True)
                if lay != common
            ]
            valid = kept
    return valid, reasons


def nonfinite_reason(arrays: ArrayRecord) -> str | None:
    """Why ``arrays`` is not a usable model (unreadable or non-finite), or None."""
    return _arrays_reason(arrays, None)


# -- the mixin --------------------------------------------------------------------------
class ValidatedReplies(Strategy):
    """Validate client replies before a FedAvg-family strategy aggregates them.

    A mixin: it must come first in the MRO of the class that is instantiated, in front of
    the strategy whose aggregation it protects, so that the strategy's ``aggregate_train`` only
    ever sees valid replies. :func:`validated` builds that class (``ValidatedFedAvg`` for
    ``FedAvg``); the strategy registry instantiates every strategy through it. A new fedmerge
    strategy is written as a plain ``FedAvg`` subclass and registered as
    ``validated(MyStrategy)(...)``; do not list this mixin after your own class (its
    ``aggregate_train`` would then run on unchecked replies).

    Every round, ``configure_train`` remembers the signature of the arrays it sent and the
    nodes it asked; ``aggregate_train`` then drops each bad reply with a WARNING naming the
    node and the reason, aggregates the rest with the wrapped strategy, and adds to the
    round's train metrics (always, 0 when nothing happened):

    - ``rejected-replies``: replies that came back but were dropped (error replies included);
    - ``missing-replies``: nodes asked that sent no reply (timed out, lost);
    - ``round-skipped``: 1 when fewer than ``min_valid_replies`` replies passed, or the
      aggregate was not finite; the global model then stays as it was (Flower's ``start()``
      keeps the previous arrays when ``aggregate_train`` returns None).

    The aggregate keeps the dtypes of the model sent: Flower 1.41's ``FedAdam`` returns
    float64 arrays for a float32 model under NumPy 2 (a float64 NumPy scalar in its step),
    after which every client's float32 reply would fail the dtype check.

    Evaluate replies are filtered the same way; the evaluate metrics gain
    ``rejected-replies`` and ``missing-replies``.

    Attributes
    ----------
    min_valid_replies : int
        Fewest valid replies a round aggregates (1, Flower's own rule: FedAvg aggregates
        whatever arrives). Set it on the instance to demand more.
    """

    min_valid_replies: int = 1
    weighted_by_key: str = "num-examples"  # FedAvg sets the instance's own
    arrayrecord_key: str = "arrays"  # likewise

    # super() in the methods below is the wrapped strategy, next in the MRO of the class
    # validated() builds; mypy sees Strategy's abstract methods there: ignore[safe-super].

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's instructions; remembers what was sent and to whom."""
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[safe-super]
        self._train_reference = array_signature(arrays)
        self._train_sent = {m.metadata.dst_node_id for m in messages}
        # A reply must come back in the shapes its node was sent (the same for every node,
        # except for strategies that send each node its own arrays).
        key = getattr(self, "arrayrecord_key", "arrays")
        own = {
            m.metadata.dst_node_id: array_signature(m.content.array_records[key])
            for m in messages
            if key in m.content.array_records
        }
        differ = any(sig != self._train_reference for sig in own.values())
        self._train_per_node = own if differ else {}
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's instructions; remembers to whom they went."""
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))  # type: ignore[safe-super]
        self._evaluate_sent = {m.metadata.dst_node_id for m in messages}
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop bad replies, aggregate the rest, count both; never raises on a bad reply."""
        replies = list(replies)
        sent: set[int] = getattr(self, "_train_sent", set())
        self._train_sent = set()
        if not replies and not sent:  # training is off (fraction-train 0): nothing to count
            return super().aggregate_train(server_round, replies)  # type: ignore[safe-super]
        reference = getattr(self, "_train_reference", None)
        valid, reasons = filter_replies(
            replies,
            reference,
            weighted_by_key=self.weighted_by_key,
            array_key=getattr(self, "arrayrecord_key", None),
            per_node=getattr(self, "_train_per_node", None),
        )
        counts = _counts(server_round, "train", replies, reasons, sent)
        need = max(1, self.min_valid_replies)
        if len(valid) < need:
            log.warning(
                "round %d: %d valid train replies of %d asked (need %d): round skipped, the "
                "global model stays as it was",
                server_round,
                len(valid),
                len(sent) or len(replies),
                need,
            )
            return None, MetricRecord({**counts, "round-skipped": 1})
        arrays, metrics = super().aggregate_train(server_round, valid)  # type: ignore[safe-super]
        if arrays is not None and reference is not None:
            arrays = _cast_like(arrays, reference)
        skipped = arrays is None
        if arrays is not None and (reason := nonfinite_reason(arrays)) is not None:
            log.warning("round %d: aggregate unusable (%s): round skipped", server_round, reason)
            arrays, skipped = None, True
        metrics = metrics if metrics is not None else MetricRecord()
        for key, value in {**counts, "round-skipped": int(skipped)}.items():
            metrics[key] = value
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Drop bad evaluate replies, aggregate the rest, count both."""
        replies = list(replies)
        sent: set[int] = getattr(self, "_evaluate_sent", set())
        self._evaluate_sent = set()
        if not replies and not sent:  # federated evaluation is off
            return super().aggregate_evaluate(server_round, replies)  # type: ignore[safe-super]
        valid, reasons = filter_replies(
            replies, None, weighted_by_key=self.weighted_by_key, train=False
        )
        counts = _counts(server_round, "evaluate", replies, reasons, sent)
        metrics = super().aggregate_evaluate(server_round, valid) if valid else None  # type: ignore[safe-super]
        metrics = metrics if metrics is not None else MetricRecord()
        for key, value in counts.items():
            metrics[key] = value
        return metrics


_S = TypeVar("_S", bound=Strategy)


@functools.cache
def validated(cls: type[_S]) -> type[_S]:
    """``cls`` behind :class:`ValidatedReplies` (``ValidatedFedAvg`` for ``FedAvg``).

    The result is a subclass of ``cls`` (``isinstance(s, FedAvg)`` stays true) taking the
    same constructor arguments. A class that already has the mixin is returned as is.
    """
    if issubclass(cls, ValidatedReplies):
        return cls
    namespace = {
        "__module__": cls.__module__,
        "__doc__": f"{cls.__name__} with client replies validated (see ValidatedReplies).",
    }
    metaclass: type = type(cls)  # ABCMeta for Flower's strategies
    return cast(
        "type[_S]", metaclass(f"Validated{cls.__name__}", (ValidatedReplies, cls), namespace)
    )


# -- helpers ----------------------------------------------------------------------------
def _counts(
    server_round: int, what: str, replies: list[Message], reasons: list[str], sent: set[int]
) -> dict[str, int]:
    """Log every rejected reply and missing node; the two counts for the round's metrics."""
    for reason in reasons:
        log.warning("round %d: rejected %s reply from %s", server_round, what, reason)
    missing = sorted(sent - {r.metadata.src_node_id for r in replies})
    if missing:
        log.warning(
            "round %d: no %s reply from node(s) %s", server_round, what, _listed(missing, 10)
        )
    return {"rejected-replies": len(reasons), "missing-replies": len(missing)}


def _cast_like(arrays: ArrayRecord, reference: Mapping) -> ArrayRecord:
    """``arrays`` with the dtypes of ``reference`` (a copy only of the arrays that differ)."""
    drifted = [k for k, a in arrays.items() if k in reference and str(a.dtype) != reference[k][1]]
    if not drifted:
        return arrays
    log.debug("aggregate dtypes drifted for %s; cast back to the model's", _listed(drifted))
    out = ArrayRecord({k: a for k, a in arrays.items()})
    for k in drifted:
        out[k] = Array(arrays[k].numpy().astype(reference[k][1]))
    return out


def _metrics_reason(metrics: MetricRecord, weighted_by_key: str) -> str | None:
    if weighted_by_key not in metrics:
        return f"metrics lack {weighted_by_key!r}"
    for key, value in metrics.items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, bool) or not isinstance(v, int | float):
                return (
                    f"metric {key!r} holds a {type(v).__name__}; allowed: int, float or a "
                    "list of them"
                )
            if isinstance(v, float) and not math.isfinite(v):
                return f"metric {key!r} is not finite ({v})"
            if isinstance(v, int) and not _INT64_MIN <= v <= _INT64_MAX:
                return f"metric {key!r} is outside the int64 range"  # the wire's sint64
    weight = metrics[weighted_by_key]
    if isinstance(weight, list):
        return f"{weighted_by_key!r} is a list; expected a single number"
    if weight <= 0:
        return f"{weighted_by_key!r} is {weight}; expected > 0"
    return None


def _arrays_reason(arrays: ArrayRecord, reference: Mapping | None) -> str | None:
    if reference is not None and set(arrays.keys()) != set(reference):
        missing = sorted(set(reference) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(reference))
        return (
            f"array keys differ from the global model's (missing {_listed(missing)}, "
            f"unexpected {_listed(extra)})"
        )
    for name, array in arrays.items():
        try:
            declared = (tuple(int(d) for d in array.shape), str(array.dtype))
            expected = reference[name] if reference is not None else declared
            if declared != expected:
                return (
                    f"array {name!r} is {_describe(declared)}; the global model's is "
                    f"{_describe(expected)}"
                )
            view = _view(array)
            consistent = view.shape == declared[0] and view.dtype == _dtype(declared[1])
        except (ValueError, TypeError, OSError) as exc:
            return f"array {name!r} cannot be read ({exc})"
        if not consistent:
            return (
                f"array {name!r} holds {_describe((view.shape, str(view.dtype)))} but "
                f"declares {_describe(declared)}"
            )
        if view.dtype.kind in "fc" and not np.isfinite(view).all():
            return f"array {name!r} has non-finite values"
    return None


def _metric_layout(reply: Message) -> tuple:
    metrics = next(iter(reply.content.metric_records.values()))
    return tuple(sorted((k, len(v) if isinstance(v, list) else None) for k, v in metrics.items()))


def _array_layout(reply: Message) -> tuple:
    arrays = next(iter(reply.content.array_records.values()))
    return tuple(sorted(array_signature(arrays).items()))


def _layout_diff(layout: tuple, common: tuple) -> str:
    mine, theirs = dict(layout), dict(common)
    missing = sorted(set(theirs) - set(mine))
    extra = sorted(set(mine) - set(theirs))
    changed = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])
    return f"missing {_listed(missing)}, unexpected {_listed(extra)}, different {_listed(changed)}"


def _describe(signature: tuple) -> str:
    shape, dtype = signature
    return f"{dtype}{list(shape)}"


def _listed(items: list, limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}]"
