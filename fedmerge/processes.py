"""Processes: whether one still runs (the bench's lock, the run's launcher watch), and the
CPU cores this one may use (the local engine's workers, the bench's jobs, the benchmarks).

Kept free of torch and Flower so that light commands (``fedmerge bench --help``) can use it.
"""

from __future__ import annotations

import os
from pathlib import Path


def process_alive(pid: int) -> bool:
    """True while process ``pid`` runs (a zombie, killed but not yet reaped, counts as gone).

    On Windows the answer is always True: there ``os.kill(pid, 0)`` would not probe the
    process but send it CTRL_C_EVENT (signal 0), so a live owner is assumed.
    """
    if os.name == "nt":
        return True
    if Path("/proc/self").exists():
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
