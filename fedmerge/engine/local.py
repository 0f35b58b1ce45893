"""The local engine: Flower's real ServerApp and ClientApp, run in one process.

:class:`LocalGrid` implements Flower's ``Grid`` by calling the ClientApp directly for every
instruction, one node after another, with one persistent ``Context`` per node. No SuperLink,
no Ray, no serialisation to the wire, no start-up cost: the strategy code (``start()``,
``configure_train``, ``aggregate_train``) and the ClientApp code are exactly those that run on
Flower's engines, only the transport differs. Deterministic: nodes are visited in a fixed
order and every client's randomness derives from (seed, partition id, round).

Timeouts: ``send_and_receive(messages, timeout=t)`` (what Flower's ``start()`` calls, ``t``
= its ``timeout`` argument) gives each client call ``t`` seconds, as Flower's engines wait ``t``
for clients that run in parallel. The call runs in a worker thread; a client still running at
its deadline gives no reply this round (the strategy sees fewer replies than it asked for),
and its node, still busy, gives no reply to later instructions until that call returns. Python
cannot stop a thread: the late call runs to its end and its reply is discarded. Without a
timeout (``push_messages``, or ``timeout=None``) clients are called in this thread. The
vectorised ``batch_train`` path has no deadline.

ClientApp calls never overlap: every call holds one process-wide lock, because a ClientApp may
keep per-process state (fedmerge's keeps one model object per architecture), which Flower's
engines never share between two running clients either. While a late call runs, the other
instructions of the round wait for it at most until the round's deadline (``t`` after the
round began) and are not delivered (no reply) if it has not ended by then. A wrapper that
waits without touching client state (the fault injector's stalled node) lets the others run
with :func:`outside_client_lock`.

Flower internals this module depends on (kept here, under tests/test_engine_local.py):
``flwr.supercore.task_identity.TaskIdentity`` must name a run and the server's node before a
strategy creates its first ``Message``; ``flwr.supercore.run.Run.create_empty``;
``flwr.common.constant.SUPERLINK_NODE_ID`` and ``ErrorCode``; and the private
``Metadata._message_id``, which ``push_messages`` fills in as Flower's SuperLink does.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Protocol, TypeVar
from uuid import uuid4

import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict, UserConfigValue
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from .workers import Task, WorkerPool, call_client, worker_pool

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: What the grid calls for each instruction: a ``ClientApp`` or any callable like it
#: (e.g. :class:`fedmerge.engine.faults.FaultyClientApp`).
ClientCallable = Callable[[Message, Context], Message]
#: Trains a round's instructions together: (messages, contexts) -> replies, or None.
BatchTrain = Callable[[list[Message], list[Context]], list[Message] | None]

# One ClientApp call at a time in this process (see the module docstring); `_holder.held` says
# whether this thread holds the lock on a grid's behalf.
_client_lock = threading.Lock()
_holder = threading.local()


@contextmanager
def _holding_client_lock(deadline: float | None) -> Iterator[bool]:
    """Hold the client lock: at once when free, else waiting until ``deadline``.

    ``deadline`` is in ``time.monotonic()`` seconds (None: wait forever). A lock had only after
    the deadline is given back: the call is refused (False), not run late.
    """
    if not _client_lock.acquire(blocking=False):  # free: the call runs, even past the deadline
        wait = -1 if deadline is None else max(0.0, deadline - time.monotonic())
        if not _client_lock.acquire(timeout=wait):
            yield False
            return
        if deadline is not None and time.monotonic() > deadline:
            # Had the lock only after the deadline (woken late on a loaded machine): the round
            # gave up on this call, and running it now could overlap the node's next call.
            _client_lock.release()
            yield False
            return
    _holder.held = True
    try:
        yield True
    finally:
        _holder.held = False
        _client_lock.release()


@contextmanager
def outside_client_lock() -> Iterator[None]:
    """Inside a ClientApp call on a ``LocalGrid``: let other clients run for a while.

    For a wait that touches no shared client state (a stalled node in fault injection); the
    lock is taken back, waiting as long as needed, before the block's end. A no-op outside a
    grid's call.
    """
    if not getattr(_holder, "held", False):
        yield
        return
    _holder.held = False
    _client_lock.release()
    try:
        yield
    finally:
        _client_lock.acquire()
        _holder.held = True


class CallHandle(Protocol):
    """A client call started elsewhere: joined and polled like a ``threading.Thread``."""

    def join(self, timeout: float | None = None) -> None: ...

    def is_alive(self) -> bool: ...


class _QueuedCall:
    """A call waiting for, or running on, the thread that serves a :class:`MainThreadCalls`."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn, self._done = fn, threading.Event()

    def run(self) -> None:
        try:
            self.fn()
        finally:
            self._done.set()

    def join(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)

    def is_alive(self) -> bool:
        return not self._done.is_set()


