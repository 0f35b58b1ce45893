"""The server's central evaluation: in its own process on one thread, or shared out among the
local engine's worker processes.

    python -m fedmerge.bench.eval_cost [--dataset mnist] [--data-root DIR] [--model resnet20]
        [--workers 2] [--repeats 3] [--json FILE]

Evaluates one seeded model of the registry on the dataset's whole test split (batch 1024,
fedmerge's default ``eval-batch-size``) three ways, each ``--repeats`` times (median seconds):

- ``server, 1 thread``: what the ServerApp does without worker processes (its torch work runs
  on one thread: :data:`fedmerge.engine.local.SERVER_THREADS`);
- ``workers``: the test split's batches shared out among ``--workers`` worker processes (one
  thread each) by :meth:`fedmerge.engine.workers.WorkerPool.map`, as the ServerApp does with
  ``workers`` >= 2; the per-batch sums added in order in this process;
- ``server, all threads``: this process with one torch thread per core (for comparison: the
  ServerApp does not do this, see the module docstring of ``fedmerge.engine.local``).

It checks that the first two give the same loss and accuracy to the bit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..datasets import load_dataset
from ..engine.workers import WorkerPool
from ..models import build_model
from ..processes import available_cpus
from ..training import evaluate, evaluate_in_shares


def _idle_client(msg: Any, context: Any) -> Any:  # the pool's ClientApp: never called here
    raise RuntimeError("no client calls in this benchmark")


def _median_seconds(fn: Callable[[], tuple[float, float]], repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def shared_evaluation(
    pool: WorkerPool, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, size: int
) -> tuple[float, float]:
    """The ServerApp's shared evaluation (:func:`fedmerge.training.evaluate_in_shares`)."""
    result = evaluate_in_shares(model, x, y, batch_size=size, shares=pool.size, run=pool.map)
    if result is None:
        raise RuntimeError("the worker pool could not evaluate")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmerge.bench.eval_cost", description=__doc__)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--workers", type=int, default=available_cpus())
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    data = load_dataset(args.dataset, root=args.data_root)
    model = build_model(args.model, data.input_shape, data.num_classes, seed=0)
    x, y, size = data.x_test, data.y_test, args.batch_size
    previous = torch.get_num_threads()
    rows: dict[str, dict[str, Any]] = {}
    try:
        torch.set_num_threads(1)
        seconds, one = _median_seconds(lambda: evaluate(model, x, y, batch_size=size), args.repeats)
        rows["server, 1 thread"] = {"seconds": seconds, "loss": one[0], "accuracy": one[1]}
        with WorkerPool(_idle_client, args.workers) as pool:
            pool.start()
            seconds, shared = _median_seconds(
                lambda: shared_evaluation(pool, model, x, y, size), args.repeats
            )
        rows[f"{args.workers} workers"] = {
            "seconds": seconds,
            "loss": shared[0],
            "accuracy": shared[1],
        }
        torch.set_num_threads(available_cpus())
        seconds, many = _median_seconds(
            lambda: evaluate(model, x, y, batch_size=size), args.repeats
        )
        rows[f"server, {available_cpus()} threads"] = {
            "seconds": seconds,
            "loss": many[0],
            "accuracy": many[1],
        }
    finally:
        torch.set_num_threads(previous)
    base = rows["server, 1 thread"]["seconds"]
    print(
        f"{args.model} on {args.dataset}'s test split ({len(y)} samples, batch {size}), "
        f"median of {args.repeats}, {available_cpus()} CPUs, torch {torch.__version__}"
    )
    print("| evaluation | seconds | speed-up | loss | accuracy |\n|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['seconds']:.2f} | {base / row['seconds']:.2f}x | "
              f"{row['loss']:.6f} | {row['accuracy']:.4f} |")  # fmt: skip
    same = one == shared
    print(f"workers equal the server's evaluation to the bit: {same}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "bit-equal": same}, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
