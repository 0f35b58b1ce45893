"""``fedmerge bench``: run a grid of simulations, resumably, and report on it.

    fedmerge bench SPEC.toml|PRESET [--out DIR] [--jobs N] [--threads N] [--data-root DIR]
        [--target-accuracy A] [--dry-run] [--report]
    python -m fedmerge.bench.grid ...        (the same, without the fedmerge command)

The spec (a TOML file, or a preset: ``niid-bench``, ``quick``) is described in
:mod:`fedmerge.bench.grid_spec`. Every cell is one local-engine simulation; every cell's
run-config, strategy name, data files and partition are checked before the first cell starts.
It is fedmerge's one grid runner; folders written by the sweep runner of earlier versions have
its layout, so the bench resumes them and ``--report`` rebuilds their report.

The results folder (``--out``, default ``runs/bench-<spec name>``)::

    spec.toml                 the spec, copied at every run (``--report`` alone reads it)
    <cell path>/              a finished cell: config.json, metrics.json / .csv, accuracy.png,
                              partition.json (label counts per client), done.json
    <cell parent>/.s0.partial a cell in progress; removed and run again when the bench restarts
    report.md, summary.json, results.csv, accuracy-<dataset>.png (per round, seed bands),
    final-accuracy-<dataset>.png and best-accuracy-<dataset>.png (per variant, mean ± std),
    partitions-<dataset>.png

Crash safety: a cell runs in its ``.partial`` folder and is renamed into place once its
metrics, label counts and ``done.json`` are written, so a cell folder always holds a finished
run, and a killed bench loses at most the cells in progress. A cell folder whose config
differs from the spec's (the spec changed since) stops the bench with an error rather than
mixing results. A lock file keeps two benches from writing into one folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import FedmergeError
from ..processes import available_cpus, process_alive
from .grid_spec import BenchSpec, Cell, load_spec, preset_names

# Nothing here imports torch at import time: `fedmerge`'s parser imports this module for
# every command, so torch, the results and the report are imported where they are used.

DESCRIPTION = (
    "Run a benchmark grid (strategies x datasets x partitions x seeds x other keys), one "
    "simulation per cell, resumably; write a results table, plots and a Markdown report."
)
DONE_FILE = "done.json"
PARTITION_FILE = "partition.json"
LOCK_FILE = ".bench.lock"
DATA_ROOT_ENV = "FEDMERGE_DATA_ROOT"
#: Config keys that may differ between a finished cell and the spec: paths of this machine,
#: and the worker processes (results do not depend on them; the bench sets them per --jobs).
_PATH_KEYS = ("output-dir", "run-name", "data-root", "workers")
#: Seconds between two progress lines of one cell (its rounds as they finish).
PROGRESS_EVERY = 30.0


# -- the state of the results folder ----------------------------------------------------------
def partial_dir(out: Path, cell: Cell) -> Path:
    """The folder a cell runs in before it is renamed into place."""
    final = out / cell.path
    return final.parent / f".{final.name}.partial"


def is_done(folder: Path, num_rounds: int) -> bool:
    """A cell folder holds a finished run: every round's metrics (round 0 included)."""
    from ..results import read_metrics

    try:
        return len(read_metrics(folder)) == num_rounds + 1
    except (OSError, ValueError):
        return False


def split_cells(spec: BenchSpec, out: Path) -> tuple[list[Cell], list[Cell]]:
    """``(done, todo)`` among the cells whose keys are known (a tuned row's once its trials
    chose). A finished cell whose config differs from the spec's raises."""
    done, todo = [], []
    for cell in spec.cells():
        if not spec.ready(cell):
            continue
        cfg = spec.config(cell, out)
        folder = out / cell.path
        if is_done(folder, cfg.num_rounds):
            _check_same_config(folder, cfg, cell)
            done.append(cell)
        else:
            todo.append(cell)
    return done, todo


