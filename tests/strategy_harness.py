"""Messages for driving a strategy's ``configure_train`` / ``aggregate_train`` by hand.

Shared by the strategy tests (FedMatch, FedNPMerge, FedWSA, reply validation): train
instructions come from a real strategy over a :class:`~fedmerge.engine.local.LocalGrid`, and
replies are built as a ClientApp would send them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedmerge.config import RunConfig
from fedmerge.engine.local import LocalGrid, set_server_identity


def train_reply(
    request: Message, arrays: ArrayRecord | Mapping[str, torch.Tensor], n: int, **metrics
) -> Message:
    """A train reply to ``request``: ``arrays`` and ``num-examples = n`` plus ``metrics``."""
    record = arrays if isinstance(arrays, ArrayRecord) else ArrayRecord(dict(arrays))
    values = MetricRecord({"num-examples": n, **metrics})
    return Message(RecordDict({"arrays": record, "metrics": values}), reply_to=request)


def train_requests(strategy, state: Mapping[str, torch.Tensor], n: int) -> list[Message]:
    """Round 1's train instructions of ``strategy`` to ``n`` local nodes, sending ``state``."""
    from fedmerge.clients.client_app import app as client_app

    cfg = RunConfig.from_mapping({"num-clients": n})
    grid = LocalGrid(client_app, cfg.to_mapping(), n)
    set_server_identity(grid.run.run_id)
    arrays = ArrayRecord(dict(state))
    return list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
