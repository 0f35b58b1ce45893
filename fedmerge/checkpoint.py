"""Checkpoints of a run: everything needed to continue it after an interruption.

After every evaluated round (round 0 included) the ServerApp writes ``checkpoint.pt`` into the
run folder, atomically (temporary file in the same folder, ``fsync``, ``os.replace``): a kill at
any instant leaves either the previous checkpoint or the new one, never a torn file. A
checkpoint holds

- ``round``: the last finished round, and ``num-rounds``, the run's total;
- ``arrays``: the global model after that round (a state dict of CPU tensors);
- ``strategy``: the strategy's state across rounds (server momentum, Adam moments, the WSA
  target scope; see ``strategies/checkpoint.py``), as plain data and tensors;
- ``rng``: the process-wide random-number generators (Python's ``random``, which Flower samples
  clients with; NumPy's and PyTorch's global ones);
- ``rows``: the metrics rows written so far (round 0 to ``round``);
- ``config``: the run-config it ran with.

It is read back with ``torch.load(weights_only=True)``: plain containers, numbers, strings and
tensors only, so loading a checkpoint runs no pickled code. A finished run deletes its
checkpoint (nothing is left to resume) after writing its final results.

Everything here is PyTorch/NumPy on plain data (no Flower).
"""

from __future__ import annotations

import io
import logging
import os
import random
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import RunConfig
from .errors import FedmergeError
from .run_files import atomic_write

try:  # POSIX; elsewhere runs go unlocked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
#: Keys ``fedmerge run --resume DIR`` lets a user change: where the data is and what is logged,
#: not what is computed.
RESUME_OVERRIDES = ("data-root", "download", "log")
#: Run-config keys a resumed run may differ in from the checkpoint's: those, and where the
#: run is (set by the resume itself).
RESUME_FREE_KEYS = ("resume", "output-dir", "run-name", *RESUME_OVERRIDES)
#: Bumped when the layout of the checkpoint changes; older files are refused, not misread.
FORMAT = 1


@dataclass
class Checkpoint:
    """The state of a run after round ``round`` (see the module docstring)."""

    round: int
    num_rounds: int
    arrays: dict[str, torch.Tensor]
    strategy: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint as the plain dict that is saved."""
        return {
            "format": FORMAT,
            "round": self.round,
            "num-rounds": self.num_rounds,
            "arrays": self.arrays,
            "strategy": self.strategy,
            "rng": self.rng,
            "rows": self.rows,
            "config": self.config,
        }


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``run_dir/checkpoint.pt`` atomically; returns its path."""
    buf = io.BytesIO()
    torch.save(checkpoint.to_dict(), buf)
    path = Path(run_dir) / CHECKPOINT_FILE
    atomic_write(path, buf.getvalue())
    return path


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read ``run_dir/checkpoint.pt``.

    Raises
    ------
    FedmergeError
        No checkpoint, an unreadable one, or one of another format.
    """
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise FedmergeError(f"{run_dir} has no {CHECKPOINT_FILE}: nothing to resume from")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the same user error
        raise FedmergeError(f"{path} cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise FedmergeError(f"{path} has format {found!r}; this fedmerge reads format {FORMAT}")
    return Checkpoint(
        round=int(data["round"]),
        num_rounds=int(data["num-rounds"]),
        arrays=dict(data["arrays"]),
        strategy=dict(data["strategy"]),
        rng=dict(data["rng"]),
        rows=list(data["rows"]),
        config=dict(data["config"]),
    )


def remove_checkpoint(run_dir: Path) -> None:
    """Delete the checkpoint of a finished run (nothing is left to resume)."""
    (Path(run_dir) / CHECKPOINT_FILE).unlink(missing_ok=True)


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The run-config keys whose values differ between ``saved`` and ``current``, as
    ``key: old -> new``, leaving out :data:`RESUME_FREE_KEYS` (a key missing from ``saved``,
    written by an older fedmerge, counts as unchanged when ``current`` has its default)."""
    defaults = RunConfig().to_mapping()
    changes = []
    for key, value in current.items():
        old = saved.get(key, defaults.get(key))
        if key not in RESUME_FREE_KEYS and old != value:
            changes.append(f"{key}: {old!r} -> {value!r}")
    return changes


# -- random-number generators -------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The process-wide generators' states: Python ``random``, NumPy's global, PyTorch's CPU.

    fedmerge's own code draws from seeded generators of its own (clients' training, matching,
    NP Merge); Flower samples clients with Python's ``random``, which the ServerApp seeds.
    """
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 - the global one, saved
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(state["torch"])


# -- one writer per run folder ----------------------------------------------------------
@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run folder while a ServerApp writes to it.

    The lock (``flock`` on the folder itself: no extra file) is released by the operating
    system when the process ends, however it ends, so a killed run never leaves it behind.

    Raises
    ------
    FedmergeError
        Another process holds it (a run still writing to this folder).
    """
    if fcntl is None:
        yield
        return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FedmergeError(
                f"another fedmerge process is writing to {run_dir}; wait for it to end or "
                "stop it first"
            ) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def wait_until_unlocked(run_dir: Path, timeout: float) -> bool:
    """Wait up to ``timeout`` s for no process to hold :func:`run_lock` on ``run_dir``.

    True when it is free. An interrupted run's ServerApp may still be stopping (on Flower's
    engine it notices that its launcher is gone within a second or two).
    """
    if fcntl is None:
        return True
    deadline = time.monotonic() + timeout
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.2)
    finally:
        os.close(fd)
