"""Process-parallel clients for the local engine: a pool of persistent, forked workers.

:class:`WorkerPool` trains a round's clients in ``size`` worker processes at once. Each worker
is forked from the engine's process the first time the pool is used (after the ServerApp has
loaded the data for its round-0 evaluation), so it inherits the loaded dataset, the partition
cache and the ClientApp object copy-on-write: nothing is pickled per round but the messages
(the global weights and the config the strategy sends) and each node's ``Context``, whose
``state`` comes back with the reply so that the engine keeps every node's context, wherever
its calls run.

Why processes, measured on 2 CPU cores (docs/benchmarks.md): PyTorch's intra-op threads speed
the small models of FL research up far less than a second process does, and a client trained
off the main thread loses most of its intra-op parallelism.

Why one intra-op thread per worker: GNU OpenMP cannot start a thread team in a process forked
after its parent used one (a forked child with two torch threads hangs in its first parallel
kernel; a child with one thread never starts a team). Results do not depend on the worker a
client lands on (each client's seed derives from (seed, partition id, round), the replies are
handed back in the order the instructions were sent), so they equal those of one in-process
worker with ``client-threads = 1``.

Deadlines behave as on the in-process grid: each call gets ``timeout`` seconds from its start;
a call still running then gives no reply, its worker is set aside (it finishes the call, which
is discarded, then exits) and a fresh worker takes its place, and its node gives no reply to
later instructions until that call has ended. A worker that dies (killed, crashed) gives no
reply for the call it had; it is replaced. Workers die with the engine: they ignore Ctrl-C
(the engine stops them), ask the kernel to kill them when the engine's process dies
(``PR_SET_PDEATHSIG`` on Linux) and exit when their pipe closes.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from ..processes import available_cpus

log = logging.getLogger(__name__)

ClientCallable = Callable[[Message, Context], Message]
BatchTrain = Callable[[list[Message], list[Context]], list[Message] | None]

#: What one task asks a worker: ("call" | "batch", messages, contexts).
Task = tuple[str, list[Message], list[Context]]
#: What a worker answers: one (reply or None, node state) per message of the task.
Result = list[tuple[Message | None, RecordDict]]


def call_client(app: ClientCallable, msg: Message, context: Context) -> Message:
    """The ClientApp's reply; a raise becomes an error reply, as Flower's runtime makes it."""
    try:
        return app(msg, context)
    except Exception as exc:  # noqa: BLE001 - Flower's runtime turns any raise into an Error
        reason = f"{type(exc).__name__}: {exc}"
        log.warning("ClientApp on node %d raised %s", context.node_id, reason)
        log.debug("%s", traceback.format_exc())
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)


def run_task(app: ClientCallable, batch_train: BatchTrain | None, task: Task) -> Result:
    """Carry out one task in this process (a worker's loop body; also its in-process twin)."""
    kind, messages, contexts = task
    replies: list[Message] | None = None
    if kind == "batch" and batch_train is not None:
        try:
            replies = batch_train(messages, contexts)
        except Exception as exc:  # noqa: BLE001 - the per-node path reports per-node errors
            log.warning("batched training failed (%s: %s); calling the ClientApp per node",
                        type(exc).__name__, exc)  # fmt: skip
    if replies is None:
        replies = [call_client(app, m, c) for m, c in zip(messages, contexts, strict=True)]
    return [(r, c.state) for r, c in zip(replies, contexts, strict=True)]


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def _worker_main(
    conn: Connection, app: ClientCallable, batch_train: BatchTrain | None, parent: int
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the engine, which stops us
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the request above took effect
        os._exit(0)
    torch.set_num_threads(1)  # see the module docstring: a forked child cannot start a team
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            break
        if task is None:
            break
        if task[0] == "function":
            conn.send(_run_function(task[1], task[2]))
            continue
        conn.send(run_task(app, batch_train, task))
    conn.close()


def _run_function(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bool, Any]:
    """``(True, fn(*args))``, or ``(False, reason)`` when it raised (:meth:`WorkerPool.map`)."""
    try:
        return True, fn(*args)
    except Exception as exc:  # noqa: BLE001 - the caller computes it itself instead
        return False, f"{type(exc).__name__}: {exc}"


@dataclass
class _Worker:
    process: Any  # multiprocessing.Process (fork context)
    conn: Connection
    job: int | None = None  # index of the task it runs, None when free
    started: float = 0.0  # time.monotonic() when the task was sent
    nodes: list[int] = field(default_factory=list)  # nodes of that task

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def alive(self) -> bool:
        return bool(self.process.is_alive())


class WorkerPool:
    """Persistent worker processes that run ClientApp calls (and batched training).

    Parameters
    ----------
    client_app : callable
        The ClientApp (any ``(message, context) -> Message``); inherited by fork.
    size : int
        Worker processes (>= 1).
    batch_train : callable, optional
        Trains several train instructions at once (the vectorised path), in a worker.

    Use as a context manager, or call :meth:`close`: every worker, set aside ones included,
    is stopped and reaped.
    """

    def __init__(
        self, client_app: ClientCallable, size: int, batch_train: BatchTrain | None = None
    ) -> None:
        if size < 1:
            raise ValueError(f"a worker pool needs at least one worker, got {size}")
        self.client_app, self.size, self.batch_train = client_app, size, batch_train
        self._ctx = mp.get_context("fork")
        self._free: list[_Worker] = []
        self._late: list[_Worker] = []  # set aside past a deadline: finishing a call, then exit
        self.replaced = 0  # workers replaced after dying

    # -- life cycle ----------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, self.client_app, self.batch_train, os.getpid()),
            name="fedmerge-worker",
            daemon=True,
        )
        process.start()
        child_conn.close()
        return _Worker(process, parent_conn)

    def start(self) -> None:
        """Fork the workers now (otherwise at the first :meth:`run`)."""
        while len(self._free) < self.size:
            self._free.append(self._spawn())

    def pids(self) -> list[int]:
        """Process ids of every worker this pool holds (set aside ones included)."""
        return [w.pid for w in self._free + self._late]

    def busy_nodes(self) -> set[int]:
        """Nodes whose call outlived its deadline and still runs in a set-aside worker."""
        self._reap_late()
        return {n for w in self._late for n in w.nodes}

    def close(self) -> None:
        """Stop every worker (a call still running is killed) and reap it."""
        workers, self._free, self._late = self._free + self._late, [], []
        for w in workers:
            with contextlib.suppress(OSError, ValueError):
                if w.job is None:
                    w.conn.send(None)
        deadline = time.monotonic() + 2.0
        for w in workers:
            if w.job is None:
                w.process.join(max(0.0, deadline - time.monotonic()))
            if w.alive():
                w.process.kill()
            w.process.join(5.0)
            w.conn.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reap_late(self) -> None:
        """Let go of set-aside workers whose late call has ended (their reply is discarded)."""
        keep = []
        for w in self._late:
            done = not w.alive()
            if not done and w.conn.poll():
                with contextlib.suppress(EOFError, OSError):
                    w.conn.recv()
                done = True
            if done:
                with contextlib.suppress(OSError, ValueError):
                    w.conn.send(None)
                w.process.join(2.0)
                if w.alive():
                    w.process.kill()
                    w.process.join(5.0)
                w.conn.close()
            else:
                keep.append(w)
        self._late = keep

    # -- the server's work between rounds --------------------------------------------------
    def map(self, fn: Callable[..., Any], args: Sequence[tuple[Any, ...]]) -> list[Any] | None:
        """``[fn(*a) for a in args]``, each on its own free worker at once (the server's work
        while no client trains, e.g. its evaluation split into shares); None when there are
        fewer free workers than ``args``, or a worker failed or died (the caller then does it
        itself). ``fn`` and ``args`` are pickled: a top-level function and plain data."""
        self.start()
        if len(args) > len(self._free):
            return None
        workers = self._free[: len(args)]
        results: list[Any] = [None] * len(args)
        failed = False
        try:
            for worker, a in zip(workers, args, strict=True):
                worker.conn.send(("function", fn, a))
        except Exception as exc:  # noqa: BLE001 - unpicklable work, or a dead worker
            log.warning("worker pool: cannot send %s (%s); computing it here", fn.__name__, exc)
            failed = True
            sent = workers[: workers.index(worker)]
        else:
            sent = workers
        for i, worker in enumerate(sent):
            try:
                ok, value = worker.conn.recv()
            except (EOFError, OSError):
                self._free.remove(worker)
                self._lost(worker, running=None)
                failed = True
                continue
            if not ok:
                log.warning("worker pool: %s raised %s; computing it here", fn.__name__, value)
                failed = True
            results[i] = value
        return None if failed else results

    # -- running a round -----------------------------------------------------------------
    def run(self, tasks: Sequence[Task], timeout: float | None) -> list[Result | None]:
        """Run ``tasks`` on the workers; each task's result, or None when it gave none.

        ``timeout``: seconds each task may run from the moment a worker starts it (None: no
        limit). Tasks start in order as workers become free.
        """
        self.start()
        results: list[Result | None] = [None] * len(tasks)
        queue = deque(range(len(tasks)))
        running: list[_Worker] = []
        while queue or running:
            while queue and self._free:
                index = queue.popleft()
                worker = self._free.pop(0)
                worker.job, worker.started = index, time.monotonic()
                worker.nodes = [int(m.metadata.dst_node_id) for m in tasks[index][1]]
                try:
                    worker.conn.send(tasks[index])
                except (OSError, ValueError):  # died while idle: replace it, retry the task
                    self._lost(worker, running=None)
                    queue.appendleft(index)
                    continue
                running.append(worker)
            if not running:
                continue
            wait_s = None
            if timeout is not None:
                wait_s = max(0.0, min(w.started for w in running) + timeout - time.monotonic())
            ready = wait([w.conn for w in running] + [w.process.sentinel for w in running], wait_s)
            for worker in list(running):
                if worker.conn in ready or worker.process.sentinel in ready:
                    self._collect(worker, running, results)
            if timeout is not None:
                now = time.monotonic()
                for worker in [w for w in running if now - w.started >= timeout]:
                    self._set_aside(worker, running, timeout)
        return results

    def _collect(
        self, worker: _Worker, running: list[_Worker], results: list[Result | None]
    ) -> None:
        try:
            if not worker.conn.poll():
                raise EOFError
            result = worker.conn.recv()
        except (EOFError, OSError):  # the process died mid-call: no reply, a new worker
            self._lost(worker, running)
            return
        index = worker.job
        assert index is not None  # a running worker has a job
        running.remove(worker)
        worker.job, worker.nodes = None, []
        self._free.append(worker)
        results[index] = result

    def _lost(self, worker: _Worker, running: list[_Worker] | None) -> None:
        code = worker.process.exitcode
        log.warning("worker %d died (exit code %s) with nodes %s: no reply; replacing it",
                    worker.pid, code, worker.nodes)  # fmt: skip
        if running is not None:
            running.remove(worker)
        with contextlib.suppress(OSError):
            worker.conn.close()
        worker.process.join(5.0)
        self.replaced += 1
        self._free.append(self._spawn())

    def _set_aside(self, worker: _Worker, running: list[_Worker], timeout: float) -> None:
        log.warning("nodes %s did not reply within %.3g s: no reply", worker.nodes, timeout)
        running.remove(worker)
        self._late.append(worker)
        self._free.append(self._spawn())


@contextlib.contextmanager
def worker_pool(
    client_app: ClientCallable, size: int, batch_train: BatchTrain | None = None
) -> Iterator[WorkerPool | None]:
    """A :class:`WorkerPool` of ``size`` workers, or None when ``size`` is 1 (in-process)."""
    if size <= 1:
        yield None
        return
    pool = WorkerPool(client_app, size, batch_train)
    try:
        yield pool
    finally:
        pool.close()


def resolve_workers(requested: int, clients_per_round: int, device: str) -> int:
    """The worker processes a run uses: ``requested``, or for 0 one per CPU core.

    Never more than a round's clients (an idle worker costs memory, not time); one on a GPU
    (a process forked after CUDA is initialised cannot use it). Raises ``ConfigError`` for
    several workers on a GPU.
    """
    from ..errors import ConfigError

    accelerator = device not in ("cpu",)
    if requested == 0:
        return 1 if accelerator else max(1, min(available_cpus(), clients_per_round))
    if requested > 1 and accelerator:
        raise ConfigError(
            "workers",
            requested,
            "0 or 1 when training on a GPU",
            f"device {device}: worker processes are forked, and a process forked after CUDA "
            "is initialised cannot use it",
        )
    return requested
