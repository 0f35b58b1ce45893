"""Training throughput of fedmerge's engines against a bare PyTorch loop.

    python -m fedmerge.bench.throughput [--dataset fashion-mnist] [--data-root ../shared/data]
        [--clients 10] [--batch-size 64] [--rounds 3] [--local-epochs 1]
        [--partition dirichlet] [--max-train-samples 0]
        [--engines local,local-workers,flower] [--workers N] [--repeats 1] [--threads N]
        [--device auto] [--cpus-per-client C] [--json OUT.json]

Acceptance targets: the local engine with one in-process worker reaches at least 0.95x the
samples/s of the bare loop in one process; with ``--workers`` worker processes, at least 0.9x
the bare loop spread over as many processes (``bare-processes``,
:mod:`fedmerge.bench.bare_multi`).

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
    process ``i mod P``, the parent averaging: see :mod:`fedmerge.bench.bare_multi`.

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
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import RunConfig
from ..errors import FedmergeError
from ..federation import DataSpec, client_seed, client_shard, load_data, make_model
from ..processes import available_cpus
from ..results import read_metrics
from ..training import resolve_device
from .bare_multi import average, measure_bare_processes, train_clients

ENGINES = ("local", "local-workers", "flower")
#: local (one in-process worker) / bare single process; local-workers / bare processes.
TARGET_RATIO = 0.95
TARGET_WORKERS_RATIO = 0.9

# Hyper-parameters of the benchmark's local training (fixed: the acceptance criterion's).
LR = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-5


@dataclass(frozen=True)
class BenchSettings:
    """What the benchmark runs; every variant uses the same settings."""

    dataset: str = "fashion-mnist"
    data_root: str = "../shared/data"
    model: str = "cnn"
    clients: int = 10
    batch_size: int = 64
    rounds: int = 3
    local_epochs: int = 1
    partition: str = "dirichlet"
    max_train_samples: int = 0
    engines: tuple[str, ...] = ("local", "local-workers")
    workers: int = 0  # local-workers and the bare processes; 0 = one per CPU (<= clients)
    repeats: int = 1
    threads: int | None = None
    device: str = "auto"
    cpus_per_client: float | None = None  # flower; None = every CPU (clients one at a time)
    seed: int = 0
    output_dir: str | None = None  # runs' results folders; None = a temporary folder
    lr: float = LR
    momentum: float = MOMENTUM
    weight_decay: float = WEIGHT_DECAY

    def __post_init__(self) -> None:
        unknown = [e for e in self.engines if e not in ENGINES]
        if unknown:
            raise FedmergeError(
                f"engines: got {','.join(unknown)}; allowed: a comma-separated subset of "
                f"{','.join(ENGINES)}"
            )
        for name in ("clients", "rounds", "local_epochs", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise FedmergeError(f"{name.replace('_', '-')}: must be at least 1")
        if self.workers < 0:
            raise FedmergeError(f"workers: got {self.workers}; allowed: 0 (one per CPU) or more")

    @property
    def processes(self) -> int:
        """Processes of the multi-process variants (local-workers, bare processes)."""
        return max(1, min(self.workers or available_cpus(), self.clients))

    def run_config(self, output_dir: str | Path, run_name: str = "") -> RunConfig:
        """The fedmerge run-config of these settings (FedAvg, every client every round)."""
        return RunConfig.from_mapping(
            {
                "seed": self.seed,
                "num-rounds": self.rounds,
                "num-clients": self.clients,
                "strategy": "fedavg",
                "dataset": self.dataset,
                "data-root": str(Path(self.data_root).expanduser().resolve()),
                "max-train-samples": self.max_train_samples,
                "partition": self.partition,
                "model": self.model,
                "local-epochs": self.local_epochs,
                "batch-size": self.batch_size,
                "lr": self.lr,
                "momentum": self.momentum,
                "weight-decay": self.weight_decay,
                "device": self.device,
                "fraction-train": 1.0,
                "min-train-clients": min(2, self.clients),
                "output-dir": str(Path(output_dir).expanduser().resolve()),
                "run-name": run_name,
                "save-model": False,
            }
        )


# -- helpers ----------------------------------------------------------------------------
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
    client's time is proportional to its optimiser steps (see the module docstring)."""
    steps = [steps_per_epoch(n, batch_size) * epochs for n in sizes]
    total_n = sum(sizes)
    weighted_steps = sum(n * s for n, s in zip(sizes, steps, strict=True))
    return weighted_mean * total_n * sum(steps) / weighted_steps


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@contextlib.contextmanager
def quiet_flower() -> Iterator[None]:
    """Silence Flower's INFO log lines (as the fedmerge CLI does) for the duration."""
    from ..runner import quiet_flower as quiet

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
    from ..clients import client_app

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


