"""The Flower ServerApp: build the configured strategy, run it, evaluate centrally, write results.

Runs unchanged under ``flwr run`` (simulation or a real SuperLink) and under fedmerge's local
engine. Inside this package, siblings are imported relatively and the library as
``fedmerge.<module>``: ``flwr run`` imports this folder as the top-level package
``strategies`` from a copy of the project (see docs/architecture.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import subprocess
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import flwr
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

import fedmerge
from fedmerge.checkpoint import (
    Checkpoint,
    config_changes,
    load_checkpoint,
    remove_checkpoint,
    rng_state,
    run_lock,
    save_checkpoint,
    set_rng_state,
)
from fedmerge.config import RunConfig
from fedmerge.datasets import FederatedDataset
from fedmerge.engine.flower import LAUNCHER_ENV, LAUNCHER_GONE, watch_launcher
from fedmerge.errors import ConfigError, FedmergeError
from fedmerge.federation import DataSpec, load_data, make_model
from fedmerge.fedma import fit_model
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
from fedmerge.sinks import ResultsSink, make_sinks
from fedmerge.spread import SharePool
from fedmerge.training import evaluate, evaluate_in_shares, resolve_device

from .checkpoint import RoundTracker, load_strategy_state, strategy_state
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
    launcher = os.environ.get(LAUNCHER_ENV, "")
    if launcher.isdigit() and int(launcher) != os.getpid():
        watch_launcher(int(launcher))  # fedmerge run --engine flower: stop if it is killed
    run_server(grid, cfg)


#: A round's mean client training loss above this many times the initial model's test loss
#: is reported as divergence (a warning naming lr).
DIVERGENCE_FACTOR = 2.0


class RoundRecorder:
    """Flower's ``evaluate_fn``: centralized test evaluation and timing (:meth:`__call__`),
    then the round recorded (:meth:`record`): its row handed to the results sinks
    (``fedmerge.sinks``: ``metrics.json`` and ``metrics.csv``, TensorBoard, ...), then a
    checkpoint written.

    Parameters
    ----------
    cfg : RunConfig
        The run.
    data : FederatedDataset
        Its data (the test split is evaluated).
    run_dir : Path
        The results folder.
    tracker : RoundTracker
        The strategy as ``start()`` runs it: the round offset, the round's train and client
        evaluate metrics, the strategy whose state is checkpointed.
    rows : list of dict, optional
        Rows already recorded (a resumed run: those of its checkpoint).
    arrays : ArrayRecord, optional
        The global model already reached (a resumed run: its checkpoint's).
    sinks : sequence of ResultsSink, optional
        Where each round's row goes, in order; started and closed by the caller.
    pool : SharePool, optional
        The local engine's worker processes (:mod:`fedmerge.spread`): they share the central
        evaluation.
    """

    def __init__(
        self,
        cfg: RunConfig,
        data: FederatedDataset,
        run_dir: Path,
        tracker: RoundTracker,
        rows: list[dict[str, Any]] | None = None,
        arrays: ArrayRecord | None = None,
        sinks: Sequence[ResultsSink] = (),
        pool: SharePool | None = None,
    ) -> None:
        self.cfg, self.data, self.run_dir, self.tracker = cfg, data, run_dir, tracker
        self.pool = pool
        self.sinks = list(sinks)
        self.device = resolve_device(cfg.device)
        self.model = make_model(cfg, data).to(self.device)
        # The test split moves to the device once, not every round.
        self.x_test, self.y_test = data.x_test.to(self.device), data.y_test.to(self.device)
        if data.eval_split != "test":
            log.info(
                "central evaluation scores %d held-out training samples (validation-size), "
                "not the test split: the 'test-' metrics of this run are validation metrics",
                len(self.y_test),
            )
        self.rows: list[dict[str, Any]] = list(rows or [])
        self.arrays = arrays  # the latest global model: the final one once start() returns
        self._last_end: float | None = None
        self._warned = False  # divergence is reported once per run

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if LAUNCHER_GONE.is_set():
            raise FedmergeError("the fedmerge process that launched this run is gone: stopped")
        start = time.perf_counter()
        self.arrays = arrays
        offset = self.tracker.round_offset
        if server_round == 0 and offset > 0:
            # start() evaluates its initial arrays: a resumed run's are round `offset`'s model,
            # evaluated and recorded before the interruption.
            self._last_end = start
            return None
        state = arrays.to_torch_state_dict()
        loss, acc = self.evaluate_model(state)
        row = self.round_row(server_round + offset, loss, acc, start, time.perf_counter())
        self.record(row, state)
        self._last_end = time.perf_counter()
        return MetricRecord({"test-loss": loss, "test-accuracy": acc})

    def evaluate_model(self, state: dict[str, torch.Tensor]) -> tuple[float, float]:
        """Test loss and accuracy of the global model ``state`` on the test split (a resized
        model when FedMA's global model grew).

        With the local engine's worker processes (``workers`` >= 2, CPU), the test split's
        batches are shared out among them while no client trains, each worker one contiguous
        share of whole batches, and the per-batch sums are added in batch order: the result
        equals the evaluation in this process to the bit, on every core at once."""
        self.model = fit_model(self.model, state)
        size, pool = self.cfg.eval_batch_size, self.pool
        if pool is not None and pool.size >= 2 and self.device.type == "cpu":
            shared = evaluate_in_shares(
                self.model,
                self.x_test,
                self.y_test,
                batch_size=size,
                shares=pool.size,
                run=pool.map,
            )
            if shared is not None:
                return shared
        return evaluate(self.model, self.x_test, self.y_test, batch_size=size, device=self.device)

    def round_row(
        self, r: int, loss: float, acc: float, start: float, end: float
    ) -> dict[str, Any]:
        """Round ``r``'s row: the evaluation, its timing, and the round's client metrics
        (training, and client-side evaluation as ``client-*``) that the tracker kept."""
        row: dict[str, Any] = {"round": r, "test-loss": loss, "test-accuracy": acc}
        if self._last_end is not None:
            # Everything between two evaluations: sending, client training, aggregation.
            row["round-time"] = start - self._last_end
        row["eval-time"] = end - start
        for key, value in dict(self.tracker.train_metrics.get(r, {})).items():
            row[key] = value
        for key, value in dict(self.tracker.evaluate_metrics.get(r, {})).items():
            row[f"client-{key}"] = value
        return row

    def record(self, row: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        """Keep ``row``, hand it to every sink, then checkpoint the round and report it.

        The sinks come before the checkpoint, as the metrics files always did: a run
        interrupted in between resumes from the previous checkpoint and records the round
        again (``FileSink`` drops its row first; ``TensorBoardSink`` purges it).
        """
        self.rows.append(row)
        self._warn_if_diverging(row)
        for sink in self.sinks:
            sink.round(row)
        self.checkpoint(row["round"], state)
        progress_log.info(
            "round %d/%d  test-accuracy %.4f  test-loss %.4f",
            row["round"],
            self.cfg.num_rounds,
            row["test-accuracy"],
            row["test-loss"],
            extra={"fedmerge_row": dict(row), "fedmerge_num_rounds": self.cfg.num_rounds},
        )

    def _warn_if_diverging(self, row: dict[str, Any]) -> None:
        """Warn, once per run, when the clients' training loss runs far above the start.

        The start is the initial model's test loss (round 0; about ln(classes)). A round
        whose mean client training loss exceeds :data:`DIVERGENCE_FACTOR` times it, or is not
        finite, almost always means the clients' learning rate is too high for the data.
        """
        first = self.rows[0] if self.rows and self.rows[0]["round"] == 0 else None
        loss = row.get("train-loss")
        if first is None or loss is None or self._warned:
            return
        start = float(first["test-loss"])
        if math.isfinite(float(loss)) and float(loss) <= DIVERGENCE_FACTOR * start:
            return
        self._warned = True
        log.warning(
            "round %d: the clients' mean training loss %.4g is above %g x the initial model's "
            "test loss %.4g: training is diverging; lower lr (now %g; see `fedmerge datasets` "
            "for each dataset's default)",
            row["round"],
            float(loss),
            DIVERGENCE_FACTOR,
            start,
            self.cfg.lr,
        )

    def checkpoint(self, server_round: int, state: dict[str, torch.Tensor]) -> None:
        """Write everything needed to continue after ``server_round`` (atomically)."""
        save_checkpoint(
            self.run_dir,
            Checkpoint(
                round=server_round,
                num_rounds=self.cfg.num_rounds,
                arrays={k: v.detach().cpu() for k, v in state.items()},
                strategy=strategy_state(self.tracker.strategy),
                rng=rng_state(),
                rows=self.rows,
                config=self.cfg.to_mapping(),
            ),
        )


def git_version(folder: Path) -> str | None:
    """The git commit of the work tree holding ``folder`` (12 hex digits), with
    ``"-modified"`` when tracked files under ``folder`` differ from it; None outside a git work
    tree or without git."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10
        )

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0:
            return None
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-modified" if status.stdout.strip() else "")


def code_facts() -> dict[str, str]:
    """Where this run's ``fedmerge`` and ``strategies`` packages were imported from, and their
    git versions: a result names the code that produced it (a checkout with edits, a git
    worktree, an installed copy), which a version number alone does not."""
    facts = {}
    for name, folder in (
        ("fedmerge", Path(fedmerge.__file__).resolve().parent),
        ("strategies", Path(__file__).resolve().parent),
    ):
        version = git_version(folder)
        facts[f"{name}-code"] = f"{folder} @ {version or 'no git work tree'}"
    return facts


def run_facts(grid: Grid) -> dict[str, str]:
    """Versions and environment recorded beside the config."""
    return {
        **code_facts(),
        "fedmerge": fedmerge.__version__,
        "flwr": flwr.__version__ if hasattr(flwr, "__version__") else "unknown",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "grid": type(grid).__name__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_server(grid: Grid, cfg: RunConfig) -> Path:
    """Run the federation ``cfg`` describes over ``grid``; returns the results folder.

    With ``resume = true`` the run in ``output-dir/run-name`` continues from its checkpoint.
    The results sinks (run-config key ``log``) are made before the folder is, so that a
    missing optional package leaves nothing behind; each one started is closed when the run
    ends, however it ends.
    """
    sinks = make_sinks(cfg.log)
    if cfg.resume:
        if not cfg.run_name:
            raise ConfigError("run-name", "", "the name of the run to resume (resume = true)")
        run_dir = Path(cfg.output_dir) / cfg.run_name
    else:
        run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        _run_locked(grid, cfg, run_dir, sinks)
    return run_dir


def _run_locked(grid: Grid, cfg: RunConfig, run_dir: Path, sinks: list[ResultsSink]) -> None:
    checkpoint = load_checkpoint(run_dir) if cfg.resume else None
    if checkpoint is None:
        write_json(run_dir / CONFIG_JSON, {"config": cfg.to_mapping(), "facts": run_facts(grid)})
    else:
        _check_resumable(cfg, checkpoint, run_dir)
        _note_resume(run_dir, checkpoint.round, grid)
    log.info("results -> %s", run_dir.resolve())

    # Flower samples clients with Python's `random`; seeding it makes sampling reproducible.
    random.seed(cfg.seed)
    data = load_data(DataSpec.of(cfg))
    strategy = build_strategy(cfg)
    # Flower's engines return replies in arrival order; the local engine in a fixed order.
    sort_replies = not getattr(grid, "deterministic_reply_order", False)
    # The local engine's worker processes (None elsewhere) share the central evaluation.
    pool = getattr(grid, "pool", None)
    if checkpoint is None:
        arrays = ArrayRecord(make_model(cfg, data, seed=cfg.seed).state_dict())
        tracker = RoundTracker(strategy, 0, sort_replies)
        recorder = RoundRecorder(cfg, data, run_dir, tracker, sinks=sinks, pool=pool)
    else:
        load_strategy_state(strategy, checkpoint.strategy)
        set_rng_state(checkpoint.rng)
        arrays = ArrayRecord(checkpoint.arrays)
        tracker = RoundTracker(strategy, checkpoint.round, sort_replies)
        recorder = RoundRecorder(
            cfg, data, run_dir, tracker, checkpoint.rows, arrays, sinks, pool=pool
        )
        log.info("resuming after round %d of %d", checkpoint.round, cfg.num_rounds)
    with ExitStack() as closing:  # every sink started is closed, however the run ends
        for sink in sinks:  # a resumed run's FileSink drops rows written after the checkpoint
            sink.start(cfg.to_mapping(), run_dir, list(recorder.rows))
            closing.callback(sink.close)
        if tracker.round_offset < cfg.num_rounds:
            tracker.start(
                grid=grid,
                initial_arrays=arrays,
                num_rounds=cfg.num_rounds - tracker.round_offset,
                timeout=cfg.round_timeout or 3600.0,
                train_config=ConfigRecord({"lr": cfg.lr}),
                evaluate_fn=recorder,
            )
        _finish(cfg, run_dir, recorder)


def _finish(cfg: RunConfig, run_dir: Path, recorder: RoundRecorder) -> None:
    """The final results; then the checkpoint goes (a finished run has nothing to resume)."""
    rows = recorder.rows
    write_metrics(run_dir, rows)
    if cfg.save_model and recorder.arrays is not None:
        save_model(run_dir, recorder.arrays.to_torch_state_dict())
    title = f"{cfg.strategy} on {cfg.dataset} ({cfg.partition}, {cfg.num_clients} clients)"
    plot_accuracy(rows, run_dir / PLOT_FILE, title)
    plot_scope_spread(rows, run_dir / SCOPE_PLOT_FILE, f"client scope spread: {title}")
    remove_checkpoint(run_dir)


def _check_resumable(cfg: RunConfig, checkpoint: Checkpoint, run_dir: Path) -> None:
    changed = config_changes(checkpoint.config, cfg.to_mapping())
    if changed:
        raise FedmergeError(
            f"cannot resume {run_dir}: the run-config differs from the checkpoint's in "
            f"{', '.join(changed)}; a resumed run must use the original config"
        )


def _note_resume(run_dir: Path, after_round: int, grid: Grid) -> None:
    """Add this resumption to the run facts of ``config.json`` (the config stays as it was)."""
    path = run_dir / CONFIG_JSON
    saved = json.loads(path.read_text()) if path.is_file() else {"config": {}, "facts": {}}
    facts = run_facts(grid)
    saved.setdefault("facts", {}).setdefault("resumed", []).append(
        {
            "after-round": after_round,
            "started": facts["started"],
            "grid": facts["grid"],
            "fedmerge-code": facts["fedmerge-code"],  # a resumed run may run other code
            "strategies-code": facts["strategies-code"],
        }
    )
    write_json(path, saved)
