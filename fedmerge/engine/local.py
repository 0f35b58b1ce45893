"""The local engine: Flower's real ServerApp and ClientApp, run in one process.

:class:`LocalGrid` implements Flower's ``Grid`` by calling the ClientApp directly for every
instruction, one node after another, with one persistent ``Context`` per node. No SuperLink,
no Ray, no serialisation to the wire, no start-up cost: the strategy code (``start()``,
``configure_train``, ``aggregate_train``) and the ClientApp code are exactly those that run on
Flower's engines, only the transport differs. Deterministic: nodes are visited in a fixed
order and every client's randomness derives from (seed, partition id, round).

Flower internals this module depends on (kept here, under tests/test_engine_local.py):
``flwr.supercore.task_identity.TaskIdentity`` must name a run and the server's node before a
strategy creates its first ``Message``; ``flwr.supercore.run.Run.create_empty``;
``flwr.common.constant.SUPERLINK_NODE_ID`` and ``ErrorCode``; and the private
``Metadata._message_id``, which ``push_messages`` fills in as Flower's SuperLink does.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterable, Mapping
from uuid import uuid4

from flwr.app import Context, Error, Message, MessageType, RecordDict, UserConfigValue
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

log = logging.getLogger(__name__)

#: Trains a round's instructions together: (messages, contexts) -> replies, or None.
BatchTrain = Callable[[list[Message], list[Context]], list[Message] | None]

#: Node ids of the local engine's clients are FIRST_NODE_ID + partition id (the SuperLink
#: itself is node 1). Clients never see their node id in fedmerge: they use partition ids.
FIRST_NODE_ID = 1000


class LocalGrid(Grid):
    """An in-process ``Grid`` that delivers each instruction by calling a ClientApp.

    Parameters
    ----------
    client_app : ClientApp
        The ClientApp every node runs.
    run_config : mapping
        The run-config every node's ``Context`` carries.
    num_nodes : int
        Number of nodes; node ``i`` gets ``node_config = {"partition-id": i,
        "num-partitions": num_nodes}``, as Flower's simulation engine gives them.
    run_id : int
        The run id put in every context and message.
    batch_train : callable, optional
        ``(train messages, their nodes' contexts) -> replies or None``: trains a round's
        clients together (fedmerge's vectorised path). When it returns None, or raises, the
        ClientApp is called node by node as usual.
    """

    def __init__(
        self,
        client_app: ClientApp,
        run_config: Mapping[str, UserConfigValue],
        num_nodes: int,
        run_id: int = 1,
        batch_train: BatchTrain | None = None,
    ) -> None:
        self.client_app = client_app
        self.batch_train = batch_train
        self._run = Run.create_empty(run_id)
        self._contexts = {
            FIRST_NODE_ID + i: Context(
                run_id=run_id,
                node_id=FIRST_NODE_ID + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        """Set the run this grid serves."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run this grid serves."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create an instruction (Flower's deprecated helper, kept for older strategies)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Node ids, in partition order."""
        return list(self._contexts)

    def context(self, node_id: int) -> Context:
        """The persistent context of a node (its ``state`` survives across rounds)."""
        return self._contexts[node_id]

    def _deliver(self, msg: Message) -> Message:
        node_id = msg.metadata.dst_node_id
        if node_id not in self._contexts:
            error = Error(ErrorCode.NODE_UNAVAILABLE, f"no node with id {node_id}")
            return Message(error, reply_to=msg)
        try:
            return self.client_app(msg, self._contexts[node_id])
        except Exception as exc:  # noqa: BLE001 - Flower's runtime turns any raise into an Error
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("ClientApp on node %d raised %s", node_id, reason)
            log.debug("%s", traceback.format_exc())
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)

    def _deliver_batch(self, messages: list[Message]) -> list[Message] | None:
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        known = all(m.metadata.dst_node_id in self._contexts for m in messages)
        if self.batch_train is None or len(train) != len(messages) or len(train) < 2 or not known:
            return None
        contexts = [self._contexts[m.metadata.dst_node_id] for m in messages]
        try:
            return self.batch_train(messages, contexts)
        except Exception as exc:  # noqa: BLE001 - the per-node path reports per-node errors
            log.warning(
                "batched training failed (%s: %s); calling the ClientApp per node",
                type(exc).__name__,
                exc,
            )
            return None

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run the ClientApp for each message now; keep the replies for ``pull_messages``."""
        messages = list(messages)
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            ids.append(msg.metadata.message_id)
        replies = self._deliver_batch(messages)
        if replies is None:
            replies = [self._deliver(msg) for msg in messages]
        for message_id, reply in zip(ids, replies, strict=True):
            self._replies[message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to these messages (each handed out once)."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver every message and return all replies (calls are synchronous: no timeout)."""
        return self.pull_messages(self.push_messages(messages))


def set_server_identity(run_id: int) -> None:
    """Tell Flower's ``Message`` which run and node this process speaks for (the server)."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def run_apps(
    server_app: ServerApp,
    client_app: ClientApp,
    run_config: Mapping[str, UserConfigValue],
    num_nodes: int,
    run_id: int = 1,
    batch_train: BatchTrain | None = None,
) -> LocalGrid:
    """Run ``server_app`` against ``num_nodes`` in-process nodes running ``client_app``."""
    grid = LocalGrid(client_app, run_config, num_nodes, run_id, batch_train)
    set_server_identity(run_id)
    context = Context(
        run_id=run_id,
        node_id=SUPERLINK_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=dict(run_config),
    )
    server_app(grid, context)
    return grid