def split_trials(spec: BenchSpec, out: Path) -> list[tuple[Cell, str]]:
    """The trials (``[tune]``) not finished in ``out``; a finished one whose config differs
    from the spec's raises."""
    todo = []
    for cell, label in spec.trial_cells():
        cfg = spec.trial_config(cell, label, out)
        folder = out / spec.trial_path(cell, label)
        if is_done(folder, cfg.num_rounds):
            _check_same_config(folder, cfg, cell)
        else:
            todo.append((cell, label))
    return todo


def _check_same_config(folder: Path, cfg: RunConfig, cell: Cell) -> None:
    from ..results import CONFIG_JSON

    try:
        old = json.loads((folder / CONFIG_JSON).read_text())["config"]
    except (OSError, ValueError, KeyError):
        return  # no record to compare with (a run of another tool): trust the layout
    new = cfg.to_mapping()
    for key in sorted(set(old) & set(new) - set(_PATH_KEYS)):
        if old[key] != new[key]:
            raise FedmergeError(
                f"{folder} holds cell {cell.label} run with {key}={old[key]!r}, but the spec "
                f"now gives {key}={new[key]!r}: use another --out, or remove that folder to "
                "run the cell again"
            )


@contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock file while writing into it; a lock of a dead process is stale."""
    lock = out / LOCK_FILE
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            pid = _read_pid(lock)
            if pid and pid != os.getpid() and process_alive(pid):
                raise FedmergeError(
                    f"another fedmerge bench (pid {pid}) is writing to {out}; wait for it to "
                    f"end, or remove {lock} if no bench runs"
                ) from None
            lock.unlink(missing_ok=True)
    else:
        raise FedmergeError(f"could not take the lock {lock}")
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


# -- checks before anything runs ---------------------------------------------------------------
def preflight(spec: BenchSpec, cells: list[Cell], out: Path) -> None:
    """Load the data, draw the partition and build the model once per distinct setting of
    ``cells`` (first seed), so a missing file or an infeasible partition stops the bench
    before the first cell rather than in the middle of the grid."""
    from ..federation import DataSpec
    from ..runner import prepare

    seen = set()
    for cell in cells:
        cfg = spec.config(cell, out)
        model = (cfg.model, cfg.model_width, cfg.model_norm, cfg.mlp_hidden, cfg.device)
        key = (DataSpec.of(cfg.replace(seed=spec.seeds[0])), model)
        if key in seen:
            continue
        seen.add(key)
        try:
            prepare(cfg.replace(run_name=""))  # "" = no folder is claimed or checked
        except FedmergeError as exc:
            raise FedmergeError(f"{spec.source}, cell {cell.label}: {exc}") from None


# -- running cells ------------------------------------------------------------------------------
class _CellProgress:
    """Prints a cell's latest round every :data:`PROGRESS_EVERY` seconds while it runs."""

    def __init__(self, label: str, num_rounds: int, every: float = PROGRESS_EVERY) -> None:
        self.label, self.num_rounds, self.every = label, num_rounds, every
        self.last = time.monotonic()

    def __call__(self, row: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self.last < self.every or int(row["round"]) >= self.num_rounds:
            return
        self.last = now
        split = "validation" if self.label.startswith("tune/") else "test"
        print(
            f"  ... {self.label}: round {int(row['round'])}/{self.num_rounds}, "
            f"{split}-accuracy {float(row['test-accuracy']):.4f}",
            flush=True,
        )


def run_cell(folder: str, cfg_map: dict[str, Any], threads: int, label: str = "") -> float:
    """Run one cell in its partial folder, then rename it to ``folder``; returns seconds.

    Top-level (picklable): worker processes call it. Prints the cell's progress (``label``)
    every :data:`PROGRESS_EVERY` seconds.
    """
    import torch

    from ..results import CONFIG_JSON, write_json
    from ..runner import quiet_flower, run

    final, cfg = Path(folder), RunConfig.from_mapping(cfg_map)
    partial = Path(cfg.output_dir) / cfg.run_name
    _forget_shards()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    quiet_flower()
    try:
        shutil.rmtree(partial, ignore_errors=True)  # left by a killed bench
        start = time.perf_counter()
        run(cfg, "local", on_round=_CellProgress(label or final.name, cfg.num_rounds))
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    write_json(partial / PARTITION_FILE, _label_counts(cfg))
    record = json.loads((partial / CONFIG_JSON).read_text())
    record["config"]["run-name"] = final.name  # the name it has once in place
    write_json(partial / CONFIG_JSON, record)
    write_json(
        partial / DONE_FILE,
        {
            "seconds": seconds,
            "threads": threads,
            "workers": cfg.workers,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    shutil.rmtree(final, ignore_errors=True)  # an unfinished folder (not made by the bench)
    os.replace(partial, final)
    return seconds


def _forget_shards() -> None:
    """Drop the previous cell's subsets, partitions and shards (a process runs many cells;
    each holds up to a copy of the training split). Files stay cached: cells share them."""
    from .. import federation

    federation.client_shard.cache_clear()
    federation.partition_indices.cache_clear()
    federation.load_data.cache_clear()


def _label_counts(cfg: RunConfig) -> dict[str, Any]:
    from ..federation import DataSpec, load_data, partition_indices
    from ..partitions import label_counts

    spec = DataSpec.of(cfg)
    data = load_data(spec)
    counts = label_counts(list(partition_indices(spec)), data.y_train.numpy(), data.num_classes)
    return {"dataset": cfg.dataset, "partition": cfg.partition, "seed": cfg.seed,
            "counts": counts.astype(int).tolist()}  # fmt: skip


class _Once(logging.Filter):
    """Let each warning text through once: every cell recomputes its partition and would
    repeat e.g. the label-quantity warning hundreds of times."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


@contextmanager
def quiet_repeats() -> Iterator[None]:
    """While the bench runs, let each warning text through the root handlers only once."""
    handlers = logging.getLogger().handlers
    once = _Once()
    for handler in handlers:
        handler.addFilter(once)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(once)


def _worker_init(parent: int) -> None:
    """Worker initializer: quiet repeated warnings; exit when the bench dies (SIGKILL leaves
    workers orphaned, and an orphan would go on writing a cell the restarted bench runs)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Once())
    threading.Thread(target=watch, daemon=True).start()


def workers_per_job(jobs: int) -> int:
    """Worker processes of each of ``jobs`` cells running at once: CPUs // jobs, at least 1."""
    return max(1, available_cpus() // jobs)


def cell_workers(cfg: RunConfig, jobs: int) -> RunConfig:
    """``cfg`` with its ``workers`` set so that ``jobs`` cells at once fill, not oversubscribe,
    the CPUs: a cell that leaves ``workers`` to the engine (0) gets :func:`workers_per_job`."""
    if cfg.workers != 0:
        return cfg
    return cfg.replace(workers=workers_per_job(jobs))


Task = tuple[str, Path, RunConfig]  # (label, final folder, config writing to its partial)


def cell_tasks(spec: BenchSpec, out: Path, cells: list[Cell], jobs: int) -> list[Task]:
    """The tasks of ``cells``: each runs in its partial folder, then moves into place."""
    return [
        (
            cell.label,
            out / cell.path,
            cell_workers(spec.config(cell, out, partial_dir(out, cell).name), jobs),
        )
        for cell in cells
    ]


def trial_tasks(
    spec: BenchSpec, out: Path, trials: list[tuple[Cell, str]], jobs: int
) -> list[Task]:
    """The tasks of ``trials`` (``[tune]``), in their folders under ``tune/``."""
    tasks = []
    for cell, label in trials:
        final = out / spec.trial_path(cell, label)
        cfg = spec.trial_config(cell, label, out, f".{final.name}.partial")
        tasks.append((final.relative_to(out).as_posix(), final, cell_workers(cfg, jobs)))
    return tasks


def run_cells(
    spec: BenchSpec, out: Path, cells: list[Cell], *, jobs: int, threads: int
) -> list[tuple[str, str]]:
    """Run ``cells`` (``jobs`` processes at a time; ``jobs == 1`` runs them in this process)
    and print a line per finished cell. Returns the failed cells' labels with their errors."""
    return run_tasks(cell_tasks(spec, out, cells, jobs), jobs=jobs, threads=threads)


def run_tasks(tasks: list[Task], *, jobs: int, threads: int) -> list[tuple[str, str]]:
    """Run cells or trials given as tasks; see :func:`run_cells`."""
    from ..results import read_metrics

    failed: list[tuple[str, str]] = []
    start = time.perf_counter()

    def finished(i: int, task: Task, seconds: float | None, error: str | None) -> None:
        label, folder, _ = task
        eta = (time.perf_counter() - start) / i * (len(tasks) - i)
        if error is None:
            acc = read_metrics(folder)[-1]["test-accuracy"]
            what = f"test-accuracy {acc:.4f}, {seconds:.1f} s"
            if label.startswith("tune/"):
                what = what.replace("test-accuracy", "validation-accuracy")
        else:
            failed.append((label, error))
            what = f"FAILED: {error}"
        print(f"[{i}/{len(tasks)}] {label}: {what}  (ETA {eta / 60:.1f} min)", flush=True)

    if jobs == 1:
        for i, task in enumerate(tasks, 1):
            label, folder, cfg = task
            try:
                seconds = run_cell(str(folder), cfg.to_mapping(), threads, label)
            except Exception as exc:  # noqa: BLE001  (one failed cell must not stop the grid)
                finished(i, task, None, f"{type(exc).__name__}: {exc}")
            else:
                finished(i, task, seconds, None)
        return failed
    pool = ProcessPoolExecutor(
        jobs, mp_context=get_context("spawn"), initializer=_worker_init, initargs=(os.getpid(),)
    )
    with pool, _stopped_on_interrupt(pool):
        futures = {
            pool.submit(run_cell, str(task[1]), task[2].to_mapping(), threads, task[0]): task
            for task in tasks
        }
        for i, fut in enumerate(as_completed(futures), 1):
            try:
                seconds = fut.result()
            except BrokenProcessPool:
                raise FedmergeError(
                    "a worker process died (out of memory?); finished cells are kept: run the "
                    "same command again, with fewer --jobs"
                ) from None
            except Exception as exc:  # noqa: BLE001  (one failed cell must not stop the grid)
                finished(i, futures[fut], None, f"{type(exc).__name__}: {exc}")
            else:
                finished(i, futures[fut], seconds, None)
    return failed


@contextmanager
def _stopped_on_interrupt(pool: ProcessPoolExecutor) -> Iterator[None]:
    """On Ctrl-C (or a SIGINT sent to this process alone), stop the cells in progress rather
    than wait for them: leaving the pool waits for its running cells, which take minutes. Their
    partial folders are removed when the bench runs again."""
    try:
        yield
    except KeyboardInterrupt:
        # The pool's processes (a private attribute of ProcessPoolExecutor, stable since 3.8).
        processes = list(getattr(pool, "_processes", {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                process.kill()
        raise


def default_threads(jobs: int) -> int:
    """Torch threads per cell: the CPUs shared among the jobs, at most torch's own default
    (which follows ``OMP_NUM_THREADS``)."""
    import torch

    return max(1, min(torch.get_num_threads(), available_cpus() // jobs))


def run_bench(
    spec: BenchSpec, out: Path, *, jobs: int | None = None, threads: int | None = None
) -> list[tuple[str, str]]:
    """Run every trial and cell of ``spec`` not yet finished in ``out``; returns the failed
    ones (label, error).

    With a ``[tune]`` table the trials run first (on the validation split); each tuned row's
    cells then run with the keys its trials chose (:mod:`fedmerge.bench.tuning`). A row
    whose trials did not all finish does not run.

    Parameters
    ----------
    spec : BenchSpec
        The grid.
    out : Path
        The results folder (created; ``spec.toml`` is copied into it).
    jobs : int, optional
        Cells run at a time in separate processes (default: CPUs, at most the cells to run).
    threads : int, optional
        Torch threads per cell (default: :func:`default_threads`).
    """
    from .tuning import choose

    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out):
        (out / "spec.toml").write_text(spec.text)
        failed: list[tuple[str, str]] = []
        trials = split_trials(spec, out)
        if trials:
            jobs_now = max(1, min(jobs or available_cpus(), len(trials)))
            print(
                f"{spec.source}: {len(trials)} of {len(spec.trial_cells())} tuning trials to "
                f"run (scored on {spec.tuning.validation_size if spec.tuning else 0} held-out "
                "training samples, not the test split)",
                flush=True,
            )
            preflight(spec, [c for c, _ in trials], out)
            failed += run_tasks(
                trial_tasks(spec, out, trials, jobs_now),
                jobs=jobs_now,
                threads=threads or default_threads(jobs_now),
            )
        if spec.tuning is not None:
            spec = spec.with_choices(choose(spec, out))
            waiting = {c.group for c in spec.cells() if not spec.ready(c)}
            for group in waiting:
                print(f"not run: {'/'.join(p for p in group if p)} (its tuning trials failed)")
        done, todo = split_cells(spec, out)
        jobs = max(1, min(jobs or available_cpus(), len(todo) or 1))
        threads = threads or default_threads(jobs)
        workers = workers_per_job(jobs)
        print(
            f"{spec.source}: {len(done)} of {len(done) + len(todo)} cells done; running "
            f"{len(todo)} with {jobs} job(s), each with {workers} worker process(es) unless "
            f"the spec sets workers; results in {out}",
            flush=True,
        )
        if not todo:
            return failed
        preflight(spec, todo, out)
        if jobs > 1:  # the workers load their own copies
            from ..datasets import clear_dataset_cache

            _forget_shards()
            clear_dataset_cache()
        return failed + run_cells(spec, out, todo, jobs=jobs, threads=threads)


def dry_run(spec: BenchSpec, out: Path, jobs: int | None) -> None:
    """Print every cell with its state, the counts, and a time estimate from finished cells."""
    trials = set(split_trials(spec, out))
    for cell, label in spec.trial_cells():
        state = "to run" if (cell, label) in trials else "done  "
        print(f"  {state}  {spec.trial_path(cell, label).as_posix()} (tuning trial)")
    if spec.tuning is not None:
        from .tuning import read_choices

        spec = read_choices(spec, out)
    done, todo = split_cells(spec, out)
    axes = [
        (len(spec.datasets), "datasets"),
        (len(spec.partitions), "partitions"),
        (len(spec.variants), "variants"),
        (len(spec.combos) if "" not in spec.combos else 0, "grid combinations"),
        (len(spec.seeds), "seeds"),
    ]
    shape = " x ".join(f"{n} {name}" for n, name in axes if n)
    waiting = set(todo)
    for cell in spec.cells():
        state = "to run" if cell in waiting else "done  "
        if not spec.ready(cell):
            state = "to run"
            print(f"  {state}  {cell.label} (after its tuning trials)")
            continue
        print(f"  {state}  {cell.label}")
    later = sum(not spec.ready(c) for c in spec.cells())
    after = f" (and {later} after their tuning trials)" if later else ""
    print(f"{spec.source}: {len(done) + len(todo) + later} cells ({shape}); {len(done)} done, "
          f"{len(todo)} to run{after}; results in {out}")  # fmt: skip
    measured = [_cell_seconds(out / c.path) for c in done]
    seconds = [s for s in measured if s is not None]
    if todo and seconds:
        jobs = max(1, min(jobs or available_cpus(), len(todo)))
        estimate = sum(seconds) / len(seconds) * len(todo) / jobs
        print(f"estimated time: {estimate / 60:.1f} min with {jobs} job(s) "
              f"(mean of {len(seconds)} finished cell(s))")  # fmt: skip
    print("nothing was run (--dry-run); data files are checked when the cells run")


def _cell_seconds(folder: Path) -> float | None:
    try:
        return float(json.loads((folder / DONE_FILE).read_text())["seconds"])
    except (OSError, ValueError, KeyError):
        return None


# -- command line --------------------------------------------------------------------------------
def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand to the ``fedmerge`` command's subparsers."""
    p = sub.add_parser(
        "bench",
        help="run a benchmark grid (strategies x datasets x partitions x seeds), resumably",
        description=DESCRIPTION,
    )
    _arguments(p)
    p.set_defaults(func=cmd)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "spec",
        nargs="?",
        help=f"spec TOML file, or a preset ({', '.join(preset_names())}); "
        "optional with --report --out DIR (reads DIR/spec.toml)",
    )
    p.add_argument(
        "--out", type=Path, metavar="DIR", help="results folder (default: runs/bench-<spec name>)"
    )
    p.add_argument(
        "--jobs", type=int, metavar="N", help="cells at a time, in processes (default: CPUs)"
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch threads of each cell's process outside its clients and server (data "
        "loading; clients train with the cell's client-threads, the server with one) "
        "(default: CPUs // jobs, at most OMP_NUM_THREADS)",
    )
    p.add_argument(
        "--data-root",
        metavar="DIR",
        help=f"data-root of every cell (default: ${DATA_ROOT_ENV}, else the spec's)",
    )
    p.add_argument(
        "--target-accuracy",
        type=float,
        metavar="A",
        help="accuracy (0-1] for the 'rounds to target' column (default: the spec's)",
    )
    p.add_argument("--report", action="store_true", help="only rebuild the report from --out")
    p.add_argument("--dry-run", action="store_true", help="list the cells; run nothing")


def cmd(args: argparse.Namespace) -> int:
    """Run (or report on, or list) a benchmark grid; 0 when every cell finished."""
    for flag in ("jobs", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise FedmergeError(f"--{flag}: got {getattr(args, flag)}; allowed: an integer >= 1")
    target = args.target_accuracy
    if target is not None and not 0 < target <= 1:
        raise FedmergeError(f"--target-accuracy: got {target}; allowed: a fraction in (0, 1]")
    source = args.spec
    if source is None:
        if not (args.report and args.out):
            raise FedmergeError(
                "SPEC: give a spec file or a preset (" + ", ".join(preset_names()) + "); "
                "only --report --out DIR may leave it out"
            )
        source = args.out / "spec.toml"
    data_root = args.data_root or os.environ.get(DATA_ROOT_ENV)
    overrides = {"data-root": str(Path(data_root).expanduser().resolve())} if data_root else {}
    spec = load_spec(source, overrides)
    # Everything the bench will need, imported now rather than hours later: code that changes
    # on disk while a bench runs (a git pull) must not reach it half-way.
    from . import grid_report, tuning  # noqa: F401

    out = args.out or Path("runs") / f"bench-{Path(str(source)).stem}"
    if args.dry_run:
        dry_run(spec, out, args.jobs)
        return 0
    if args.report and not out.is_dir():
        raise FedmergeError(f"--out: {out} is not a results folder; nothing to report on")
    failed: list[tuple[str, str]] = []
    if not args.report:
        try:
            with quiet_repeats():
                failed = run_bench(spec, out, jobs=args.jobs, threads=args.threads)
        except KeyboardInterrupt:
            print(f"interrupted: finished cells are kept in {out}; run again to resume")
            return 130
    from .grid_report import write_report

    report = write_report(spec, out, target)
    print(f"report: {report}")
    for label, error in failed:
        print(f"failed: {label}: {error}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} cell(s) failed; run the same command again to retry them")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fedmerge.bench.grid``: the ``fedmerge bench`` command on its own."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m fedmerge.bench.grid", description=DESCRIPTION)
    _arguments(parser)
    try:
        return cmd(parser.parse_args(argv))
    except FedmergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
