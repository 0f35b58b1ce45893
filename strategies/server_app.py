"""The Flower ServerApp: build the configured strategy, run it, evaluate centrally, write results.

Runs unchanged under ``flwr run`` (simulation or a real SuperLink) and under fedmerge's local
engine. Inside this package, siblings are imported relatively and the library as
``fedmerge.<module>``: ``flwr run`` imports this folder as the top-level package
``strategies`` from a copy of the project (see docs/architecture.md).
"""

from __future__ import annotations

import logging
import platform
import random
import time
from pathlib import Path

import flwr
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

import fedmerge
from fedmerge.config import RunConfig
from fedmerge.datasets import FederatedDataset
from fedmerge.federation import DataSpec, load_data, make_model
from fedmerge.results import (
    CONFIG_JSON,
    PLOT_FILE,
    SCOPE_PLOT_FILE,
    plot_accuracy,
    plot_scope_spread,
    run_dir_for,
    save_model,
    write_json,
    write_metrics,
)
from fedmerge.training import evaluate, resolve_device

from .registry import build_strategy

log = logging.getLogger(__name__)
#: One record per evaluated round; the fedmerge CLI listens here to draw its progress bar.
progress_log = logging.getLogger("fedmerge.progress")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls: parse the run-config at the boundary, then run."""
    cfg = RunConfig.from_mapping(context.run_config)
    if not progress_log.handlers and not logging.getLogger("fedmerge").handlers:
        # Under `flwr run` nobody listens to fedmerge's logger: print round lines plainly.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fedmerge | %(message)s"))
        progress_log.addHandler(handler)
        progress_log.setLevel(logging.INFO)
    run_server(grid, cfg)


class RoundRecorder:
    """Flower's ``evaluate_fn``: centralized test evaluation, timing, metrics written each round."""

    def __init__(self, cfg: RunConfig, data: FederatedDataset, run_dir: Path) -> None:
        self.cfg, self.data, self.run_dir = cfg, data, run_dir
        self.device = resolve_device(cfg.device)
        self.model = make_model(cfg, data).to(self.device)
        # The test split moves to the device once, not every round.
        self.x_test, self.y_test = data.x_test.to(self.device), data.y_test.to(self.device)
        self.rows: list[dict[str, float | int]] = []
        self._last_end: float | None = None

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        start = time.perf_counter()
        self.model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(
            self.model,
            self.x_test,
            self.y_test,
            batch_size=self.cfg.eval_batch_size,
            device=self.device,
        )
        end = time.perf_counter()
        row: dict[str, float | int] = {
            "round": server_round,
            "test-loss": loss,
            "test-accuracy": acc,
        }
        if self._last_end is not None:
            # Everything between two evaluations: sending, client training, aggregation.
            row["round-time"] = start - self._last_end
        row["eval-time"] = end - start
        self.rows.append(row)
        write_metrics(self.run_dir, self.rows)
        progress_log.info(
            "round %d/%d  test-accuracy %.4f  test-loss %.4f",
            server_round,
            self.cfg.num_rounds,
            acc,
            loss,
            extra={"fedmerge_row": dict(row), "fedmerge_num_rounds": self.cfg.num_rounds},
        )
        self._last_end = time.perf_counter()
        return MetricRecord({"test-loss": loss, "test-accuracy": acc})


def run_facts(grid: Grid) -> dict[str, str]:
    """Versions and environment recorded beside the config."""
    return {
        "fedmerge": fedmerge.__version__,
        "flwr": flwr.__version__ if hasattr(flwr, "__version__") else "unknown",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "grid": type(grid).__name__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_server(grid: Grid, cfg: RunConfig) -> Path:
    """Run the federation ``cfg`` describes over ``grid``; returns the results folder."""
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / CONFIG_JSON, {"config": cfg.to_mapping(), "facts": run_facts(grid)})
    log.info("results -> %s", run_dir.resolve())

    # Flower samples clients with Python's `random`; seeding it makes sampling reproducible.
    random.seed(cfg.seed)
    data = load_data(DataSpec.of(cfg))
    initial = make_model(cfg, data, seed=cfg.seed)
    strategy = build_strategy(cfg)
    recorder = RoundRecorder(cfg, data, run_dir)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial.state_dict()),
        num_rounds=cfg.num_rounds,
        timeout=cfg.round_timeout or 3600.0,
        train_config=ConfigRecord({"lr": cfg.lr}),
        evaluate_fn=recorder,
    )

    rows = recorder.rows
    for row in rows:
        r = int(row["round"])
        for key, value in dict(result.train_metrics_clientapp.get(r, {})).items():
            row[key] = value
        for key, value in dict(result.evaluate_metrics_clientapp.get(r, {})).items():
            row[f"client-{key}"] = value
    write_metrics(run_dir, rows)
    if cfg.save_model:
        final = result.arrays if len(result.arrays) else ArrayRecord(initial.state_dict())
        save_model(run_dir, final.to_torch_state_dict())
    title = f"{cfg.strategy} on {cfg.dataset} ({cfg.partition}, {cfg.num_clients} clients)"
    plot_accuracy(rows, run_dir / PLOT_FILE, title)
    plot_scope_spread(rows, run_dir / SCOPE_PLOT_FILE, f"client scope spread: {title}")
    return run_dir
