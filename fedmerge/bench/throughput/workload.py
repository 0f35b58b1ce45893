"""The workload of the throughput benchmark: its settings, the federation every variant
trains, the untimed warm-up, and the figures each measurement reports.

What is measured, and how, is described in :mod:`fedmerge.bench.throughput`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...config import RunConfig
from ...errors import FedmergeError
from ...federation import DataSpec, client_shard, load_data, make_model
from ...processes import available_cpus
from ...training import resolve_device

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


def device_sync(device: torch.device) -> Callable[[], None]:
    """A call that waits for the device's queued work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


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
    device_sync(fed.device)()


def figures(
    engine: str,
    *,
    samples: int,
    round_seconds: Sequence[float],
    train_seconds: Sequence[float] | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One measurement's figures (see :mod:`fedmerge.bench.throughput`) from its round seconds
    and, where separable, its training-loop seconds per round."""
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
