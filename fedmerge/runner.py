"""Run a configured simulation on an engine: the layer the CLI and the benchmarks call.

``run(cfg, engine="local")`` checks everything that can be checked before any engine starts
(names, data present, partition feasible, model fits the data), fixes the results folder,
then runs the real ServerApp and ClientApp on the chosen engine and returns the folder.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .checkpoint import CHECKPOINT_FILE, RESUME_OVERRIDES, wait_until_unlocked
from .config import RunConfig
from .errors import ConfigError, FedmergeError, unknown_name
from .federation import DataSpec, load_data, make_model, partition_indices
from .results import (
    CONFIG_JSON,
    METRICS_JSON,
    clear_run_dir,
    default_run_name,
    read_metrics,
    run_dir_for,
)
from .training import resolve_device

log = logging.getLogger(__name__)

ENGINES = ("local", "flower")
_LOCK_WAIT = 30.0  # seconds a resumed or overwritten run waits for an earlier writer to stop
RoundCallback = Callable[[dict[str, Any]], None]
_ROUND_LINE = re.compile(
    r"fedmerge \| round (\d+)/(\d+)\s+test-accuracy ([0-9.naif]+)\s+test-loss ([0-9.naif]+)"
)


def quiet_flower(verbose: bool = False) -> tuple[int, bool]:
    """Keep Flower's per-round log lines out of the way (``verbose`` keeps them).

    Returns the logger's previous ``(level, propagate)``, for callers that restore them.
    """
    import flwr.common.logger  # noqa: F401  (Flower configures its logger on import)

    flwr_log = logging.getLogger("flwr")
    previous = (flwr_log.level, flwr_log.propagate)
    flwr_log.propagate = False  # Flower prints through its own handler; no second copy
    if not verbose:
        flwr_log.setLevel(logging.ERROR)
    return previous


def prepare(cfg: RunConfig, *, overwrite: bool = False) -> RunConfig:
    """Validate ``cfg`` against the data and registries; pin absolute paths and the run name.

    An explicit ``run-name`` whose folder holds results is refused unless ``overwrite`` (the
    caller then clears it) or ``cfg.resume`` (the run continues there).

    Raises :class:`fedmerge.errors.FedmergeError` (with the key at fault) on any problem,
    before any engine starts.
    """
    from .strategies.registry import STRATEGIES

    if cfg.strategy not in STRATEGIES:
        raise unknown_name("strategy", cfg.strategy, STRATEGIES)
    if cfg.resume and not cfg.run_name:
        raise ConfigError("run-name", "", "the name of the run to resume (resume = true)")
    resolve_device(cfg.device)  # a device that is not there fails now, not in the ServerApp
    spec = DataSpec.of(cfg)
    data = load_data(spec)
    partition_indices(spec)
    make_model(cfg, data)
    cfg = cfg.replace(
        output_dir=str(Path(cfg.output_dir).expanduser().resolve()),
        data_root=str(Path(cfg.data_root).expanduser().resolve()),
    )
    if not (overwrite or cfg.resume):
        run_dir_for(cfg)  # an explicit run-name that already holds results fails here
    return cfg.replace(run_name=cfg.run_name or default_run_name(cfg))


class AlreadyFinished(FedmergeError):
    """``--resume`` of a run that finished: there is nothing to do (the CLI exits 0)."""


def resume_config(run_dir: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """The config that continues the interrupted run in ``run_dir``: its own, with
    ``resume = true``.

    Parameters
    ----------
    run_dir : path
        The run's results folder (``output-dir/run-name``).
    overrides : mapping, optional
        Run-config keys to change; only :data:`RESUME_OVERRIDES` (a resumed run must compute
        what the original would have).

    Raises
    ------
    AlreadyFinished
        The run finished all its rounds.
    FedmergeError
        Not a run folder, no checkpoint, or overrides that would change the results.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    refused = sorted(set(overrides or {}) - set(RESUME_OVERRIDES))
    if refused:
        raise FedmergeError(
            f"--resume continues a run with its own config; these overrides would change its "
            f"results: {', '.join(refused)} (allowed with --resume: {', '.join(RESUME_OVERRIDES)})"
        )
    config_file = run_dir / CONFIG_JSON
    if not config_file.is_file():
        raise FedmergeError(f"--resume: {run_dir} is not a fedmerge run folder (no {CONFIG_JSON})")
    try:
        saved = json.loads(config_file.read_text())["config"]
    except (ValueError, KeyError, TypeError) as exc:
        raise FedmergeError(f"--resume: {config_file} cannot be read ({exc})") from None
    cfg = RunConfig.from_mapping({**saved, **(overrides or {})}).replace(
        resume=True, output_dir=str(run_dir.parent), run_name=run_dir.name
    )
    if not (run_dir / CHECKPOINT_FILE).is_file():
        done = len(read_metrics(run_dir)) - 1 if (run_dir / METRICS_JSON).is_file() else -1
        if done >= cfg.num_rounds:
            raise AlreadyFinished(
                f"{run_dir} finished all {cfg.num_rounds} rounds; nothing to resume"
            )
        raise FedmergeError(
            f"--resume: {run_dir} has no {CHECKPOINT_FILE} ("
            + (
                "the run stopped before its initial model was evaluated"
                if done < 0
                else f"it stopped after round {done} of {cfg.num_rounds} without one: written "
                "by a fedmerge without checkpoints, or the file was removed"
            )
            + "); start it again with --overwrite"
        )
    return cfg


