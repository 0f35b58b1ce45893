"""The spec of a benchmark grid: its axes, its cells and their run-configs, checked up front.

A spec is a TOML file, or the name of a preset shipped in ``fedmerge/bench/presets/``::

    description = "what it compares"     # optional; printed in the report
    seeds = [0, 1, 2]
    target-accuracy = 0.8                # optional: rounds to reach it (or {mnist = 0.97, ...})
    last-rounds = 5                      # optional (default 5): the report's "last rounds" mean
    report-rounds = [1]                  # optional: also report the accuracy after these rounds
    datasets = ["mnist", "fashion-mnist"]  # optional axis (or [datasets.NAME] tables of keys)
    strategies = "all"                   # optional: one variant per registered strategy, or a list
    [base]                               # run-config keys shared by every cell
    [partitions.NAME]                    # one table per partition: its run-config keys
    [variants.NAME]                      # explicit variants: a strategy and its keys
    [strategy-keys.fedprox]              # keys of the variant `strategies` makes for fedprox
    [grid]                               # further axes: key = [values]; every combination runs
    headline = "final"                   # optional (default "final"): what the report leads
                                         #   with, declared before the run: "final" (last round),
                                         #   "best" (best round), "last-rounds" (last k's mean)
    [tune]                               # optional: hyper-parameters chosen on validation
    validation-size = 2000               #   training samples held out and scored instead of
                                         #   the test split (which the trials never read)
    seeds = [0]                          #   seeds of the trials (default: the first seed)
    [tune.VARIANT]                       #   a variant's grid, key = [values]: per dataset and
    proximal-mu = [0.001, 0.01, 0.1]     #   partition, the trial with the best headline
                                         #   metric on validation (mean over the tuning seeds)
                                         #   gives the keys of the variant's cells
    [published]                          # optional: published results drawn beside the runs
    source = "who, where"                #   named in the plots and tables (never run here)
    metric = "final-accuracy"            #   or "best-accuracy": the column they compare with
    [published.DATASET]                  #   a dataset label or name: per partition table name,
    c2 = { mean = 0.781, std = 0.025 }   #   accuracy as a fraction (std optional)

Every cell is one (dataset, partition, variant, grid combination, seed). Its run-config is
``[base]`` overridden by the cell's dataset, partition, combination and variant keys; one key
may come from ``[base]`` and one axis, never from two axes (the merge order never matters).
Specs without a dataset axis and without ``[grid]`` (seeds, base, partitions, variants: the
sweep runner's of earlier versions) are bench specs too, and their folders the bench's (see
:attr:`Cell.path`).

Tuning: each ``[tune.VARIANT]`` combination is a *trial*, run for every (dataset, partition,
grid combination) of the variant with ``validation-size`` set, so it is scored on training
samples held out for the purpose (:func:`fedmerge.datasets.load_dataset`), never on the test
split; trials live under ``tune/`` in the results folder. The chosen keys (see
:mod:`fedmerge.bench.tuning`) are the last layer of the variant's cells; until every trial of
a row finished, that row's cells do not run.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import logging
import re
import statistics
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import ConfigError, FedmergeError, unknown_name

log = logging.getLogger(__name__)

TOP_LEVEL_KEYS = (
    "description",
    "seeds",
    "target-accuracy",
    "last-rounds",
    "report-rounds",
    "datasets",
    "strategies",
    "base",
    "partitions",
    "variants",
    "strategy-keys",
    "grid",
    "headline",
    "tune",
    "published",
)
#: The per-seed accuracies a spec may declare as its headline (and tune on).
HEADLINES = ("final", "best", "last-rounds")
#: Keys of ``[tune]`` itself; its tables are the variants' grids.
TUNE_KEYS = ("validation-size", "seeds")
#: The summary columns a ``[published]`` result can stand beside.
PUBLISHED_METRICS = ("final-accuracy", "best-accuracy")
#: Keys the bench sets itself for every cell: a spec table must not set them.
RESERVED_KEYS = {
    "seed": "list the seeds in `seeds = [...]`",
    "output-dir": "results go to `fedmerge bench --out DIR`",
    "run-name": "the bench names each cell's folder",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=,-]*$")


@dataclass(frozen=True, order=True)
class Cell:
    """One simulation of the grid. Empty labels mean the spec has no such axis."""

    dataset: str
    partition: str
    variant: str
    combo: str
    seed: int

    @property
    def group(self) -> tuple[str, str, str, str]:
        """The cell without its seed: the row of the results table it counts toward."""
        return (self.dataset, self.partition, self.variant, self.combo)

    @property
    def path(self) -> Path:
        """The cell's folder relative to the results folder: ``[dataset/]partition/variant/
        [combo/]s<seed>``; without a dataset axis and a grid, ``partition/variant/s<seed>``
        (the layout of the tables' folders made from ``fedmerge/bench/specs/*.toml``, which the
        bench resumes and reports on)."""
        return Path(*[p for p in self.group if p], f"s{self.seed}")

    @property
    def label(self) -> str:
        """``dataset/partition/variant/s0``: how progress lines and the report name it."""
        return self.path.as_posix()


@dataclass(frozen=True)
class Published:
    """Published results of a ``[published]`` table: compared with, never run."""

    source: str
    #: the summary column they stand beside (one of :data:`PUBLISHED_METRICS`)
    metric: str
    #: dataset label or name -> partition name -> (mean, std or None), as fractions
    values: dict[str, dict[str, tuple[float, float | None]]]


@dataclass(frozen=True)
class Tuning:
    """A ``[tune]`` table: the validation split and, per variant, its trials."""

    validation_size: int
    seeds: tuple[int, ...]
    #: variant -> trial label (``key=value,...``) -> its keys
    trials: dict[str, dict[str, dict[str, Any]]]


@dataclass(frozen=True)
class BenchSpec:
    """A parsed, validated grid (see the module docstring for the TOML form)."""

    source: str
    text: str
    seeds: tuple[int, ...]
    base: dict[str, Any]
    datasets: dict[str, dict[str, Any]]
    partitions: dict[str, dict[str, Any]]
    variants: dict[str, dict[str, Any]]
    combos: dict[str, dict[str, Any]]
    description: str = ""
    target_accuracy: float | dict[str, float] | None = None
    #: the report averages each seed's accuracy over its last this-many rounds (fewer if the
    #: run has fewer): steadier than the final round where accuracy swings from round to round
    last_rounds: int = 5
    #: rounds whose accuracy the report gives too, pivoted and paired (e.g. round 1: the first
    #: merge, where independently initialised clients differ most)
    report_rounds: tuple[int, ...] = ()
    #: where each variant's keys come from (``variants.NAME`` or ``strategy-keys.NAME``)
    variant_tables: dict[str, str] = field(default_factory=dict)
    #: keys applied over every cell (``--data-root`` / ``FEDMERGE_DATA_ROOT``)
    overrides: dict[str, Any] = field(default_factory=dict)
    #: the ``[published]`` table, if any
    published: Published | None = None
    #: the per-seed accuracy the report leads with (one of :data:`HEADLINES`)
    headline: str = "final"
    #: the ``[tune]`` table, if any
    tuning: Tuning | None = None
    #: per row (:attr:`Cell.group`) of a tuned variant, the keys its trials chose
    chosen: dict[tuple[str, str, str, str], dict[str, Any]] = field(default_factory=dict)

    def cells(self) -> list[Cell]:
        """Every cell, in run order (dataset, partition, variant, combination, seed)."""
        axes = (self.datasets or {"": {}}, self.partitions, self.variants, self.combos)
        return [Cell(d, p, v, c, s) for d, p, v, c in itertools.product(*axes) for s in self.seeds]

    def groups(self) -> list[tuple[str, str, str, str]]:
        """Every row of the results table, in cell order."""
        return list(dict.fromkeys(cell.group for cell in self.cells()))

    def keys(self, cell: Cell, *, chosen: bool = True) -> dict[str, Any]:
        """The run-config keys of ``cell`` (without seed, output-dir and run-name);
        ``chosen=False`` leaves out the keys its trials chose."""
        merged: dict[str, Any] = {}
        for _, table in self._layers(cell, chosen=chosen):
            merged.update(table)
        return merged

    # -- tuning ----------------------------------------------------------------------------
    def is_tuned(self, group: tuple[str, str, str, str]) -> bool:
        """Whether a row's variant has a ``[tune.VARIANT]`` grid."""
        return self.tuning is not None and group[2] in self.tuning.trials

    def ready(self, cell: Cell) -> bool:
        """Whether ``cell``'s keys are known: its variant is not tuned, or its trials chose."""
        return not self.is_tuned(cell.group) or cell.group in self.chosen

    def trial_cells(self) -> list[tuple[Cell, str]]:
        """Every trial: ``(cell, trial label)``, the cell of a tuned row at a tuning seed."""
        if self.tuning is None:
            return []
        return [
            (Cell(*group, seed), label)
            for group in self.groups()
            if self.is_tuned(group)
            for label in self.tuning.trials[group[2]]
            for seed in self.tuning.seeds
        ]

    @staticmethod
    def trial_path(cell: Cell, label: str) -> Path:
        """A trial's folder relative to the results folder: ``tune/<row>/<trial>/s<seed>``."""
        return Path("tune", *[p for p in cell.group if p], label, f"s{cell.seed}")

    def trial_config(
        self, cell: Cell, label: str, out: Path, run_name: str | None = None
    ) -> RunConfig:
        """The run-config of one trial: the row's keys, the trial's, and the validation split."""
        assert self.tuning is not None
        values = {
            **self.keys(cell, chosen=False),
            **self.tuning.trials[cell.variant][label],
            **self.overrides,
            "validation-size": self.tuning.validation_size,
        }
        try:
            return _run_config(values, cell.seed, out / self.trial_path(cell, label), run_name)
        except ConfigError as exc:
            where = f"tune.{cell.variant}" if exc.key in values else "tune"
            raise FedmergeError(f"{self.source} [{where}] trial {label}: {exc}") from None

    def with_choices(self, chosen: Mapping[tuple[str, str, str, str], dict[str, Any]]) -> BenchSpec:
        """This spec with the keys its trials chose (see :mod:`fedmerge.bench.tuning`)."""
        return dataclasses.replace(self, chosen=dict(chosen))

    def config(self, cell: Cell, out: Path, run_name: str | None = None) -> RunConfig:
        """The validated run-config of ``cell`` writing to ``out/<cell path>`` (or to the
        sibling folder ``run_name``). Errors name the spec, the table and the key."""
        try:
            return _run_config(self.keys(cell), cell.seed, out / cell.path, run_name)
        except ConfigError as exc:
            raise self._located(cell, exc) from None

    def dataset_name(self, cell: Cell) -> str:
        """The dataset a cell trains on (its axis label, or the ``[base]`` dataset)."""
        return str(self.keys(cell).get("dataset", RunConfig.dataset))

    def target_for(self, dataset_label: str, dataset_name: str) -> float | None:
        """The target accuracy of a dataset (per-dataset tables: by label, then by name)."""
        target = self.target_accuracy
        if isinstance(target, dict):
            return target.get(dataset_label, target.get(dataset_name))
        return target

    def published_for(
        self, dataset_label: str, dataset_name: str, partition: str
    ) -> tuple[float, float | None] | None:
        """The published ``(mean, std)`` of a dataset (by label, then by name) and partition."""
        if self.published is None:
            return None
        values = self.published.values
        table = values.get(dataset_label, values.get(dataset_name, {}))
        return table.get(partition)

    def validate(self) -> None:
        """Build every cell's and every trial's run-config and check the strategies against
        the registry."""
        from ..strategies.registry import STRATEGIES

        for cell in self.cells():
            cfg = self.config(cell, Path("."))
            if cfg.strategy not in STRATEGIES:
                raise self._located(cell, unknown_name("strategy", cfg.strategy, STRATEGIES))
        for cell, label in self.trial_cells():
            self.trial_config(cell, label, Path("."))

    # -- helpers ---------------------------------------------------------------------------
    def _layers(self, cell: Cell, chosen: bool = True) -> Iterator[tuple[str, dict[str, Any]]]:
        yield "base", self.base
        if cell.dataset:
            yield f"datasets.{cell.dataset}", self.datasets[cell.dataset]
        yield f"partitions.{cell.partition}", self.partitions[cell.partition]
        if cell.combo:
            yield "grid", self.combos[cell.combo]
        yield (
            self.variant_tables.get(cell.variant, f"variants.{cell.variant}"),
            self.variants[cell.variant],
        )
        if chosen and cell.group in self.chosen:
            yield f"tune.{cell.variant} (chosen on validation)", self.chosen[cell.group]
        if self.overrides:
            yield "command line", self.overrides

    def _located(self, cell: Cell, exc: ConfigError) -> FedmergeError:
        for table, keys in reversed(list(self._layers(cell))):
            if exc.key in keys:
                return FedmergeError(f"{self.source} [{table}]: {exc}")
        # No table sets the key: its default does not suit this cell.
        hint = f" (set '{exc.key}' in [base], or for this variant only in "
        if self.variant_tables.get(cell.variant, "").startswith(("strategies", "strategy-keys")):
            hint += f"[strategy-keys.{cell.variant}])"
        else:
            hint += f"[variants.{cell.variant}])"
        return FedmergeError(f"{self.source} cell {cell.label}: {exc}{hint}")


