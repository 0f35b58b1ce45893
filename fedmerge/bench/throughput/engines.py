"""The throughput benchmark's measurements of fedmerge's engines (local, local with worker
processes, flower), from their metrics.json and the clients' recorded loop seconds.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ...errors import FedmergeError
from ...processes import available_cpus
from ...results import read_metrics
from .workload import BenchSettings, Federation, figures


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimiser steps :func:`fedmerge.training.train` takes per epoch on ``n`` samples
    (a final batch of one sample is folded into the previous one)."""
    steps = math.ceil(n / batch_size)
    if steps > 1 and n % batch_size == 1:
        steps -= 1
    return steps


def estimate_total_train_seconds(
    weighted_mean: float, sizes: Sequence[int], batch_size: int, epochs: int
) -> float:
    """Sum of the clients' loop seconds from their example-weighted mean, assuming each
    client's time is proportional to its optimiser steps (see :mod:`fedmerge.bench.throughput`)."""
    steps = [steps_per_epoch(n, batch_size) * epochs for n in sizes]
    total_n = sum(sizes)
    weighted_steps = sum(n * s for n, s in zip(sizes, steps, strict=True))
    return weighted_mean * total_n * sum(steps) / weighted_steps


@contextlib.contextmanager
def quiet_flower() -> Iterator[None]:
    """Silence Flower's INFO log lines (as the fedmerge CLI does) for the duration."""
    from ...runner import quiet_flower as quiet

    level, propagate = quiet()
    flwr_log = logging.getLogger("flwr")
    try:
        yield
    finally:
        flwr_log.setLevel(level)
        flwr_log.propagate = propagate


@contextlib.contextmanager
def record_client_train() -> Iterator[list[Any]]:
    """Record every :class:`fedmerge.training.TrainResult` the (in-process) ClientApp gets.

    Wraps the ``train`` name the ClientApp module calls; restored on exit.
    """
    from ...clients import client_app

    original = client_app.train
    results: list[Any] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        results.append(result)
        return result

    client_app.train = recording
    try:
        yield results
    finally:
        client_app.train = original


def _round_rows(rows: Sequence[dict[str, Any]], fed: Federation) -> list[dict[str, Any]]:
    trained = [r for r in rows if int(r["round"]) >= 1]
    if len(trained) != fed.cfg.num_rounds or any("round-time" not in r for r in trained):
        raise FedmergeError(
            f"metrics.json holds {len(trained)} timed rounds, not {fed.cfg.num_rounds}"
        )
    for row in trained:
        if int(row.get("num-clients", -1)) != fed.cfg.num_clients:
            raise FedmergeError(
                f"round {row['round']}: {row.get('num-clients')} clients trained, "
                f"not {fed.cfg.num_clients}"
            )
        if int(row["num-examples"]) != sum(fed.sizes):
            raise FedmergeError(
                f"round {row['round']}: {row['num-examples']} training examples, the bare "
                f"loop trains on {sum(fed.sizes)}; the shards differ"
            )
    return trained


def _estimated_train_seconds(rows: Sequence[dict[str, Any]], fed: Federation) -> list[float]:
    return [
        estimate_total_train_seconds(
            float(r["train-time"]), fed.sizes, fed.cfg.batch_size, fed.cfg.local_epochs
        )
        for r in rows
    ]


def measure_local(fed: Federation, run_name: str, workers: int = 1) -> dict[str, Any]:
    """One run of the local engine; figures from its metrics.json (and recorded client times).

    ``workers`` = 1: clients in this process with torch's current thread count (as the bare
    loop); more: that many worker processes of one thread each.
    """
    from ...runner import run

    threads = 0 if workers == 1 else 1
    cfg = fed.cfg.replace(run_name=run_name, workers=workers, client_threads=threads)
    stamps: list[float] = []
    with quiet_flower(), record_client_train() as results:
        start = time.perf_counter()
        run_dir = run(cfg, "local", on_round=lambda row: stamps.append(time.perf_counter()))
        wall = time.perf_counter() - start
    rows = _round_rows(read_metrics(run_dir), fed)
    c = cfg.num_clients
    estimate = _estimated_train_seconds(rows, fed)
    extra: dict[str, Any] = {
        "startup_seconds": stamps[0] - start if stamps else None,
        "wall_seconds": wall,
        "workers": workers,
        "results_dir": str(run_dir),
    }
    exact = None
    if workers == 1:
        if len(results) != c * cfg.num_rounds:
            raise FedmergeError(
                f"recorded {len(results)} client trainings, not {c * cfg.num_rounds}"
            )
        exact = [sum(res.seconds for res in results[i * c : (i + 1) * c]) for i in range(len(rows))]
        extra["train_seconds_method"] = "exact: each client's TrainResult.seconds, recorded"
        extra["estimated_train_seconds_per_round"] = sum(estimate) / len(estimate)
    else:
        extra["train_seconds_method"] = "not separable: workers train at once"
    return figures(
        "local" if workers == 1 else "local-workers",
        samples=fed.samples_per_round * cfg.num_rounds,
        round_seconds=[float(r["round-time"]) for r in rows],
        train_seconds=exact,
        extra=extra,
    )


def flower_concurrency(settings: BenchSettings) -> tuple[float, int]:
    """CPUs per Flower client and how many clients Ray can run at once with them."""
    cpus = available_cpus()
    per_client = settings.cpus_per_client or float(cpus)
    return per_client, max(1, min(settings.clients, int(cpus // per_client)))


def measure_flower(fed: Federation, settings: BenchSettings, run_name: str) -> dict[str, Any]:
    """One run of the flower engine (``flwr run``, Ray)."""
    from ...runner import run

    cfg = fed.cfg.replace(run_name=run_name)
    per_client, concurrent = flower_concurrency(settings)
    stamps: list[float] = []
    start = time.perf_counter()
    run_dir = run(
        cfg,
        "flower",
        on_round=lambda row: stamps.append(time.perf_counter()),
        flower_options={"cpus_per_client": per_client},
    )
    wall = time.perf_counter() - start
    rows = _round_rows(read_metrics(run_dir), fed)
    estimate = _estimated_train_seconds(rows, fed) if concurrent == 1 else None
    return figures(
        "flower",
        samples=fed.samples_per_round * cfg.num_rounds,
        round_seconds=[float(r["round-time"]) for r in rows],
        train_seconds=estimate,
        extra={
            "startup_seconds": stamps[0] - start if stamps else None,
            "wall_seconds": wall,
            "cpus_per_client": per_client,
            "concurrent_clients": concurrent,
            "train_seconds_method": (
                "estimated from the weighted-mean train-time (loop time proportional to steps)"
                if concurrent == 1
                else "not separable: clients ran concurrently"
            ),
            "results_dir": str(run_dir),
        },
    )
