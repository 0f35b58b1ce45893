"""Training throughput of fedmerge's engines against a bare PyTorch loop.

    python -m fedmerge.bench.throughput [--dataset fashion-mnist] [--data-root ../shared/data]
        [--clients 10] [--batch-size 64] [--rounds 3] [--local-epochs 1]
        [--partition dirichlet] [--max-train-samples 0]
        [--engines local,local-workers,flower] [--workers N] [--repeats 1] [--threads N]
        [--device auto] [--cpus-per-client C] [--json OUT.json]

Acceptance targets: the local engine with one in-process worker reaches at least 0.95x the
samples/s of the bare loop in one process; with ``--workers`` worker processes, at least 0.9x
the bare loop spread over as many processes (``bare-processes``,
:mod:`fedmerge.bench.throughput.bare_processes`).

What is measured
----------------
Every variant does the same work per round: each client trains ``local-epochs`` passes of
SGD (lr 0.01, momentum 0.9, weight decay 1e-5, batch 64) over its shard, starting from the
same global weights, and the results are averaged weighted by shard size (FedAvg). The shards
are those fedmerge's engines use (:func:`fedmerge.federation.client_shard`, looked up before
any timing), and the model is the same seeded CNN.

``bare``
    The loop a PyTorch user would write, with no fedmerge code in the timed part: one model
    object; per client ``load_state_dict(global)``, a new ``torch.optim.SGD``, per epoch
    ``torch.randperm`` and slices of it as index batches into the in-memory shard, forward,
    ``cross_entropy``, backward, step; a copy of the state dict; after the last client, a
    plain weighted average of the state dicts (timed, and reported on its own).

``bare-processes`` (with ``local-workers``)
    The bare loop in ``--workers`` forked processes of one thread each, client ``i`` on
    process ``i mod P``, the parent averaging: see :mod:`fedmerge.bench.throughput.bare_processes`.

``local-workers``
    As ``local`` below with ``workers = P`` (one torch thread each). The clients' loop seconds
    overlap, so no overhead is reported.

``local``
    :func:`fedmerge.runner.run` with engine ``local``, ``workers = 1`` and
    ``client-threads = 0`` (torch's thread setting, as the bare loop): Flower's real
    ServerApp (FedAvg) and ClientApp in one process. Timed by the ServerApp's own
    ``round-time`` in metrics.json: the wall time between the end of one centralized
    evaluation and the start of the next, i.e. the whole round without evaluation
    (instructions, state-dict <-> ArrayRecord conversions, model loading, client training,
    aggregation).

``flower``
    The same run with engine ``flower`` (``flwr run``, Ray). Reported: start-up seconds (from
    the call until the ServerApp's round-0 line arrives, which includes start-up and the
    initial evaluation; Flower streams the log in batches, so this is good to about a
    second), and the same per-round figures from metrics.json.

Figures (rounds 1..R; round 0 and every centralized evaluation excluded, since the bare loop
evaluates nothing):

* ``samples/s`` = training samples processed (shard sizes x local epochs, summed over clients
  and rounds) / total round seconds. This end-to-end figure is the one compared with bare
  (``ratio``): both include their aggregation.
* ``s/round`` = mean seconds per round; ``s/round 2..R`` the same without round 1, which
  carries one-time costs (the ClientApp builds its model; Flower starts its Ray actors).
* ``train s/round`` = per round, the sum over clients of the seconds spent in the epoch loops
  themselves (batches, forward, backward, step), and ``loop samples/s`` the throughput of
  those loops alone.
* ``overhead s/round`` = ``s/round - train s/round``: the per-round fixed cost around the
  training loops. For bare that is loading the global weights, building the optimisers,
  copying the state dicts and averaging them. For local it adds Flower's messages, the
  ArrayRecord conversions, the ClientApp's set-up and Flower's FedAvg aggregation.

How each engine's training-loop seconds are obtained (the method of the overhead figure):

* bare: timed around the epoch loops directly (``perf_counter``; CUDA synchronised).
* local: exact. metrics.json holds only the clients' *weighted mean* ``train-time``, from
  which the sum cannot be recovered, so the benchmark records each client's own
  ``TrainResult.seconds`` (the number the ClientApp reports as ``train-time``: the wall time
  of :func:`fedmerge.training.train`'s loop) by wrapping the ClientApp module's ``train``
  for the duration of the run. The library is not modified; the wrapper adds one list append
  per client call.
* flower: the clients run in other processes, so their seconds cannot be recorded. The sum
  is estimated from the weighted mean the ServerApp does record, assuming a client's loop
  time is proportional to its optimiser steps ``s_i`` (exact when every step costs the
  same): ``sum_i t_i = train-time * N * sum_i s_i / sum_i n_i s_i`` with ``n_i`` the shard
  sizes and ``N = sum_i n_i``. The same estimate is computed for the local engine and
  printed beside the exact figure as a check of the assumption. When Flower runs clients
  concurrently (``--cpus-per-client`` below the CPU count) the loop seconds overlap and no
  overhead is reported; the default gives each client every CPU, so clients run one at a
  time like the other two variants.

Fairness notes: data loading and partitioning happen before any timing for every variant
(the local engine finds the shards in the process's cache); the first construction of a
``torch.optim.SGD`` in a process imports TorchDynamo (about 7 s), so one is built before
timing; a few warm-up steps run before the first measured round; repeats alternate bare and
local and each figure is the median over ``--repeats``. The bare loop keeps no running loss
(fedmerge's loop sums it on the device), which errs in the bare loop's favour.

On a busy machine, pass ``--threads 1``: torch's intra-op threads wait for each other, and
with two threads on two cores that other processes also use, both loops slowed down about a
hundredfold in our checks, which swamps every difference this benchmark looks for.

Code layout: this module holds the command line and re-exports the benchmark's names;
:mod:`.workload` the settings, the shared federation, the warm-up and the figures
every variant reports; :mod:`.bare` the bare PyTorch loops (with
:mod:`.bare_processes`); :mod:`.engines` the engines' runs and the train-seconds
estimate; :mod:`.report` :func:`run_benchmark`, the report and its printing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ...errors import FedmergeError
from .bare import measure_bare, measure_bare_multi
from .engines import (
    estimate_total_train_seconds,
    flower_concurrency,
    measure_flower,
    measure_local,
    quiet_flower,
    record_client_train,
    steps_per_epoch,
)
from .report import machine_facts, render, run_benchmark
from .workload import (
    ENGINES,
    LR,
    MOMENTUM,
    TARGET_RATIO,
    TARGET_WORKERS_RATIO,
    WEIGHT_DECAY,
    BenchSettings,
    Federation,
    prepare_federation,
    warm_up,
)

__all__ = [
    "ENGINES",
    "LR",
    "MOMENTUM",
    "TARGET_RATIO",
    "TARGET_WORKERS_RATIO",
    "WEIGHT_DECAY",
    "BenchSettings",
    "Federation",
    "estimate_total_train_seconds",
    "flower_concurrency",
    "machine_facts",
    "main",
    "measure_bare",
    "measure_bare_multi",
    "measure_flower",
    "measure_local",
    "parse_args",
    "prepare_federation",
    "quiet_flower",
    "record_client_train",
    "render",
    "run_benchmark",
    "steps_per_epoch",
    "warm_up",
]


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchSettings, str | None]:
    """Command-line arguments to :class:`BenchSettings` and the ``--json`` path."""
    p = argparse.ArgumentParser(
        prog="python -m fedmerge.bench.throughput",
        description="Training throughput of fedmerge's engines against a bare PyTorch loop.",
    )
    d = BenchSettings()
    p.add_argument("--dataset", default=d.dataset)
    p.add_argument("--data-root", default=d.data_root)
    p.add_argument("--model", default=d.model)
    p.add_argument("--clients", type=int, default=d.clients)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--local-epochs", type=int, default=d.local_epochs)
    p.add_argument("--partition", default=d.partition)
    p.add_argument("--max-train-samples", type=int, default=d.max_train_samples)
    p.add_argument(
        "--engines",
        default=",".join(d.engines),
        help="comma-separated subset of local,local-workers,flower (bare PyTorch always "
        "runs; in as many processes as local-workers has workers when that runs)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help="processes of local-workers and of the bare multi-process loop (0 = one per CPU)",
    )
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (bare, local)")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--cpus-per-client",
        type=float,
        default=None,
        help="flower: CPUs per client (default: all, so clients run one at a time)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--output-dir", default=None, help="keep the runs' results here")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the report as JSON")
    args = p.parse_args(argv)
    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    settings = BenchSettings(
        dataset=args.dataset,
        data_root=args.data_root,
        model=args.model,
        clients=args.clients,
        batch_size=args.batch_size,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        partition=args.partition,
        max_train_samples=args.max_train_samples,
        engines=engines,
        workers=args.workers,
        repeats=args.repeats,
        threads=args.threads,
        device=args.device,
        cpus_per_client=args.cpus_per_client,
        seed=args.seed,
        output_dir=args.output_dir,
    )
    return settings, args.json


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m fedmerge.bench.throughput``."""
    import json

    try:
        settings, json_path = parse_args(argv)
        report = run_benchmark(settings, log=lambda line: print(line, flush=True))
    except FedmergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    render(report)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {json_path}")
    return 0