def last_rounds_accuracy(rows: list[dict[str, Any]], k: int) -> float:
    """Mean test accuracy over the run's last ``k`` rounds (round 0, the initial model, never
    counts; all rounds if the run has fewer)."""
    trained = [r["test-accuracy"] for r in rows if r["round"] > 0] or [rows[-1]["test-accuracy"]]
    return statistics.fmean(trained[-k:])


def accuracy_metric(name: str, last_rounds: int) -> Callable[[list[dict[str, Any]]], float]:
    """One of :data:`HEADLINES` as a function of a run's per-round metrics: the final round's
    test accuracy, the best round's, or :func:`last_rounds_accuracy` over ``last_rounds``."""
    if name == "best":
        return lambda rows: max(float(r["test-accuracy"]) for r in rows)
    if name == "last-rounds":
        return lambda rows: last_rounds_accuracy(rows, last_rounds)
    if name == "final":
        return lambda rows: float(rows[-1]["test-accuracy"])
    raise ValueError(f"metric {name!r}: one of {', '.join(HEADLINES)}")


def _run_config(
    keys: Mapping[str, Any], seed: int, folder: Path, run_name: str | None
) -> RunConfig:
    """``keys`` with the seed and the folder the bench sets, validated (ConfigError)."""
    values = {
        **keys,
        "seed": seed,
        "output-dir": str(folder.parent),
        "run-name": run_name or folder.name,
    }
    return RunConfig.from_mapping(values)