class MainThreadCalls:
    """Runs client calls on the thread that calls :meth:`serve` (the main thread).

    Why: PyTorch trains the same model markedly slower in a thread other than the main one
    on CPU (the intra-op thread pool belongs to the main thread; docs/benchmarks.md). While
    :meth:`serve` runs a call, a new call cannot wait for it (that call may be one that
    outlived its deadline): it runs in a fresh thread, as without this class.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_QueuedCall | None] = queue.SimpleQueue()
        self._running = threading.Event()

    def submit(self, fn: Callable[[], None]) -> CallHandle:
        """Run ``fn`` on the serving thread when it is free, else on a new thread."""
        if self._running.is_set():
            return _start_thread(fn)
        call = _QueuedCall(fn)
        self._queue.put(call)
        return call

    def serve(self) -> None:
        """Run submitted calls until :meth:`stop`."""
        while (call := self._queue.get()) is not None:
            self._running.set()
            try:
                call.run()
            finally:
                self._running.clear()

    def stop(self) -> None:
        """End :meth:`serve` once the calls already submitted have run."""
        if self._running.is_set():
            log.warning(
                "the run is over, but a client call that outlived its deadline still runs on "
                "the main thread: waiting for it to return (Python cannot stop it; Ctrl-C "
                "ends the process; worker processes, workers > 1, are stopped instead)"
            )
        self._queue.put(None)


def _start_thread(fn: Callable[[], None]) -> threading.Thread:
    worker = threading.Thread(
        target=fn,
        name="fedmerge-client",
        daemon=True,  # a client that never returns must not keep the process alive
    )
    worker.start()
    return worker


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Use ``threads`` intra-op threads for a block (0: leave torch's setting alone)."""
    previous = torch.get_num_threads()
    if threads <= 0 or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


#: Node ids of the local engine's clients are FIRST_NODE_ID + partition id (the SuperLink
#: itself is node 1). Clients never see their node id in fedmerge: they use partition ids.
FIRST_NODE_ID = 1000


