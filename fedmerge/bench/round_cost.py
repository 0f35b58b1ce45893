"""How the cost of a federated round grows with the clients, the model and the strategy.

    python -m fedmerge.bench.round_cost [--quick] [--data-root DIR] [--dataset fashion-mnist]
        [--clients 10,100,1000] [--models mlp,cnn,resnet20,vgg9] [--model cnn]
        [--strategies all] [--strategy-clients 10,100] [--per-client 32] [--batch-size 32]
        [--rounds 3] [--threads 1] [--png scaling.png] [--json OUT.json]

Three sweeps of local-engine runs (Flower's real ServerApp and ClientApp in one process,
clients one after another), IID partitions, one local epoch:

* clients: ``--model`` with FedAvg, for each number of clients in ``--clients``;
* models: each of ``--models`` with FedAvg and the first number of clients;
* strategies: every registered strategy (or ``--strategies``) with ``--model``, for each
  number of clients in ``--strategy-clients``.

Fixed per-client size: every client holds ``--per-client`` samples (a stratified subset of
``per-client x clients`` samples of the training split, split IID), so 10 times the clients
train on 10 times the data; with the defaults (32 samples, batch 32) each client takes one SGD
step per round: many small clients, the cross-device regime.

Figures, per round (mean over rounds 2..R: round 1 carries one-time costs such as building
the ClientApp's model and importing TorchDynamo with the first optimiser):

* ``s/round``: the ServerApp's ``round-time``, the wall time from the end of one centralized
  evaluation to the start of the next (instructions, client training, replies, aggregation);
* ``train s``: the clients' training loops, summed (``train-time`` x replies: the ServerApp
  records the example-weighted mean, the plain mean here since the shards are equal);
* ``other s``: the rest (Flower messages and record conversions, the ClientApp's set-up, the
  strategy's aggregation), and ``ms/client``, that rest per client.

The centralized test evaluation is replaced by a stub during these runs (its cost depends on
the test split and the model, not on the clients or the strategy, and for resnet20 it would
dominate the run); reported accuracies are therefore NaN.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import FedmergeError

DEFAULTS = {
    "clients": "10,100,1000",
    "models": "mlp,cnn,resnet20,vgg9",
    "strategy_clients": "10,100",
}
QUICK = {"clients": "10,100", "models": "mlp,cnn", "strategy_clients": "10"}


@dataclass(frozen=True)
class Point:
    """One measured setting."""

    model: str
    clients: int
    strategy: str


@dataclass(frozen=True)
class Measure:
    """Per-round costs of one setting (rounds 2..R)."""

    model: str
    clients: int
    strategy: str
    parameters: int
    seconds_per_round: float
    train_seconds: float
    other_seconds: float
    ms_per_client: float
    wall_seconds: float


@contextmanager
def no_central_evaluation() -> Iterator[None]:
    """Replace the ServerApp's centralized evaluation by a stub (see the module docstring)."""
    from ..strategies import server_app

    real = server_app.evaluate
    server_app.evaluate = lambda *args, **kwargs: (float("nan"), float("nan"))
    try:
        yield
    finally:
        server_app.evaluate = real


def _config(point: Point, settings: dict[str, Any], out: Path) -> RunConfig:
    return RunConfig.from_mapping(
        {
            "dataset": settings["dataset"],
            "data-root": settings["data_root"],
            "partition": "iid",
            "model": point.model,
            "num-clients": point.clients,
            "min-train-clients": min(2, point.clients),
            "max-train-samples": settings["per_client"] * point.clients,
            # A server proxy slice for every point: fedavg-ft and fednpmerge need one (their
            # server-side cost is part of what is measured); the others ignore it.
            "proxy-size": 500,
            "strategy": point.strategy,
            "num-rounds": settings["rounds"],
            "local-epochs": 1,
            "batch-size": settings["batch_size"],
            "lr": 0.01,
            "device": "cpu",
            "save-model": False,
            "output-dir": str(out),
            "run-name": f"{point.model}-{point.clients}-{point.strategy}",
        }
    )


def measure(point: Point, settings: dict[str, Any], out: Path) -> Measure:
    """Run one setting on the local engine (into ``out``) and read its per-round costs."""
    from ..federation import DataSpec, load_data, make_model
    from ..models import count_parameters
    from ..results import read_metrics
    from ..runner import run

    cfg = _config(point, settings, out)
    start = time.perf_counter()
    with no_central_evaluation():
        folder = run(cfg, "local")
    wall = time.perf_counter() - start
    rows = read_metrics(folder)[2:]  # round 0 (the initial model) and round 1 (warm-up) out
    per_round = statistics.fmean(r["round-time"] for r in rows)
    train = statistics.fmean(r["train-time"] * r["num-clients"] for r in rows)
    model = make_model(cfg, load_data(DataSpec.of(cfg)))
    return Measure(
        model=point.model,
        clients=point.clients,
        strategy=point.strategy,
        parameters=count_parameters(model),
        seconds_per_round=per_round,
        train_seconds=train,
        other_seconds=per_round - train,
        ms_per_client=1000 * (per_round - train) / point.clients,
        wall_seconds=wall,
    )