# -- the federation the variants share ---------------------------------------------------
@dataclass
class Federation:
    """Shards, initial weights and per-round client seeds, computed before any timing."""

    cfg: RunConfig
    spec: DataSpec
    shards: list[tuple[torch.Tensor, torch.Tensor]]
    initial_state: dict[str, torch.Tensor]
    device: torch.device

    @property
    def sizes(self) -> list[int]:
        return [len(y) for _, y in self.shards]

    @property
    def samples_per_round(self) -> int:
        return sum(self.sizes) * self.cfg.local_epochs


def prepare_federation(settings: BenchSettings, output_dir: str | Path) -> Federation:
    """Load the data, the shards and the initial model exactly as the engines will."""
    cfg = settings.run_config(output_dir)
    spec = DataSpec.of(cfg)  # equal to the spec the engines' apps build from the run-config
    data = load_data(spec)
    shards = [client_shard(spec, i) for i in range(cfg.num_clients)]
    initial = make_model(cfg, data, seed=cfg.seed)
    state = {k: v.detach().clone() for k, v in initial.state_dict().items()}
    return Federation(cfg, spec, shards, state, resolve_device(cfg.device))


def warm_up(fed: Federation, steps: int = 5) -> None:
    """Untimed: import TorchDynamo and warm the kernels the measured loops use.

    The first ``torch.optim.SGD`` built in a process imports TorchDynamo (about 7 s on 2
    CPU cores); counted inside the first bare round, it would make the baseline look slow.
    """
    model = make_model(fed.cfg, load_data(fed.spec)).to(fed.device)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    x, y = fed.shards[0]
    x, y = x.to(fed.device), y.to(fed.device)
    bs = min(fed.cfg.batch_size, len(y))
    for step in range(steps):
        idx = torch.arange(step * bs, (step + 1) * bs) % len(y)
        idx = idx.to(fed.device)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    _sync(fed.device)()


