"""The output folder of a run: resolved config, per-round metrics, final model, plot.

Files are written atomically (temporary file, then rename) and the metrics are rewritten after
every round, so an interrupted run keeps every round it finished.

Layout of ``<output-dir>/<run-name>/``::

    config.json     every run-config key with the value used, plus run facts (versions, device)
    metrics.json    one object per round (round 0 = the initial model)
    metrics.csv     the same table
    model.pt        the final global model's state dict (save-model = true)
    accuracy.png    test accuracy per round
    scope-spread.png  per layer, the spread of the clients' weight scopes per round
    checkpoint.pt   while the run is unfinished: what ``fedmerge run --resume`` continues from
                    (fedmerge/checkpoint.py); deleted when the run ends
"""

from __future__ import annotations

import io
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import RunConfig
from .errors import ConfigError
from .plots import plot_accuracy, plot_scope_spread  # noqa: F401  (results and their plots)
from .run_files import METRICS_CSV as METRICS_CSV
from .run_files import METRICS_JSON as METRICS_JSON
from .run_files import atomic_write
from .run_files import read_metrics as read_metrics
from .run_files import write_json as write_json
from .run_files import write_metrics as write_metrics

log = logging.getLogger(__name__)

CONFIG_JSON = "config.json"
MODEL_FILE = "model.pt"
PLOT_FILE = "accuracy.png"
SCOPE_PLOT_FILE = "scope-spread.png"
CHECKPOINT_FILE = "checkpoint.pt"  # fedmerge.checkpoint.CHECKPOINT_FILE
#: Every file fedmerge writes into a run folder (what ``--overwrite`` removes; nothing else).
RESULT_FILES = (
    CONFIG_JSON,
    METRICS_JSON,
    METRICS_CSV,
    MODEL_FILE,
    PLOT_FILE,
    SCOPE_PLOT_FILE,
    CHECKPOINT_FILE,
)


def default_run_name(cfg: RunConfig, now: float | None = None) -> str:
    """``<dataset>-<strategy>-s<seed>-<YYYYmmdd-HHMMSS>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"{cfg.dataset}-{cfg.strategy}-s{cfg.seed}-{stamp}"


def run_dir_for(cfg: RunConfig) -> Path:
    """The folder a run writes to; an explicit ``run-name`` that already holds results is
    refused, so finished results are never overwritten."""
    name = cfg.run_name or default_run_name(cfg)
    path = Path(cfg.output_dir) / name
    if cfg.run_name and any((path / f).exists() for f in (METRICS_JSON, CHECKPOINT_FILE)):
        raise ConfigError(
            "run-name",
            cfg.run_name,
            "a name whose folder holds no results yet",
            f"{path} already holds a run; choose another run-name, continue it with "
            f"`fedmerge run --resume {path}`, or replace it with --overwrite",
        )
    return path


def clear_run_dir(run_dir: Path) -> list[str]:
    """Remove the files fedmerge wrote into ``run_dir`` (:data:`RESULT_FILES`, their temporary
    files and the TensorBoard sink's ``tensorboard/`` folder), and nothing else; returns the
    names removed."""
    removed = []
    for name in RESULT_FILES:
        for path in (run_dir / name, run_dir / f".{name}.tmp"):
            if path.is_file():
                path.unlink()
                removed.append(path.name)
    events = run_dir / "tensorboard"  # the TensorBoard sink's event files
    if events.is_dir():
        shutil.rmtree(events)
        removed.append(events.name)
    return removed


def save_model(run_dir: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Save a state dict as ``model.pt`` (atomically)."""
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    atomic_write(run_dir / MODEL_FILE, buf.getvalue())
