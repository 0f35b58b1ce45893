"""The ``flower`` engine: the same apps on Flower's own simulation engine (``flwr run``, Ray).

This is the path that scales out: Flower's SuperLink schedules the ClientApp on Ray actors
(``client-resources-num-cpus`` / ``-num-gpus`` each). The command is what a Flower user would
type, with the environment this offline machine needs (docs/user-guide.md):

    flwr run <project> --run-config <file.toml> \
        --federation-config "num-supernodes=N client-resources-num-cpus=C" --stream

``flwr run`` leaves a detached local SuperLink running, and a later ``flwr run`` on the same
ports is served by it, in the first run's environment. This module runs each simulation with
its own scratch ``FLWR_HOME`` on ports that were free, stops the SuperLink it started (and only
that one) when the run ends, fails or is interrupted, and warns when it finds none of its own
(the run was served by a SuperLink it did not start).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path

from ..config import ConfigValue, RunConfig
from ..errors import FedmergeError
from ..processes import process_alive

log = logging.getLogger(__name__)

#: Environment variable naming the pid of the fedmerge process that launched a Flower run.
LAUNCHER_ENV = "FEDMERGE_LAUNCHER_PID"
#: Set once :func:`watch_launcher` found the launcher gone: the run must write nothing more.
LAUNCHER_GONE = threading.Event()


def find_app_dir(start: Path | None = None) -> Path:
    """The project folder that holds the Flower app (``pyproject.toml`` with ``[tool.flwr.app]``).

    Found beside the imported ``fedmerge`` package (a checkout, or an editable install).
    """
    here = start or Path(__file__).resolve().parents[2]
    pyproject = here / "pyproject.toml"
    if pyproject.is_file():
        data = tomllib.loads(pyproject.read_text())
        if "app" in data.get("tool", {}).get("flwr", {}):
            return here
    raise FedmergeError(
        f"engine 'flower' needs the fedmerge project folder (pyproject.toml with "
        f"[tool.flwr.app]); none at {here}. Install fedmerge from a checkout "
        f"(`pip install -e .`) or pass --app-dir PATH_TO_CHECKOUT."
    )


#: Files a Flower app bundle (FAB) ships: Flower's built-in include patterns (flwr 1.41/1.42:
#: ``**/*.py, *.toml, *.md, *.yaml, *.yml, *.json, *.jsonl``, ``/LICENSE``), and the root
#: ``.gitignore`` that ``flwr run`` applies to the bundle.
BUNDLE_SUFFIXES = frozenset({".py", ".toml", ".md", ".yaml", ".yml", ".json", ".jsonl"})
BUNDLE_ROOT_FILES = frozenset({"LICENSE", "LICENSE.md", ".gitignore"})
#: Folders never part of an app, at any depth: version control, caches, packaging output.
SKIPPED_DIRS = frozenset(
    {".git", ".hg", ".svn", ".flwr", "__pycache__", ".pytest_cache", ".ruff_cache",
     ".mypy_cache", ".tox", ".nox", ".eggs", "node_modules"}
)  # fmt: skip
#: Top-level folders left out too: tests, packaging output, fedmerge's results (output-dir).
SKIPPED_TOP_DIRS = frozenset({"tests", "build", "dist", "runs"})


def is_environment(folder: Path) -> bool:
    """Whether ``folder`` is a Python environment (a virtualenv/venv, or a conda env)."""
    return (folder / "pyvenv.cfg").is_file() or (folder / "conda-meta").is_dir()


def _skipped_dir(folder: Path, top: bool) -> bool:
    name = folder.name
    return (
        name in SKIPPED_DIRS
        or name.endswith(".egg-info")
        or (top and name in SKIPPED_TOP_DIRS)
        or folder.is_symlink()
        or is_environment(folder)
    )


def _shipped_file(path: Path, top: bool) -> bool:
    name = path.name
    if path.is_symlink():  # Flower's bundler skips symlinks too
        return False
    if (name.startswith("test_") and name.endswith(".py")) or name.endswith("_test.py"):
        return False
    return path.suffix in BUNDLE_SUFFIXES or (top and name in BUNDLE_ROOT_FILES)


def bundle_files(app_dir: Path) -> list[Path]:
    """The app's own files that a Flower app bundle would ship (paths relative to ``app_dir``).

    ``flwr run`` bundles the whole folder it is given and checks every path's depth (at most
    10 folders) before it drops environments other than ``.venv``: a virtualenv named
    ``venv`` or ``env`` inside the project makes it fail. This walk never enters an
    environment (any folder holding ``pyvenv.cfg`` or ``conda-meta``, whatever its name),
    version-control or cache folders, ``*.egg-info``, nor the top-level ``tests``, ``build``,
    ``dist`` and ``runs``; it keeps the file types Flower ships and leaves out test modules.
    """
    app_dir = Path(app_dir)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(app_dir, followlinks=False):
        here = Path(dirpath)
        top = here == app_dir
        dirnames[:] = sorted(d for d in dirnames if not _skipped_dir(here / d, top))
        found += [
            (here / f).relative_to(app_dir)
            for f in sorted(filenames)
            if _shipped_file(here / f, top)
        ]
    return found


def stage_app(app_dir: Path, dest: Path) -> Path:
    """Copy the app's bundle files (:func:`bundle_files`) to ``dest``; returns ``dest``.

    ``flwr run dest`` then bundles exactly the app: the same bundle as from ``app_dir``
    (its paths are relative), without scanning environments or outputs inside the project.
    """
    for rel in bundle_files(app_dir):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(app_dir / rel, target)
    return dest


def toml_value(value: ConfigValue) -> str:
    """One run-config value in TOML syntax."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def write_run_config(values: Mapping[str, ConfigValue], path: Path) -> Path:
    """Write run-config keys as a flat TOML file (what ``--run-config FILE`` takes)."""
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
    return path


