"""The bare PyTorch loop of the throughput benchmark, in several processes at once.

What a PyTorch user would write to use every core for FedAvg without a framework: ``P``
persistent processes forked once, each with one intra-op thread, each training a fixed share
of the clients (client ``i`` on process ``i mod P``) every round; the parent sends the global
weights, gathers the trained state dicts and averages them. It is the practical limit of
this work on the machine (the figure the local engine's worker processes are held to): no
Flower messages, no ClientApp, only the pipes that carry the weights.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

StateDict = dict[str, torch.Tensor]  # its own: the bare baseline imports nothing of fedmerge


def train_clients(
    model: nn.Module,
    global_state: StateDict,
    shards: Sequence[tuple[torch.Tensor, torch.Tensor]],
    seeds: Sequence[int],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    sync: Callable[[], None] = lambda: None,
) -> tuple[list[StateDict], float]:
    """Train each shard from ``global_state`` with ``torch.optim.SGD``; (states, loop seconds).

    ``sync`` waits for the device (CUDA) before a loop's time is taken.
    """
    loop, states = 0.0, []
    for (x, y), seed in zip(shards, seeds, strict=True):
        model.load_state_dict(global_state)
        model.train()
        opt = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
        )
        gen = torch.Generator().manual_seed(seed)
        n = len(y)
        start = time.perf_counter()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, batch_size):
                idx = perm[i : i + batch_size].to(x.device)
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        sync()
        loop += time.perf_counter() - start
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states, loop


def average(states: Sequence[StateDict], sizes: Sequence[int], reference: StateDict) -> StateDict:
    """FedAvg of ``states`` weighted by ``sizes``; integer buffers taken from the first.

    The bare baseline's own (not :func:`fedmerge.merging.average`): it is what a user would
    write without fedmerge, and the baseline imports nothing of fedmerge by design."""
    total = sum(sizes)
    out = {}
    for key, ref in reference.items():
        if ref.is_floating_point():
            acc = torch.zeros_like(ref)
            for state, n in zip(states, sizes, strict=True):
                acc += state[key] * (n / total)
            out[key] = acc
        else:
            out[key] = states[0][key].clone()
    return out


def _process_main(conn: Connection, model: nn.Module, shards: list, options: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)  # a forked child cannot start an OpenMP team (see workers.py)
    while (job := conn.recv()) is not None:
        global_state, seeds = job
        conn.send(train_clients(model, global_state, shards, seeds, **options))
    conn.close()


def measure_bare_processes(
    model: nn.Module,
    initial_state: StateDict,
    shards: Sequence[tuple[torch.Tensor, torch.Tensor]],
    seeds_per_round: Sequence[Sequence[int]],
    processes: int,
    **options: Any,
) -> dict[str, Any]:
    """Rounds of FedAvg with the clients spread over ``processes`` forked processes.

    Returns per-round wall seconds and the loop seconds of the slowest process per round.
    """
    ctx = mp.get_context("fork")
    shares = [list(range(p, len(shards), processes)) for p in range(processes)]
    conns, procs = [], []
    for share in shares:
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_process_main,
            args=(child, model, [shards[i] for i in share], options),
            daemon=True,
        )
        proc.start()
        child.close()
        conns.append(parent)
        procs.append(proc)
    sizes = [len(y) for _, y in shards]
    global_state = {k: v.clone() for k, v in initial_state.items()}
    round_seconds, loop_seconds = [], []
    try:
        for seeds in seeds_per_round:
            start = time.perf_counter()
            for conn, share in zip(conns, shares, strict=True):
                conn.send((global_state, [seeds[i] for i in share]))
            states: list[StateDict | None] = [None] * len(shards)
            slowest = 0.0
            for conn, share in zip(conns, shares, strict=True):
                got, loop = conn.recv()
                slowest = max(slowest, loop)
                for i, state in zip(share, got, strict=True):
                    states[i] = state
            global_state = average([s for s in states if s is not None], sizes, global_state)
            round_seconds.append(time.perf_counter() - start)
            loop_seconds.append(slowest)
    finally:
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in procs:
            proc.join(5)
            if proc.is_alive() and proc.pid is not None:  # alive: started, so it has a pid
                os.kill(proc.pid, signal.SIGKILL)
                proc.join()
    return {"round_seconds": round_seconds, "slowest_loop_seconds": loop_seconds}
