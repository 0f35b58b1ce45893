"""Results sinks: where the row of every evaluated round goes.

The ServerApp's recorder (``strategies/server_app.py::RoundRecorder``) evaluates the global model
after every round and builds one **row**: the dict that becomes one entry of ``metrics.json``
(``round``, ``test-loss``, ``test-accuracy``, timings, the clients' aggregated metrics; values
are numbers, or lists of numbers for per-layer metrics such as ``scope-mu``). It hands the row to
every sink that the run-config key ``log`` names, then writes the checkpoint.

A sink is any object with three methods (:class:`ResultsSink`)::

    start(config, run_dir, rows)   once, before the first round: the run-config (keys as in
                                   pyproject.toml), the results folder, and the rows already
                                   recorded (a resumed run: those of its checkpoint; else [])
    round(row)                     after every evaluated round, in order
    close()                        once, at the end of the run, also when it failed

:data:`SINKS` maps the names ``log`` accepts to zero-argument factories (usually the class).
``files`` (:class:`FileSink`: ``metrics.json`` and ``metrics.csv``) is always used, named or
not: resuming, plotting and ``fedmerge`` itself read those files. A user adds a sink by
registering it before the run starts, in the process that runs the ServerApp (the local
engine's is the caller's own)::

    import fedmerge.sinks

    class LogSink(fedmerge.sinks.BaseSink):
        def round(self, row):
            logging.getLogger("my-sink").info("%s %s", row["round"], row["test-accuracy"])

    fedmerge.sinks.SINKS["mine"] = LogSink
    fedmerge.runner.run(RunConfig.from_mapping({"log": "files,mine"}), "local")

A sink whose package is optional declares ``requires = (module, pip requirement)``; a run that
names it without the module installed is refused up front (:func:`check_log`).

Nothing here imports Flower.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .errors import ConfigError
from .run_files import write_metrics

#: The sink every run writes to, whether ``log`` names it or not.
FILES = "files"


@runtime_checkable
class ResultsSink(Protocol):
    """What the recorder calls; see the module docstring for when."""

    def start(
        self, config: Mapping[str, Any], run_dir: Path, rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """Prepare for a run (``rows``: those already recorded, when it is resumed)."""

    def round(self, row: Mapping[str, Any]) -> None:
        """Record one evaluated round's row."""

    def close(self) -> None:
        """Release what the sink holds; called once, also when the run failed."""


