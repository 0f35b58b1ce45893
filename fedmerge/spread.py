"""The server's work between rounds, spread over the local engine's idle worker processes.

Under the local engine with ``workers`` >= 2, a round's clients train in worker processes
(:mod:`fedmerge.engine.workers`); once they have replied, those processes idle while the
server evaluates the global model and merges the client models on one thread. Work that splits
into independent shares can run there instead, one share a worker, all at once:

- the central evaluation (the ServerApp hands the pool to its evaluation directly);
- the activation reading of data-based matching (each share of the client models read and
  correlated with the reference in its own worker;
  :func:`fedmerge.merging.activation_similarities_of`).

A strategy's merge reaches the pool through :func:`spreading`, a context the strategy runs its
merge in (:meth:`strategies.base.MergeStrategy.merge_resources`), so that the merge functions
keep their signatures and a merge called outside any strategy runs in its own process as
before. Results do not depend on it: each share is computed by the same code on one thread, as
the server's merge runs by default (``merge-threads = 1``), and the shares are put back in
order.

Kept free of torch so that light commands can import it.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, Protocol


class SharePool(Protocol):
    """What spreading needs of a pool of worker processes
    (:class:`fedmerge.engine.workers.WorkerPool` has it)."""

    size: int

    def map(self, fn: Callable[..., Any], args: Sequence[tuple[Any, ...]]) -> list[Any] | None:
        """``[fn(*a) for a in args]``, one argument tuple a worker at once; None when it could
        not (too few free workers, a worker failed): the caller then computes it itself."""
        ...


_POOL: ContextVar[SharePool | None] = ContextVar("fedmerge_share_pool", default=None)


@contextlib.contextmanager
def spreading(pool: SharePool | None) -> Iterator[None]:
    """Inside, :func:`share_pool` is ``pool`` (None: work stays in this process)."""
    token = _POOL.set(pool)
    try:
        yield
    finally:
        _POOL.reset(token)


def share_pool() -> SharePool | None:
    """The pool that divisible work may use now, when it has at least two workers."""
    pool = _POOL.get()
    return pool if pool is not None and pool.size >= 2 else None


def shares(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into ``min(parts, n)`` contiguous, near-equal, non-empty ranges (one
    empty range when ``n`` is 0)."""
    parts = max(1, min(parts, n))
    bounds = [n * k // parts for k in range(parts + 1)]
    return [range(a, b) for a, b in itertools.pairwise(bounds)]