def flower_env(flwr_home: Path, ports: tuple[int, int] | None = None) -> dict[str, str]:
    """Environment for ``flwr run`` on an offline machine, with this interpreter's tools.

    ``ports``: the local SuperLink's HTTP API and Control API ports. Flower's defaults
    (39091, 39093) are fixed, and a second ``flwr run`` silently submits to a SuperLink that
    is already listening there (someone else's, with another FLWR_HOME); giving each run
    free ports of its own keeps simultaneous simulations apart.
    """
    env = dict(os.environ)
    if ports is not None:
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(ports[0])
        env["FLWR_LOCAL_CONTROL_API_PORT"] = str(ports[1])
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    # Otherwise the SuperLink tries to pip-install the app's dependencies into a fresh
    # environment, which fails offline and is slow online; they are installed already.
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("RAY_DEDUP_LOGS", "0")
    return env


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports nobody listens on right now (the OS picks them)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for sock in socks:  # all bound at once, so the OS cannot hand out one port twice
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in cmdline and text in cmdline:
            pids.append(int(entry.name))
    return pids


def stop_superlink(flwr_home: Path, grace: float = 5.0) -> list[int]:
    """Stop the local SuperLink(s) whose state lives in ``flwr_home``; returns their pids."""
    pids = _processes_mentioning(str(flwr_home))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        if not _processes_mentioning(str(flwr_home)):
            break
        time.sleep(0.1)
    for pid in _processes_mentioning(str(flwr_home)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def _num(value: float) -> int | float:
    # Flower reads resources with TOML types and wants an int for whole numbers of CPUs.
    return int(value) if float(value).is_integer() else value


def flwr_run_command(
    app_dir: Path, run_config_file: Path, num_supernodes: int, cpus: float, gpus: float
) -> list[str]:
    """The ``flwr run`` command line (a list, never through a shell)."""
    federation = f"num-supernodes={num_supernodes} client-resources-num-cpus={_num(cpus)}"
    if gpus:
        federation += f" client-resources-num-gpus={_num(gpus)}"
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent)) or "flwr"
    return [
        flwr,
        "run",
        str(app_dir),
        "--run-config",
        str(run_config_file),
        "--federation-config",
        federation,
        "--stream",
    ]


