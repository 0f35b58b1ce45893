"""Vectorised client training against the per-client path and bare PyTorch.

    python -m fedmerge.bench.vectorised [--models cnn,mlp] [--clients 10,100,1000]
        [--dataset fashion-mnist] [--data-root ../shared/data] [--batch-size 64]
        [--rounds 2] [--max-train-samples 0] [--json OUT.json]

For every model and number of clients, the same FedAvg rounds three ways: the bare PyTorch
loop of ``fedmerge.bench.throughput`` (one client after another), the local engine calling the
ClientApp per client (``vectorise = false``), and the local engine training the round's
clients together (``vectorise = true``). The training split is the same whatever the number of
clients (IID partition), so a round always processes the same samples; with more clients each
holds fewer. Figures: training samples per second over the rounds' wall time (centralized
evaluation excluded) and seconds per round.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..results import read_metrics
from .throughput import BenchSettings, measure_bare, prepare_federation, quiet_flower, warm_up


def measure_engine(settings: BenchSettings, out: Path, vectorise: bool) -> dict[str, Any]:
    """One local-engine run; samples/s and s/round from its metrics (rounds 1..R)."""
    from ..runner import run

    cfg = settings.run_config(
        out, run_name=f"{settings.model}-{settings.clients}-v{int(vectorise)}"
    )
    cfg = cfg.replace(vectorise=vectorise, partition="iid")
    with quiet_flower():
        start = time.perf_counter()
        rows = read_metrics(run(cfg, "local"))[1:]
        wall = time.perf_counter() - start
    seconds = sum(r["round-time"] for r in rows)
    samples = sum(r["num-examples"] for r in rows) * cfg.local_epochs
    return {
        "samples_per_s": samples / seconds,
        "seconds_per_round": seconds / len(rows),
        "final_accuracy": rows[-1]["test-accuracy"],
        "wall_seconds": wall,
    }


def run_grid(models: list[str], clients: list[int], base: BenchSettings) -> list[dict[str, Any]]:
    """Measure every (model, number of clients)."""
    results = []
    with tempfile.TemporaryDirectory(prefix="fedmerge-vec-") as tmp:
        out = Path(tmp)
        for model in models:
            for k in clients:
                settings = replace(base, model=model, clients=k, partition="iid")
                fed = prepare_federation(settings, out)
                warm_up(fed)
                bare = measure_bare(fed)
                per_client = measure_engine(settings, out, vectorise=False)
                vectorised = measure_engine(settings, out, vectorise=True)
                row = {
                    "model": model,
                    "clients": k,
                    "samples_per_client": sum(fed.sizes) // k,
                    "bare_samples_per_s": bare["samples_per_s"],
                    "per_client_samples_per_s": per_client["samples_per_s"],
                    "vectorised_samples_per_s": vectorised["samples_per_s"],
                    "bare_s_per_round": bare["seconds_per_round"],
                    "per_client_s_per_round": per_client["seconds_per_round"],
                    "vectorised_s_per_round": vectorised["seconds_per_round"],
                    "speedup_vs_per_client": vectorised["samples_per_s"]
                    / per_client["samples_per_s"],
                    "final_accuracy_per_client": per_client["final_accuracy"],
                    "final_accuracy_vectorised": vectorised["final_accuracy"],
                }
                results.append(row)
                print(
                    f"{model:<5} {k:>5} clients ({row['samples_per_client']:>5}/client): "
                    f"bare {row['bare_samples_per_s']:>8,.0f}  per-client "
                    f"{row['per_client_samples_per_s']:>8,.0f}  vectorised "
                    f"{row['vectorised_samples_per_s']:>8,.0f} samples/s  "
                    f"(x{row['speedup_vs_per_client']:.2f} vs per-client; s/round "
                    f"{row['per_client_s_per_round']:.2f} -> {row['vectorised_s_per_round']:.2f})",
                    flush=True,
                )
    return results


def profile_step(
    model_name: str, clients: int, batch_size: int, input_shape: tuple[int, ...] = (1, 28, 28)
) -> str:
    """Top operators (CPU time) of training ``clients`` clients for a few steps, per-client
    loop against ``train_many``: where the vectorised path spends its time."""
    from torch.profiler import ProfilerActivity, profile

    from ..models import build_model
    from ..training import SGDSettings, train
    from ..vectorised import ClientJob, train_many

    g = torch.Generator().manual_seed(0)
    n = batch_size * 5  # 5 steps per client
    shards = [
        (torch.randn(n, *input_shape, generator=g), torch.randint(0, 10, (n,), generator=g))
        for _ in range(clients)
    ]
    model = build_model(model_name, input_shape, 10, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    jobs = [ClientJob(state, x, y, seed=i) for i, (x, y) in enumerate(shards)]
    sgd = SGDSettings(1, batch_size, 0.01, momentum=0.9, weight_decay=1e-5)
    train_many(model, jobs[:2], sgd)  # warm-up
    lines = []
    for name, fn in (
        (
            "per-client",
            lambda: [
                (model.load_state_dict(state), train(model, x, y, sgd, seed=i))
                for i, (x, y) in enumerate(shards)
            ],
        ),
        ("vectorised", lambda: train_many(model, jobs, sgd)),
    ):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        lines.append(f"--- {name}: {clients} clients x 5 steps of batch {batch_size} ---")
        lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    p = argparse.ArgumentParser(prog="python -m fedmerge.bench.vectorised")
    p.add_argument("--models", default="cnn,mlp")
    p.add_argument("--clients", default="10,100,1000")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-train-samples", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    p.add_argument("--profile", action="store_true", help="profile the first model/clients only")
    args = p.parse_args(argv)
    if args.profile:
        model, k = args.models.split(",")[0], int(args.clients.split(",")[0])
        print(profile_step(model, k, args.batch_size))
        return 0
    base = BenchSettings(
        dataset=args.dataset,
        data_root=args.data_root,
        batch_size=args.batch_size,
        rounds=args.rounds,
        max_train_samples=args.max_train_samples,
        device=args.device,
    )
    print(
        f"{args.dataset}, batch {args.batch_size}, {args.rounds} rounds of 1 epoch, IID, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}"
    )
    results = run_grid(args.models.split(","), [int(k) for k in args.clients.split(",")], base)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