# -- reading a spec ---------------------------------------------------------------------------
def preset_names() -> list[str]:
    """The presets shipped with fedmerge (``fedmerge bench NAME``)."""
    folder = resources.files("fedmerge.bench").joinpath("presets")
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def read_source(source: str | Path) -> tuple[str, str]:
    """``(label, TOML text)`` of a spec file or a preset name."""
    path = Path(source)
    if path.is_file():
        try:
            return str(path), path.read_text()
        except OSError as exc:
            raise ConfigError("SPEC", str(path), "a readable TOML file", str(exc)) from None
    names = preset_names()
    if str(source) in names:
        text = resources.files("fedmerge.bench").joinpath("presets", f"{source}.toml").read_text()
        return f"preset {source}", text
    raise ConfigError("SPEC", str(source), "an existing TOML file or a preset: " + ", ".join(names))


def load_spec(source: str | Path, overrides: Mapping[str, Any] | None = None) -> BenchSpec:
    """Read, expand and validate a spec; every cell's run-config is built before returning.

    Parameters
    ----------
    source : str or Path
        A TOML file, or a preset name (:func:`preset_names`).
    overrides : mapping, optional
        Run-config keys applied over every cell (e.g. ``{"data-root": ...}``).

    Raises
    ------
    FedmergeError
        Naming the spec, the table and the key at fault.
    """
    label, text = read_source(source)
    return parse_spec(text, label, overrides)