def run_flower(
    cfg: RunConfig,
    *,
    app_dir: Path | None = None,
    cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0,
    flwr_home: Path | None = None,
    on_line: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> list[str]:
    """Run ``cfg`` with ``flwr run`` on Flower's simulation engine; returns the output lines.

    ``cfg.output_dir`` and ``cfg.data_root`` should be absolute: the ServerApp and the
    ClientApps run in other processes with other working directories. ``flwr run`` is given
    a scratch copy of the app's own files (:func:`stage_app`), never ``app_dir`` itself.
    """
    app_dir = app_dir or find_app_dir()
    scratch = Path(tempfile.mkdtemp(prefix="fedmerge-flwr-"))
    home = flwr_home or scratch / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    run_config_file = write_run_config(cfg.to_mapping(), scratch / "run-config.toml")
    # Flower gets a copy of the app's own files: not a virtualenv, results or tests inside it.
    staged = stage_app(app_dir, scratch / "app")
    cmd = flwr_run_command(
        staged, run_config_file, cfg.num_clients, cpus_per_client, gpus_per_client
    )
    log.info("running: %s (FLWR_HOME=%s)", " ".join(cmd), home)
    env = flower_env(home, tuple(free_ports(2)))  # type: ignore[arg-type]
    # The ServerApp runs in a process of the SuperLink that `flwr run` detaches: if this
    # process is killed, the ServerApp sees this pid gone and stops (strategies/server_app.py),
    # so that nothing writes to the run folder that `fedmerge run --resume` continues.
    env[LAUNCHER_ENV] = str(os.getpid())
    lines: list[str] = []
    proc = subprocess.Popen(
        cmd,
        cwd=staged,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    start = time.monotonic()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if on_line:
                on_line(line)
            if timeout is not None and time.monotonic() - start > timeout:
                raise FedmergeError(f"flwr run exceeded {timeout:.0f} s; stopped it")
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        stopped = stop_superlink(home)
        shutil.rmtree(scratch, ignore_errors=True)
    if not stopped and proc.returncode == 0:
        # The run's ports were free when chosen; had another SuperLink taken them first,
        # `flwr run` would have submitted to it, where the run gets that SuperLink's
        # environment and log file. Say so instead of passing it over.
        log.warning(
            "flwr run finished, but no SuperLink serving this run's FLWR_HOME (%s) was found: "
            "the run was probably served by a SuperLink this engine did not start, with that "
            "SuperLink's environment and log (docs/flower-apps.md, 'A SuperLink left "
            "running')",
            home,
        )
    if proc.returncode != 0:
        tail = "\n".join(lines[-25:])
        raise FedmergeError(f"flwr run failed (exit {proc.returncode}); its last lines:\n{tail}")
    return lines


# -- an orphaned run stops (runs in the ServerApp's process, under flwr run) -----------------
def watch_launcher(pid: int, interval: float = 1.0, grace: float = 10.0) -> threading.Thread:
    """Stop this run when the fedmerge process that launched it (``pid``) is gone.

    Under ``fedmerge run --engine flower`` the ServerApp lives in a process of the SuperLink
    that ``flwr run`` detaches: killing ``fedmerge run`` would leave it running, writing to
    the run folder that ``--resume`` continues. A daemon thread checks every ``interval`` s;
    when the launcher is gone, it stops what the launcher would have stopped: the SuperLink
    it started for this run (an ancestor of this process, recognised by this run's scratch
    ``FLWR_HOME``) and this process (SIGTERM: Flower's graceful exit, which stops Ray; SIGKILL
    ``grace`` s later if they still run). It sets :data:`LAUNCHER_GONE` first, after which the
    ServerApp writes no metrics and no checkpoint: the one on disk is the last round finished
    before, as after any kill.
    """

    def watch() -> None:
        while process_alive(pid):
            time.sleep(interval)
        LAUNCHER_GONE.set()  # from now on the ServerApp writes nothing (RoundRecorder)
        log.error(
            "the fedmerge process that launched this run (pid %d) is gone: stopping; "
            "`fedmerge run --resume RUN_DIR` continues from the last checkpoint",
            pid,
        )
        superlink = _own_superlink()
        for target in (superlink, os.getpid()):
            if target is not None:
                _signal(target, signal.SIGTERM)
        time.sleep(grace)
        for target in (superlink, os.getpid()):
            if target is not None and process_alive(target):
                _signal(target, signal.SIGKILL)

    thread = threading.Thread(target=watch, name="fedmerge-launcher-watch", daemon=True)
    thread.start()
    return thread


def _own_superlink(levels: int = 4) -> int | None:
    """The pid of the ``flower-superlink`` ancestor serving this run's ``FLWR_HOME``, if any."""
    home = os.environ.get("FLWR_HOME", "").encode()
    pid = os.getppid()
    for _ in range(levels):
        if pid <= 1 or not home:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None
        if b"flower-superlink" in cmdline and home in cmdline:
            return pid
        pid = ppid
    return None


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:  # gone already
        pass