# -- bare PyTorch ----------------------------------------------------------------------------
def measure_bare(fed: Federation) -> dict[str, Any]:
    """The bare PyTorch equivalent of ``rounds`` FedAvg rounds; timings in seconds."""
    cfg, device = fed.cfg, fed.device
    sync = _sync(device)
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

    return _figures(
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
    return _figures(
        "bare-processes",
        samples=fed.samples_per_round * cfg.num_rounds,
        round_seconds=timed["round_seconds"],
        train_seconds=None,
        extra={
            "processes": processes,
            "train_seconds_method": "not separable: processes train at once",
        },
    )


def _figures(
    engine: str,
    *,
    samples: int,
    round_seconds: Sequence[float],
    train_seconds: Sequence[float] | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    rounds = len(round_seconds)
    total = sum(round_seconds)
    out: dict[str, Any] = {
        "engine": engine,
        "rounds": rounds,
        "samples": samples,
        "samples_per_s": samples / total,
        "seconds_per_round": total / rounds,
        # Rounds 2..R: without first-round costs (Flower starts its Ray actors in round 1).
        "later_seconds_per_round": (total - round_seconds[0]) / (rounds - 1)
        if rounds > 1
        else None,
        "round_seconds": list(round_seconds),
        "train_seconds_per_round": None,
        "overhead_seconds_per_round": None,
        "loop_samples_per_s": None,
    }
    if train_seconds is not None:
        train_total = sum(train_seconds)
        out["train_seconds_per_round"] = train_total / rounds
        out["overhead_seconds_per_round"] = (total - train_total) / rounds
        out["loop_samples_per_s"] = samples / train_total
    out.update(extra or {})
    return out


# -- fedmerge engines ----------------------------------------------------------------------
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
    from ..runner import run

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
    return _figures(
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
    from ..runner import run

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
    return _figures(
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


# -- the whole benchmark -----------------------------------------------------------------
def machine_facts(device: torch.device) -> dict[str, Any]:
    """Versions and hardware the figures were taken on."""
    import flwr

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": getattr(flwr, "__version__", "unknown"),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpus_available": available_cpus(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "device": str(device),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over repeats of every numeric figure; the repeats themselves kept."""
    summary: dict[str, Any] = {}
    for key, value in runs[0].items():
        if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
            summary[key] = _median([r[key] for r in runs])
        elif key not in ("round_seconds", "results_dir"):
            summary[key] = value
    summary["repeats"] = runs
    return summary


def run_benchmark(
    settings: BenchSettings, log: Callable[[str], None] = lambda line: None
) -> dict[str, Any]:
    """Run every variant ``settings.repeats`` times; returns the report (medians).

    ``settings.threads`` sets torch's intra-op threads for the run (restored afterwards).
    """
    threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        if settings.threads:
            torch.set_num_threads(settings.threads)
            stack.callback(torch.set_num_threads, threads)
        out = settings.output_dir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="fedmerge-bench-")
        )
        fed = prepare_federation(settings, out)
        warm_up(fed)
        processes = settings.processes
        variants: list[tuple[str, Callable[[int], dict[str, Any]]]] = [
            ("bare", lambda rep: measure_bare(fed))
        ]
        if "local" in settings.engines:
            variants.append(("local", lambda rep: measure_local(fed, f"bench-local-{rep}")))
        if "local-workers" in settings.engines:
            variants.append(("bare-processes", lambda rep: measure_bare_multi(fed, processes)))
            variants.append(
                (
                    "local-workers",
                    lambda rep: measure_local(fed, f"bench-workers-{rep}", processes),
                )
            )
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in variants}
        for rep in range(settings.repeats):  # variants alternate: drifts hit them alike
            for name, measure in variants:
                runs[name].append(measure(rep))
                log(_progress_line(name, rep, settings.repeats, runs[name][-1]))
        if "flower" in settings.engines:
            runs["flower"] = []
            for rep in range(settings.repeats):
                runs["flower"].append(measure_flower(fed, settings, f"bench-flower-{rep}"))
                log(_progress_line("flower", rep, settings.repeats, runs["flower"][-1]))
        results = {name: _summarise(r) for name, r in runs.items()}
        machine = machine_facts(fed.device)  # while --threads is in force
    bare = results["bare"]["samples_per_s"]
    ratios = {name: res["samples_per_s"] / bare for name, res in results.items()}
    report: dict[str, Any] = {
        "settings": {key: value for key, value in asdict(settings).items() if key != "output_dir"},
        "run_config": fed.cfg.to_mapping(),
        "shard_sizes": fed.sizes,
        "samples_per_round": fed.samples_per_round,
        "machine": machine,
        "results": results,
        "ratios": ratios,
        "target_ratio": TARGET_RATIO,
        "target_workers_ratio": TARGET_WORKERS_RATIO,
    }
    if "local" in ratios:
        report["local_meets_target"] = ratios["local"] >= TARGET_RATIO
    if "local-workers" in ratios:
        limit = results["bare-processes"]["samples_per_s"]
        report["workers_ratio"] = results["local-workers"]["samples_per_s"] / limit
        report["workers_meet_target"] = report["workers_ratio"] >= TARGET_WORKERS_RATIO
    return report


def _progress_line(engine: str, rep: int, repeats: int, res: dict[str, Any]) -> str:
    return (
        f"{engine:<14} repeat {rep + 1}/{repeats}: {res['samples_per_s']:,.0f} samples/s, "
        f"{res['seconds_per_round']:.3f} s/round"
    )


# -- output -------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(report: dict[str, Any]) -> None:
    """Print the settings, the machine and the table of figures."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = 130  # a file or a pipe: keep the table's headers whole
    s, m = report["settings"], report["machine"]
    console.print(
        f"settings: dataset {s['dataset']} ({report['samples_per_round'] // s['local_epochs']:,} "
        f"training samples), model {s['model']}, {s['clients']} clients ({s['partition']}), "
        f"batch {s['batch_size']}, {s['local_epochs']} local epoch(s), {s['rounds']} rounds, "
        f"SGD lr {s['lr']} momentum {s['momentum']} weight-decay {s['weight_decay']}, "
        f"max-train-samples {s['max_train_samples']}, median of {s['repeats']} repeat(s)"
    )
    console.print(
        f"machine: torch {m['torch']}, flwr {m['flwr']}, python {m['python']}, device "
        f"{m['device']} (cuda: {m['cuda']}), torch threads {m['torch_threads']}, "
        f"{m['cpus_available']} of {m['cpu_count']} CPUs, {m['platform']}"
    )
    table = Table(title="training throughput (rounds 1..R, centralized evaluation excluded)")
    for col in (
        "engine",
        "samples/s",
        "x bare",
        "s/round",
        "s/round 2..R",
        "train s/round",
        "overhead s/round",
        "loop samples/s",
        "start-up s",
    ):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for name, res in report["results"].items():
        table.add_row(
            name,
            f"{res['samples_per_s']:,.0f}",
            f"{report['ratios'][name]:.3f}",
            f"{res['seconds_per_round']:.3f}",
            _fmt(res["later_seconds_per_round"], ".3f"),
            _fmt(res["train_seconds_per_round"], ".3f"),
            _fmt(res["overhead_seconds_per_round"], ".3f"),
            _fmt(res["loop_samples_per_s"], ",.0f"),
            _fmt(res.get("startup_seconds"), ".2f"),
        )
    console.print(table)
    bare = report["results"]["bare"]
    console.print(
        f"bare overhead = load weights + optimisers + state-dict copies + averaging "
        f"(averaging alone {bare['averaging_seconds_per_round'] * 1e3:.1f} ms/round)."
    )
    if "local" in report["results"]:
        loc = report["results"]["local"]
        console.print(
            f"local overhead = round-time - sum of the clients' recorded loop seconds; the "
            f"steps-proportional estimate used for flower gives "
            f"{loc['estimated_train_seconds_per_round']:.3f} train s/round here "
            f"(recorded {loc['train_seconds_per_round']:.3f})."
        )
        verdict = "meets" if report["local_meets_target"] else "MISSES"
        console.print(
            f"local engine (workers=1) / bare PyTorch = {report['ratios']['local']:.3f} "
            f"({verdict} the target >= {report['target_ratio']})"
        )
    if "local-workers" in report["results"]:
        procs = report["results"]["bare-processes"]["processes"]
        verdict = "meets" if report["workers_meet_target"] else "MISSES"
        console.print(
            f"local engine (workers={procs}) / bare PyTorch in {procs} processes = "
            f"{report['workers_ratio']:.3f} ({verdict} the target >= "
            f"{report['target_workers_ratio']}); x bare single process = "
            f"{report['ratios']['local-workers']:.3f}"
        )
    if "flower" in report["results"]:
        fl = report["results"]["flower"]
        console.print(
            f"flower: {fl['cpus_per_client']:g} CPUs per client, {fl['concurrent_clients']} "
            f"client(s) at a time; start-up = call until the round-0 line reaches this "
            f"process (includes the initial evaluation; Flower streams logs in batches, so "
            f"to about a second); round 1 includes starting the Ray actors (see s/round "
            f"2..R); overhead {fl['train_seconds_method']}. Ray sets the clients' threads; "
            f"--threads does not apply to them."
        )


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


if __name__ == "__main__":
    sys.exit(main())
