"""The bare PyTorch reference of the throughput benchmark: the FedAvg rounds a PyTorch user
would write, in this process or spread over forked processes (:mod:`.bare_processes`).
"""

from __future__ import annotations

import time
from typing import Any

from ...config import RunConfig
from ...errors import FedmergeError
from ...federation import client_seed, load_data, make_model
from .bare_processes import average, measure_bare_processes, train_clients
from .workload import Federation, device_sync, figures


def measure_bare(fed: Federation) -> dict[str, Any]:
    """The bare PyTorch equivalent of ``rounds`` FedAvg rounds; timings in seconds."""
    cfg, device = fed.cfg, fed.device
    sync = device_sync(device)
    # Everything below the `-- timed --` line is plain PyTorch; these lookups are not timed.
    shards = [(x.to(device), y.to(device)) for x, y in fed.shards]
    sizes = fed.sizes
    seeds = _seeds(cfg)
    model = make_model(cfg, load_data(fed.spec)).to(device)
    global_state = {k: v.to(device) for k, v in fed.initial_state.items()}
    sync()

    # -- timed --
    round_seconds, train_seconds, avg_seconds = [], [], []
    for r in range(cfg.num_rounds):
        round_start = time.perf_counter()
        states, loop = train_clients(model, global_state, shards, seeds[r], sync=sync, **_sgd(cfg))
        avg_start = time.perf_counter()
        global_state = average(states, sizes, global_state)
        sync()
        end = time.perf_counter()
        round_seconds.append(end - round_start)
        train_seconds.append(loop)
        avg_seconds.append(end - avg_start)
    # -- end of timed part --

    return figures(
        "bare",
        samples=fed.samples_per_round * cfg.num_rounds,
        round_seconds=round_seconds,
        train_seconds=train_seconds,
        extra={
            "averaging_seconds_per_round": sum(avg_seconds) / len(avg_seconds),
            "train_seconds_method": "timed around the epoch loops",
        },
    )


def _seeds(cfg: RunConfig) -> list[list[int]]:
    """Per round, each client's seed (the ClientApp's own)."""
    return [
        [client_seed(cfg.seed, pid, r) for pid in range(cfg.num_clients)]
        for r in range(1, cfg.num_rounds + 1)
    ]


def _sgd(cfg: RunConfig) -> dict[str, Any]:
    return {
        "epochs": cfg.local_epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "momentum": cfg.momentum,
        "weight_decay": cfg.weight_decay,
    }


def measure_bare_multi(fed: Federation, processes: int) -> dict[str, Any]:
    """The bare loop with the clients spread over ``processes`` forked processes (CPU)."""
    if fed.device.type != "cpu":
        raise FedmergeError("the multi-process bare loop runs on the CPU only (device cpu)")
    cfg = fed.cfg
    model = make_model(cfg, load_data(fed.spec))
    timed = measure_bare_processes(
        model, fed.initial_state, fed.shards, _seeds(cfg), processes, **_sgd(cfg)
    )
    return figures(
        "bare-processes",
        samples=fed.samples_per_round * cfg.num_rounds,
        round_seconds=timed["round_seconds"],
        train_seconds=None,
        extra={
            "processes": processes,
            "train_seconds_method": "not separable: processes train at once",
        },
    )