class LocalGrid(Grid):
    """An in-process ``Grid`` that delivers each instruction by calling a ClientApp.

    Parameters
    ----------
    client_app : ClientApp or callable
        The ClientApp every node runs (any ``(message, context) -> Message`` callable).
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
    pool : WorkerPool, optional
        Run the client calls in these worker processes (several at once) instead of in this
        process; see :mod:`fedmerge.engine.workers`. With a pool, ``batch_train`` trains each
        worker's share of a round's clients together.
    client_threads : int
        Torch intra-op threads for in-process client calls (0: torch's setting as it is).
        Results depend on it (CPU kernels sum in a thread-count-dependent order); worker
        processes always use one.
    calls : MainThreadCalls, optional
        Where in-process calls with a deadline run (default: a new thread per call).
    """

    #: Replies come back in the order the instructions were sent (a deterministic order), not
    #: in arrival order as on Flower's engines: the ServerApp need not sort them.
    deterministic_reply_order = True

    def __init__(
        self,
        client_app: ClientCallable,
        run_config: Mapping[str, UserConfigValue],
        num_nodes: int,
        run_id: int = 1,
        batch_train: BatchTrain | None = None,
        *,
        pool: WorkerPool | None = None,
        client_threads: int = 0,
        calls: MainThreadCalls | None = None,
    ) -> None:
        self.client_app = client_app
        self.batch_train = batch_train
        self.pool, self.client_threads, self.calls = pool, client_threads, calls
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
        self._busy: dict[int, CallHandle] = {}  # nodes whose call outlived its deadline

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

    def _deliver(
        self, msg: Message, timeout: float | None = None, round_deadline: float | None = None
    ) -> Message | None:
        """The node's reply; None when it is busy, cannot start or misses the deadline."""
        node_id = msg.metadata.dst_node_id
        if node_id not in self._contexts:
            error = Error(ErrorCode.NODE_UNAVAILABLE, f"no node with id {node_id}")
            return Message(error, reply_to=msg)
        if self._is_busy(node_id):
            log.warning("node %d is still busy with an earlier instruction: no reply", node_id)
            return None
        if timeout is None or timeout >= threading.TIMEOUT_MAX:  # no deadline to enforce
            return self._on_client_thread(lambda: self._call_exclusive(msg, node_id, None))
        outcome: dict[str, Message | None] = {}

        def call() -> None:
            outcome.update(reply=self._call_exclusive(msg, node_id, round_deadline))

        worker = self.calls.submit(call) if self.calls is not None else _start_thread(call)
        worker.join(max(timeout, 0.0))
        if worker.is_alive():
            self._busy[node_id] = worker
            log.warning("node %d did not reply within %.3g s: no reply", node_id, timeout)
            return None
        if "reply" not in outcome:  # the call ended by a BaseException (SystemExit, ...)
            error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "the ClientApp did not return")
            return Message(error, reply_to=msg)
        if outcome["reply"] is None:
            log.warning("node %d not called: a call past its deadline still runs", node_id)
        return outcome["reply"]

    def _on_client_thread(self, fn: Callable[[], _T]) -> _T:
        """``fn()``, run where client calls run (the main thread under :func:`run_apps`)."""
        if self.calls is None:
            return fn()
        outcome: list[_T] = []
        failure: list[BaseException] = []

        def call() -> None:
            try:
                outcome.append(fn())
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                failure.append(exc)

        self.calls.submit(call).join()
        if failure:
            raise failure[0]
        return outcome[0]

    def _call_exclusive(self, msg: Message, node_id: int, deadline: float | None) -> Message | None:
        """The ClientApp's reply, called under the client lock; None if not had by ``deadline``."""
        with _holding_client_lock(deadline) as held:
            return self._call(msg, node_id) if held else None

    def _is_busy(self, node_id: int) -> bool:
        worker = self._busy.get(node_id)
        return worker is not None and worker.is_alive()

    def _call(self, msg: Message, node_id: int) -> Message:
        with _torch_threads(self.client_threads):
            return call_client(self.client_app, msg, self._contexts[node_id])

    def _deliver_batch(
        self, messages: list[Message], round_deadline: float | None
    ) -> list[Message] | None:
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        known = all(
            m.metadata.dst_node_id in self._contexts and not self._is_busy(m.metadata.dst_node_id)
            for m in messages
        )
        if self.batch_train is None or len(train) != len(messages) or len(train) < 2 or not known:
            return None
        contexts = [self._contexts[m.metadata.dst_node_id] for m in messages]
        batch_train = self.batch_train

        def train_batch() -> list[Message] | None:
            with _holding_client_lock(round_deadline) as held, _torch_threads(self.client_threads):
                return batch_train(messages, contexts) if held else None

        try:
            return self._on_client_thread(train_batch)
        except Exception as exc:  # noqa: BLE001 - the per-node path reports per-node errors
            log.warning(
                "batched training failed (%s: %s); calling the ClientApp per node",
                type(exc).__name__,
                exc,
            )
            return None

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run the ClientApp for each message now; keep the replies for ``pull_messages``."""
        return self._push(messages, None)

    def _push(self, messages: Iterable[Message], timeout: float | None) -> list[str]:
        messages = list(messages)
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            ids.append(msg.metadata.message_id)
        limit = None if timeout is None or timeout >= threading.TIMEOUT_MAX else max(timeout, 0.0)
        replies: Sequence[Message | None]
        if self.pool is not None:
            replies = self._deliver_by_pool(messages, limit)
        else:
            # How long this round waits for a call of an earlier round that outlived its deadline.
            round_deadline = None if limit is None else time.monotonic() + limit
            batch = self._deliver_batch(messages, round_deadline)
            if batch is not None:
                replies = batch
            else:
                replies = [self._deliver(msg, timeout, round_deadline) for msg in messages]
        for message_id, reply in zip(ids, replies, strict=True):
            if reply is not None:
                self._replies[message_id] = reply
        return ids

    def _deliver_by_pool(
        self, messages: list[Message], timeout: float | None
    ) -> list[Message | None]:
        """Every message's reply (None: none) from the worker processes; see ``workers``."""
        assert self.pool is not None
        replies: list[Message | None] = [None] * len(messages)
        busy = self.pool.busy_nodes()
        runnable: list[int] = []
        for i, msg in enumerate(messages):
            node_id = msg.metadata.dst_node_id
            if node_id not in self._contexts:
                error = Error(ErrorCode.NODE_UNAVAILABLE, f"no node with id {node_id}")
                replies[i] = Message(error, reply_to=msg)
            elif node_id in busy:
                log.warning("node %d is still busy with an earlier instruction: no reply", node_id)
            else:
                runnable.append(i)
        groups = self._pool_groups(messages, runnable)
        tasks: list[Task] = [
            (kind, [messages[i] for i in group], [self._contexts[messages[i].metadata.dst_node_id]
                                                  for i in group])
            for kind, group in groups
        ]  # fmt: skip
        for (_, group), result in zip(groups, self.pool.run(tasks, timeout), strict=True):
            if result is None:  # past the deadline, or the worker died: no reply
                continue
            for i, (reply, state) in zip(group, result, strict=True):
                self._contexts[messages[i].metadata.dst_node_id].state = state
                replies[i] = reply
        return replies

    def _pool_groups(
        self, messages: list[Message], runnable: list[int]
    ) -> list[tuple[str, list[int]]]:
        """One task per message, or, for batched training, one contiguous share per worker."""
        assert self.pool is not None
        train = all(messages[i].metadata.message_type == MessageType.TRAIN for i in runnable)
        if self.batch_train is None or not train or len(runnable) < 2:
            return [("call", [i]) for i in runnable]
        shares = min(self.pool.size, len(runnable))
        size, extra = divmod(len(runnable), shares)
        groups, start = [], 0
        for s in range(shares):
            end = start + size + (1 if s < extra else 0)
            groups.append(("batch", runnable[start:end]))
            start = end
        return groups

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to these messages (each handed out once)."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver every message; the replies of the clients that answer within ``timeout`` s.

        The deadline applies to each client call (clients run one after another here, in
        parallel on Flower's engines); see the module docstring.
        """
        return self.pull_messages(self._push(messages, timeout))


def set_server_identity(run_id: int) -> None:
    """Tell Flower's ``Message`` which run and node this process speaks for (the server)."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID


#: Torch intra-op threads of the ServerApp's work (evaluation, merging) under
#: :func:`run_apps`. One, whatever the workers: results then do not depend on them. And in
#: one process, only one thread should own an OpenMP team: a second thread that starts one
#: trains at about single-thread speed (measured, docs/benchmarks.md), so with in-process
#: clients the team is theirs (on the main thread).
SERVER_THREADS = 1


def run_apps(
    server_app: ServerApp,
    client_app: ClientCallable,
    run_config: Mapping[str, UserConfigValue],
    num_nodes: int,
    run_id: int = 1,
    batch_train: BatchTrain | None = None,
    *,
    workers: int = 1,
    client_threads: int = 0,
) -> LocalGrid:
    """Run ``server_app`` against ``num_nodes`` in-process nodes running ``client_app``.

    ``workers`` > 1 trains the clients in that many worker processes
    (:mod:`fedmerge.engine.workers`); with one, client calls run in this process, on the main
    thread when this is it (the ServerApp then runs in a second thread). The ServerApp's torch
    work runs with :data:`SERVER_THREADS` intra-op threads either way; client calls in this
    process with ``client_threads`` (0: torch's setting).
    """
    set_server_identity(run_id)
    context = Context(
        run_id=run_id,
        node_id=SUPERLINK_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=dict(run_config),
    )
    with worker_pool(client_app, workers, batch_train) as pool:
        on_main = threading.current_thread() is threading.main_thread()
        calls = MainThreadCalls() if pool is None and on_main else None
        grid = LocalGrid(
            client_app,
            run_config,
            num_nodes,
            run_id,
            batch_train,
            pool=pool,
            client_threads=client_threads,
            calls=calls,
        )
        if calls is None:
            with _torch_threads(SERVER_THREADS):
                server_app(grid, context)
        else:
            _serve_clients_while(calls, lambda: server_app(grid, context))
    return grid


def _serve_clients_while(calls: MainThreadCalls, server: Callable[[], None]) -> None:
    """Run ``server`` in a second thread while this thread runs the client calls it makes."""
    failure: list[BaseException] = []

    def run_server() -> None:
        torch.set_num_threads(SERVER_THREADS)
        try:
            server()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            failure.append(exc)
        finally:
            calls.stop()

    thread = threading.Thread(target=run_server, name="fedmerge-server", daemon=True)
    thread.start()
    calls.serve()
    thread.join()
    if failure:
        raise failure[0]