def sweeps(
    clients: list[int], models: list[str], model: str, strategies: list[str], s_clients: list[int]
) -> dict[str, list[Point]]:
    """The points of the three sweeps (a point shared by two sweeps is measured once)."""
    return {
        "clients": [Point(model, n, "fedavg") for n in clients],
        "models": [Point(m, clients[0], "fedavg") for m in models],
        "strategies": [Point(model, n, s) for n in s_clients for s in strategies],
    }


def run_sweeps(points: dict[str, list[Point]], settings: dict[str, Any]) -> dict[Point, Measure]:
    """Measure every distinct point, printing a line each."""
    import torch

    from ..runner import quiet_flower

    quiet_flower()
    previous = torch.get_num_threads()
    torch.set_num_threads(settings["threads"])
    results: dict[Point, Measure] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="fedmerge-scaling-") as tmp:
            # A first run pays the process's one-time costs (imports, allocator warm-up) that
            # would otherwise land in the first measured point's rounds.
            measure(Point("mlp", 2, "fedavg"), {**settings, "rounds": 2}, Path(tmp) / "warm")
            for point in dict.fromkeys(p for group in points.values() for p in group):
                results[point] = m = measure(point, settings, Path(tmp))
                print(
                    f"  {m.model:<8} {m.clients:>5} clients  {m.strategy:<14} "
                    f"{m.seconds_per_round:8.3f} s/round  ({m.wall_seconds:.1f} s run)",
                    flush=True,
                )
    finally:
        torch.set_num_threads(previous)
    return results


def table(title: str, rows: list[Measure]) -> str:
    """One sweep as a fixed-width text table."""
    head = (
        f"{'model':<9}{'params':>10}{'clients':>9}  {'strategy':<15}{'s/round':>9}"
        f"{'train s':>9}{'other s':>9}{'ms/client':>11}"
    )
    lines = [f"== {title} ==", head, "-" * len(head)]
    for m in rows:
        lines.append(
            f"{m.model:<9}{m.parameters:>10,}{m.clients:>9}  {m.strategy:<15}"
            f"{m.seconds_per_round:>9.3f}{m.train_seconds:>9.3f}{m.other_seconds:>9.3f}"
            f"{m.ms_per_client:>11.2f}"
        )
    return "\n".join(lines)


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise FedmergeError(f"{flag}: got {text!r}; allowed: comma-separated integers >= 1")
    return values


def main(argv: list[str] | None = None) -> int:
    """Command line: run the sweeps, print the tables, write the PNG (and JSON)."""
    p = argparse.ArgumentParser(
        prog="python -m fedmerge.bench.round_cost", description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="fewer points (about a minute)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default=os.environ.get("FEDMERGE_DATA_ROOT", "data"))
    p.add_argument("--clients", help=f"clients sweep (default {DEFAULTS['clients']})")
    p.add_argument("--models", help=f"models sweep (default {DEFAULTS['models']})")
    p.add_argument("--model", default="cnn", help="model of the clients and strategy sweeps")
    p.add_argument("--strategies", default="all", help="all, or comma-separated names")
    p.add_argument(
        "--strategy-clients", help=f"clients of the strategy sweep ({DEFAULTS['strategy_clients']})"
    )
    p.add_argument("--per-client", type=int, default=32, help="training samples per client")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="rounds per run (2..R are measured)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--png", type=Path, default=Path("scaling.png"))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    try:
        return _main(args)
    except FedmergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from ..plots import plot_scaling
    from ..strategies.registry import STRATEGIES

    sizes = QUICK if args.quick else DEFAULTS
    clients = _ints(args.clients or sizes["clients"], "--clients")
    s_clients = _ints(args.strategy_clients or sizes["strategy_clients"], "--strategy-clients")
    strategies = list(STRATEGIES) if args.strategies == "all" else args.strategies.split(",")
    for name in strategies:
        if name not in STRATEGIES:
            raise FedmergeError(f"--strategies: got {name!r}; allowed: all, or names among "
                                + ", ".join(STRATEGIES))  # fmt: skip
    if args.rounds < 2 or args.per_client < 1 or args.threads < 1:
        raise FedmergeError("--rounds must be >= 2, --per-client and --threads >= 1")
    settings = {
        "dataset": args.dataset,
        "data_root": str(Path(args.data_root).expanduser().resolve()),
        "per_client": args.per_client,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "threads": args.threads,
    }
    models = (args.models or sizes["models"]).split(",")
    points = sweeps(clients, models, args.model, strategies, s_clients)
    print(
        f"{args.dataset}: {args.per_client} samples per client (IID), batch {args.batch_size}, "
        f"1 local epoch, {args.rounds} rounds (2..{args.rounds} measured), "
        f"{args.threads} torch thread(s), central evaluation stubbed",
        flush=True,
    )
    results = run_sweeps(points, settings)
    titles = {
        "clients": f"clients ({args.model}, fedavg)",
        "models": f"models ({clients[0]} clients, fedavg)",
        "strategies": f"strategies ({args.model})",
    }
    for name, group in points.items():
        print()
        print(table(titles[name], [results[p] for p in group]))
    data = {name: [asdict(results[p]) for p in group] for name, group in points.items()}
    plot_scaling(data, titles, args.png, f"cost of a round: {args.dataset}, {args.per_client} "
                 "samples per client, 1 epoch")  # fmt: skip
    print(f"\nplot: {args.png}")
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, **data}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