class BaseSink:
    """A sink that does nothing: subclass it and override what you need.

    Attributes
    ----------
    config : dict
        The run-config (set by :meth:`start`).
    run_dir : Path
        The results folder (set by :meth:`start`).
    """

    config: dict[str, Any]
    run_dir: Path

    def start(
        self, config: Mapping[str, Any], run_dir: Path, rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """Remember the config and the folder."""
        self.config, self.run_dir = dict(config), Path(run_dir)

    def round(self, row: Mapping[str, Any]) -> None:
        """Nothing."""

    def close(self) -> None:
        """Nothing."""


class FileSink(BaseSink):
    """``metrics.json`` and ``metrics.csv`` in the run folder, rewritten after every round.

    Both are written atomically (``fedmerge.results.write_metrics``), so an interrupted run
    keeps every round it finished. A resumed run starts from its checkpoint's rows: rows
    written after that checkpoint are dropped at :meth:`start` (they are recomputed).
    ``config.json``, ``model.pt``, the plots and ``checkpoint.pt`` are the ServerApp's own.
    """

    def start(
        self, config: Mapping[str, Any], run_dir: Path, rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """Keep the rows already recorded; a resumed run rewrites the files with them."""
        super().start(config, run_dir, rows)
        self.rows = [dict(r) for r in rows]
        if self.rows:
            self._write()

    def round(self, row: Mapping[str, Any]) -> None:
        """Append ``row`` and rewrite both files."""
        self.rows.append(dict(row))
        self._write()

    def _write(self) -> None:
        write_metrics(self.run_dir, self.rows)


class TensorBoardSink(BaseSink):
    """TensorBoard event files in ``<run_dir>/tensorboard`` (``tensorboard --logdir runs/``).

    Every numeric metric of a row is one scalar with ``global_step`` = the round; a list-valued
    metric (per layer: ``scope-mu``, ``scope-sigma``, ...) is one scalar per element, tagged
    ``name/0``, ``name/1``, ...; other values (text) are skipped. The run-config is logged once,
    as a text table (tag ``config``). The writer is flushed after every round.

    Resuming: rounds up to the checkpoint's are not logged again, and the writer opens with
    ``purge_step`` = the first round still to come, so that TensorBoard's reader hides what
    an interrupted run logged after its last checkpoint (that round is recomputed and logged
    anew). A fresh run opens with ``purge_step = 0``: events of a run that ``--overwrite``
    replaced are hidden the same way.

    Raises
    ------
    ConfigError
        ``tensorboard`` is not installed (``pip install "fedmerge[tensorboard]"``).
    """

    requires = ("tensorboard", "fedmerge[tensorboard]")
    folder = "tensorboard"

    def __init__(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing_package("tensorboard", *self.requires) from None
        self._writer_class = SummaryWriter
        self._writer: Any = None
        self._next_step = 0

    def start(
        self, config: Mapping[str, Any], run_dir: Path, rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """Open the writer after the rounds already recorded; log the config on a fresh run."""
        super().start(config, run_dir, rows)
        self._next_step = max((int(r["round"]) + 1 for r in rows), default=0)
        self._writer = self._writer_class(
            log_dir=str(self.run_dir / self.folder), purge_step=self._next_step
        )
        if not rows:
            self._writer.add_text("config", config_table(config), global_step=0)
        self._writer.flush()

    def round(self, row: Mapping[str, Any]) -> None:
        """One scalar per numeric value (and per list element) at step ``row["round"]``."""
        step = int(row["round"])
        if step < self._next_step:  # logged before the interruption this run resumes
            return
        for tag, value in scalars(row):
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()
        self._next_step = step + 1

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def scalars(row: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """``(tag, value)`` of every number in ``row`` but ``round``; lists as ``name/i``."""
    for key, value in row.items():
        if key == "round":
            continue
        if _is_number(value):
            yield key, float(value)
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                if _is_number(item):
                    yield f"{key}/{i}", float(item)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float)  # bool is an int: logged as 0 / 1


def config_table(config: Mapping[str, Any]) -> str:
    """The run-config as a Markdown table (TensorBoard's text tab renders it)."""
    lines = ["| key | value |", "|---|---|"]
    lines += [f"| {key} | `{value!r}` |" for key, value in config.items()]
    return "\n".join(lines)


#: Sink names the run-config key ``log`` accepts, and their factories.
SINKS: dict[str, Callable[[], ResultsSink]] = {
    FILES: FileSink,
    "tensorboard": TensorBoardSink,
}


def sink_names(log: str) -> tuple[str, ...]:
    """The sinks ``log`` names (comma separated), ``files`` first, each once.

    Raises
    ------
    ConfigError
        A name that is not in :data:`SINKS`; the message lists the valid ones.
    """
    names = [FILES]
    for name in (part.strip() for part in log.split(",")):
        if name and name not in SINKS:
            raise ConfigError(
                "log",
                log,
                "comma-separated sink names from: " + ", ".join(SINKS),
                f"unknown sink {name!r}; {FILES} is always written",
            )
        if name and name not in names:
            names.append(name)
    return tuple(names)


def check_log(log: str) -> tuple[str, ...]:
    """:func:`sink_names`, and every sink's optional package installed (``requires``)."""
    names = sink_names(log)
    for name in names:
        requires = getattr(SINKS[name], "requires", None)
        if requires is not None and importlib.util.find_spec(requires[0]) is None:
            raise missing_package(name, *requires)
    return names


def missing_package(sink: str, module: str, requirement: str) -> ConfigError:
    """The error for a sink whose package is not installed, naming the extra to install."""
    return ConfigError(
        "log",
        sink,
        "sinks whose packages are installed",
        f'the {sink} sink needs the package {module}: pip install "{requirement}"',
    )


def make_sinks(log: str) -> list[ResultsSink]:
    """A fresh instance of every sink ``log`` names (:func:`check_log` first)."""
    return [SINKS[name]() for name in check_log(log)]
