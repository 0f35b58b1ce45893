"""Writing a run folder's files: atomically, and with no knowledge of the run-config.

The bottom of the house: the checkpoint, the results and the metric sinks all write through
these, so none of them needs another to write a file.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new, never a mix.

    A temporary file in the same folder is written and flushed to disk (``fsync``), then
    renamed over ``path`` (``os.replace`` is atomic within a file system), then the folder is
    synced so that the rename itself survives a power loss.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on some platforms (Windows); the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_metrics(run_dir: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write the per-round table as JSON and CSV (columns: union of all rows' keys)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / METRICS_JSON, list(rows))
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(run_dir / METRICS_CSV, buf.getvalue().encode())


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-round rows of a finished (or interrupted) run."""
    return json.loads((Path(run_dir) / METRICS_JSON).read_text())
