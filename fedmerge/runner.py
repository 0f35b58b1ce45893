"""Run a configured simulation on an engine: the layer the CLI and the benchmarks call.

``run(cfg, engine="local")`` checks everything that can be checked before any engine starts
(names, data present, partition feasible, model fits the data), fixes the results folder,
then runs the real ServerApp and ClientApp on the chosen engine and returns the folder.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import RunConfig
from .errors import FedmergeError, unknown_name
from .federation import DataSpec, load_data, make_model, partition_indices
from .results import default_run_name, read_metrics, run_dir_for
from .training import resolve_device

log = logging.getLogger(__name__)

ENGINES = ("local", "flower")
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


def prepare(cfg: RunConfig) -> RunConfig:
    """Validate ``cfg`` against the data and registries; pin absolute paths and the run name.

    Raises :class:`fedmerge.errors.FedmergeError` (with the key at fault) on any problem,
    before any engine starts.
    """
    from .strategies.registry import STRATEGIES

    if cfg.strategy not in STRATEGIES:
        raise unknown_name("strategy", cfg.strategy, STRATEGIES)
    resolve_device(cfg.device)  # a device that is not there fails now, not in the ServerApp
    spec = DataSpec.of(cfg)
    data = load_data(spec)
    partition_indices(spec)
    make_model(cfg, data)
    cfg = cfg.replace(
        output_dir=str(Path(cfg.output_dir).expanduser().resolve()),
        data_root=str(Path(cfg.data_root).expanduser().resolve()),
    )
    run_dir_for(cfg)  # an explicit run-name that already holds results fails here
    return cfg.replace(run_name=cfg.run_name or default_run_name(cfg))


def run(
    cfg: RunConfig,
    engine: str = "local",
    *,
    on_round: RoundCallback | None = None,
    flower_options: dict[str, Any] | None = None,
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
    """
    if engine not in ENGINES:
        raise FedmergeError(f"engine: got {engine!r}; allowed: one of: {', '.join(ENGINES)}")
    cfg = prepare(cfg)
    run_dir = Path(cfg.output_dir) / cfg.run_name
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
        run_apps(server_app, client_app, cfg.to_mapping(), cfg.num_clients, batch_train=batch)
    finally:
        progress_log.removeHandler(handler)
        progress_log.setLevel(old_level)
        progress_log.propagate = old_propagate


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