def parse_spec(
    text: str, source: str = "spec", overrides: Mapping[str, Any] | None = None
) -> BenchSpec:
    """Like :func:`load_spec`, from TOML text (``source`` names it in error messages)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FedmergeError(f"{source}: not valid TOML: {exc}") from None
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(key, TOP_LEVEL_KEYS, n=2)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise FedmergeError(
                f"{source}: unknown top-level key {key!r}{hint} "
                f"(allowed: {', '.join(TOP_LEVEL_KEYS)})"
            )
    variants, variant_tables = _variants(raw, source)
    spec = BenchSpec(
        source=source,
        text=text,
        seeds=_seeds(raw.get("seeds", [0]), source),
        base=_keys(raw.get("base", {}), "base", source),
        datasets=_datasets(raw.get("datasets", {}), source),
        partitions=_named_tables(raw, "partitions", source, required=True),
        variants=variants,
        combos=_combos(raw.get("grid", {}), source),
        description=str(raw.get("description", "")),
        target_accuracy=_target(raw.get("target-accuracy"), source),
        last_rounds=_last_rounds(raw.get("last-rounds", 5), source),
        report_rounds=_report_rounds(raw.get("report-rounds", []), source),
        variant_tables=variant_tables,
        overrides=dict(overrides or {}),
        published=_published(raw.get("published"), source),
        headline=_headline(raw.get("headline", "final"), source),
        tuning=_tuning(raw.get("tune"), raw.get("seeds", [0]), variants, source),
    )
    _check_axes_disjoint(spec)
    _check_published(spec)
    spec.validate()
    return spec


def _fail(source: str, where: str, message: str) -> FedmergeError:
    return FedmergeError(f"{source} [{where}]: {message}")


def _keys(table: Any, where: str, source: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise _fail(source, where, f"got {table!r}; allowed: a table of run-config keys")
    for key, value in table.items():
        if key in RESERVED_KEYS:
            raise _fail(source, where, f"key {key!r} is set by the bench: {RESERVED_KEYS[key]}")
        if isinstance(value, dict | list):
            raise _fail(source, where, f"key {key!r}: got {value!r}; allowed: a single value")
    return dict(table)


def _check_name(name: str, where: str, source: str) -> str:
    if not _NAME_RE.match(name):
        raise _fail(
            source,
            where,
            f"name {name!r} is a folder name: letters, digits and . _ + = , - "
            "(not starting with a dot or a dash)",
        )
    return name


def _named_tables(
    raw: Mapping[str, Any], key: str, source: str, *, required: bool = False
) -> dict[str, dict[str, Any]]:
    tables = raw.get(key, {})
    if not isinstance(tables, dict) or (required and not tables):
        raise _fail(source, key, f"got {tables!r}; allowed: one or more [{key}.NAME] tables")
    return {
        _check_name(name, f"{key}.{name}", source): _keys(t, f"{key}.{name}", source)
        for name, t in tables.items()
    }


def _seeds(seeds: Any, source: str) -> tuple[int, ...]:
    ok = isinstance(seeds, list) and seeds and len(set(seeds)) == len(seeds)
    if not ok or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise _fail(source, "seeds", f"got {seeds!r}; allowed: a list of distinct integers >= 0")
    return tuple(seeds)


def _datasets(value: Any, source: str) -> dict[str, dict[str, Any]]:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return {_check_name(v, "datasets", source): {"dataset": v} for v in value}
    tables = _named_tables({"datasets": value}, "datasets", source)
    return {name: {"dataset": name, **keys} for name, keys in tables.items()}


def _variants(raw: Mapping[str, Any], source: str) -> tuple[dict[str, dict], dict[str, str]]:
    """One variant per strategy of ``strategies`` (with its ``[strategy-keys.*]``), then the
    explicit ``[variants.*]``; also where each variant's keys come from.

    With ``strategies = "all"`` the registry decides which strategies run, so keys of a
    strategy it lacks (a preset written for a newer or older fedmerge) are skipped with a
    warning; with a list, every name must be registered.
    """
    from ..strategies.registry import STRATEGIES

    explicit = _named_tables(raw, "variants", source)
    extra = _named_tables(raw, "strategy-keys", source)
    names = raw.get("strategies", [])
    every = names == "all"
    if every:
        names = list(STRATEGIES)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _fail(source, "strategies", f'got {names!r}; allowed: "all" or a list of names')
    for name in names:
        if name not in STRATEGIES:
            raise _fail(source, "strategies", str(unknown_name("strategy", name, STRATEGIES)))
    for name in set(extra) - set(names):
        if not every:
            raise _fail(
                source, f"strategy-keys.{name}", f"{name!r} is not in `strategies`; list it there"
            )
        log.warning("%s: [strategy-keys.%s] skipped: no such strategy is registered", source, name)
    variants: dict[str, dict[str, Any]] = {}
    tables: dict[str, str] = {}
    for name in names:
        if name in explicit:
            raise _fail(source, "strategies", f"variant {name!r} is also a [variants.{name}]")
        variants[name] = {"strategy": name, **extra.get(name, {})}
        tables[name] = f"strategy-keys.{name}" if name in extra else "strategies"
    variants.update(explicit)
    tables.update({name: f"variants.{name}" for name in explicit})
    if not variants:
        raise _fail(source, "variants", "no variants: add [variants.NAME] tables or `strategies`")
    return variants, tables


def _combos(grid: Any, source: str, where: str = "grid") -> dict[str, dict[str, Any]]:
    """Every combination of the ``[grid]`` values, labelled ``key=value,key=value``."""
    if not isinstance(grid, dict):
        raise _fail(source, where, f"got {grid!r}; allowed: a table of key = [values]")
    if not grid:
        return {"": {}}
    for key, values in grid.items():
        if key in RESERVED_KEYS or key == "validation-size":
            why = RESERVED_KEYS.get(key, "the trials' validation split is [tune]'s")
            raise _fail(source, where, f"key {key!r} is set by the bench: {why}")
        if not isinstance(values, list) or not values or len(set(map(repr, values))) < len(values):
            raise _fail(
                source,
                where,
                f"key {key!r}: got {values!r}; allowed: a list of distinct values "
                "(a single value belongs in [base])",
            )
    keys = list(grid)
    combos = {}
    for values in itertools.product(*grid.values()):
        label = ",".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
        combos[_check_name(label, where, source)] = dict(zip(keys, values, strict=True))
    return combos


def _headline(value: Any, source: str) -> str:
    if value in HEADLINES:
        return str(value)
    raise _fail(source, "headline", f"got {value!r}; allowed: {', '.join(map(repr, HEADLINES))}")


def _tuning(
    value: Any, seeds: Any, variants: Mapping[str, dict[str, Any]], source: str
) -> Tuning | None:
    """The ``[tune]`` table: ``validation-size``, ``seeds`` and one grid per variant."""
    if value is None:
        return None
    allowed = "`validation-size`, `seeds` and [tune.VARIANT] tables of key = [values]"
    if not isinstance(value, dict):
        raise _fail(source, "tune", f"got {value!r}; allowed: a table of {allowed}")
    size = value.get("validation-size")
    if not (isinstance(size, int) and not isinstance(size, bool) and size >= 1):
        raise _fail(
            source,
            "tune",
            f"key 'validation-size': got {size!r}; allowed: an integer >= 1 (training samples "
            "held out to score the trials, so that the test split is never read)",
        )
    tune_seeds = value.get("seeds", list(seeds[:1]) if isinstance(seeds, list) else seeds)
    trials: dict[str, dict[str, dict[str, Any]]] = {}
    for name, grid in value.items():
        if name in TUNE_KEYS:
            continue
        if not isinstance(grid, dict):
            raise _fail(source, "tune", f"key {name!r}: got {grid!r}; allowed: {allowed}")
        if name not in variants:
            raise _fail(source, f"tune.{name}", str(unknown_name("variant", name, variants)))
        trials[name] = _combos(grid, source, where=f"tune.{name}")
        if trials[name] == {"": {}}:
            raise _fail(source, f"tune.{name}", "no keys: give key = [values] to choose from")
    if not trials:
        raise _fail(source, "tune", f"no [tune.VARIANT] tables: {allowed}")
    return Tuning(validation_size=size, seeds=_seeds(tune_seeds, source), trials=trials)


def _last_rounds(value: Any, source: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise _fail(source, "last-rounds", f"got {value!r}; allowed: an integer >= 1")


def _report_rounds(value: Any, source: str) -> tuple[int, ...]:
    if isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
    ):
        return tuple(dict.fromkeys(value))
    raise _fail(source, "report-rounds", f"got {value!r}; allowed: a list of integers >= 1")


def _target(value: Any, source: str) -> float | dict[str, float] | None:
    def check(v: Any) -> float:
        if isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1:
            return float(v)
        raise _fail(source, "target-accuracy", f"got {v!r}; allowed: a fraction in (0, 1]")

    if value is None:
        return None
    if isinstance(value, dict):
        return {str(k): check(v) for k, v in value.items()}
    return check(value)


def _fraction(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1


def _published(value: Any, source: str) -> Published | None:
    """The ``[published]`` table: ``source``, ``metric`` and one table per dataset of
    ``PARTITION = { mean = A, std = S }`` (fractions; std optional)."""
    if value is None:
        return None
    allowed = "`source`, `metric` and [published.DATASET] tables"
    if not isinstance(value, dict):
        raise _fail(source, "published", f"got {value!r}; allowed: a table of {allowed}")
    text = value.get("source")
    if not isinstance(text, str) or not text.strip():
        raise _fail(
            source,
            "published",
            f"key 'source': got {text!r}; allowed: a non-empty string "
            "naming where the numbers come from",
        )
    metric = value.get("metric", "final-accuracy")
    if metric not in PUBLISHED_METRICS:
        raise _fail(
            source,
            "published",
            f"key 'metric': got {metric!r}; allowed: {', '.join(map(repr, PUBLISHED_METRICS))}",
        )
    values: dict[str, dict[str, tuple[float, float | None]]] = {}
    for dataset, table in value.items():
        if dataset in ("source", "metric"):
            continue
        where = f"published.{dataset}"
        if not isinstance(table, dict) or not table:
            raise _fail(source, "published", f"key {dataset!r}: got {table!r}; allowed: {allowed}")
        values[dataset] = {}
        for partition, entry in table.items():
            if not isinstance(entry, dict) or "mean" not in entry or set(entry) - {"mean", "std"}:
                raise _fail(
                    source,
                    where,
                    f"key {partition!r}: got {entry!r}; allowed: "
                    "{ mean = A, std = S } (std optional)",
                )
            mean, std = entry["mean"], entry.get("std")
            if not _fraction(mean):
                raise _fail(
                    source,
                    where,
                    f"key {partition!r}: mean {mean!r}; allowed: an accuracy "
                    "as a fraction in [0, 1] (88.1% is 0.881)",
                )
            if std is not None and not _fraction(std):
                raise _fail(
                    source,
                    where,
                    f"key {partition!r}: std {std!r}; allowed: a fraction in "
                    "[0, 1] (2.5 points is 0.025)",
                )
            values[dataset][partition] = (float(mean), None if std is None else float(std))
    if not values:
        raise _fail(source, "published", f"no results: add {allowed}")
    return Published(source=text.strip(), metric=metric, values=values)


def _check_published(spec: BenchSpec) -> None:
    """Published results must name a dataset and a partition of the grid."""
    if spec.published is None:
        return
    datasets = {c.dataset for c in spec.cells() if c.dataset}
    datasets |= {spec.dataset_name(c) for c in spec.cells()}
    for dataset, table in spec.published.values.items():
        if dataset not in datasets:
            raise _fail(
                spec.source,
                f"published.{dataset}",
                f"{dataset!r} is not a dataset of the grid "
                f"(allowed: {', '.join(sorted(datasets))})",
            )
        for partition in table:
            if partition not in spec.partitions:
                raise _fail(
                    spec.source,
                    f"published.{dataset}",
                    f"key {partition!r} is not a partition of the grid "
                    f"(allowed: {', '.join(spec.partitions)})",
                )


def _check_axes_disjoint(spec: BenchSpec) -> None:
    """A key set by two axes would make the result depend on the merge order: refuse it."""
    axes = {
        "datasets": spec.datasets.values(),
        "partitions": spec.partitions.values(),
        "grid": spec.combos.values(),
        "variants": spec.variants.values(),
    }
    owner: dict[str, str] = {}
    for axis, tables in axes.items():
        for key in set().union(*[set(t) for t in tables]):
            if key in owner:
                raise _fail(
                    spec.source,
                    axis,
                    f"key {key!r} is set by both [{owner[key]}] and [{axis}]; "
                    "set it in one axis (or in [base])",
                )
            owner[key] = axis