def run(
    cfg: RunConfig,
    engine: str = "local",
    *,
    on_round: RoundCallback | None = None,
    flower_options: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Run the simulation ``cfg`` describes on ``engine``; returns the results folder.

    Parameters
    ----------
    cfg : RunConfig
        The run.
    engine : {"local", "flower"}
        ``local``: in-process (no Ray, no start-up cost, deterministic). ``flower``: Flower's
        simulation engine through ``flwr run`` (Ray; the path that scales out).
    on_round : callable, optional
        Called with each round's metrics row as soon as the round is evaluated.
    flower_options : dict, optional
        Keyword arguments for :func:`fedmerge.engine.flower.run_flower` (``cpus_per_client``,
        ``gpus_per_client``, ``app_dir``, ``on_line``, ``timeout``).
    overwrite : bool
        Replace the results an explicit ``run-name`` already holds (only fedmerge's own files
        in that folder are removed).

    With ``cfg.resume`` (see :func:`resume_config`) the run in ``output-dir/run-name``
    continues from its checkpoint; on the CPU it ends with the metrics an uninterrupted run
    would have written.
    """
    if engine not in ENGINES:
        raise FedmergeError(f"engine: got {engine!r}; allowed: one of: {', '.join(ENGINES)}")
    if overwrite and cfg.resume:
        raise FedmergeError("--overwrite and --resume exclude each other")
    cfg = prepare(cfg, overwrite=overwrite)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    if (overwrite or cfg.resume) and run_dir.is_dir():
        # An interrupted run's ServerApp may still be stopping (Flower's engine: it notices
        # within a second or two that its launcher is gone).
        if not wait_until_unlocked(run_dir, timeout=_LOCK_WAIT):
            raise FedmergeError(f"another fedmerge process is still writing to {run_dir}")
        if overwrite:
            removed = clear_run_dir(run_dir)
            log.info("--overwrite: removed %s from %s", ", ".join(removed) or "nothing", run_dir)
    if engine == "local":
        _run_local(cfg, on_round)
    else:
        _run_flower(cfg, on_round, flower_options or {})
    rows = read_metrics(run_dir) if (run_dir / "metrics.json").exists() else []
    if len(rows) < cfg.num_rounds + 1:
        raise FedmergeError(
            f"the run stopped after {max(len(rows) - 1, 0)} of {cfg.num_rounds} rounds; "
            f"what it finished is in {run_dir}"
        )
    return run_dir


class _ProgressHandler(logging.Handler):
    def __init__(self, on_round: RoundCallback) -> None:
        super().__init__(logging.INFO)
        self.on_round = on_round

    def emit(self, record: logging.LogRecord) -> None:
        row = getattr(record, "fedmerge_row", None)
        if row is not None:
            self.on_round(row)


def _run_local(cfg: RunConfig, on_round: RoundCallback | None) -> None:
    from .clients.client_app import app as client_app
    from .clients.client_app import train_batch
    from .engine.local import run_apps
    from .strategies.server_app import app as server_app
    from .strategies.server_app import progress_log

    handler = _ProgressHandler(on_round or (lambda row: None))
    progress_log.addHandler(handler)
    old_level, old_propagate = progress_log.level, progress_log.propagate
    progress_log.setLevel(logging.INFO)
    progress_log.propagate = False  # the callback reports rounds; no second copy via root
    try:
        batch = train_batch if cfg.vectorise else None
        run_apps(
            server_app,
            client_app,
            cfg.to_mapping(),
            cfg.num_clients,
            batch_train=batch,
            workers=local_workers(cfg),
            client_threads=cfg.client_threads,
        )
    finally:
        progress_log.removeHandler(handler)
        progress_log.setLevel(old_level)
        progress_log.propagate = old_propagate


def local_workers(cfg: RunConfig) -> int:
    """The worker processes the local engine uses for ``cfg`` (its ``workers`` key resolved)."""
    from .engine.workers import resolve_workers

    per_round = min(cfg.num_clients, max(int(cfg.num_clients * cfg.fraction_train), 1))
    per_round = max(per_round, min(cfg.min_train_clients, cfg.num_clients))
    return resolve_workers(cfg.workers, per_round, resolve_device(cfg.device).type)


def parse_round_line(line: str) -> dict[str, Any] | None:
    """The metrics of a ``fedmerge | round r/n ...`` line printed by the ServerApp, if any."""
    m = _ROUND_LINE.search(line)
    if not m:
        return None
    return {"round": int(m[1]), "test-accuracy": float(m[3]), "test-loss": float(m[4])}


def _run_flower(cfg: RunConfig, on_round: RoundCallback | None, options: dict[str, Any]) -> None:
    from .engine.flower import run_flower

    user_on_line = options.pop("on_line", None)

    def on_line(line: str) -> None:
        if user_on_line:
            user_on_line(line)
        row = parse_round_line(line)
        if row is not None and on_round:
            on_round(row)

    run_flower(cfg, on_line=on_line, **options)
