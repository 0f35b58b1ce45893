"""The results table, plots and Markdown report of a benchmark grid, built from its folder alone.

Only finished cells count (a folder with every round's metrics; cells in progress live in
``.partial`` folders and are never read); the report says how many cells are missing and
which. Files written into the results folder:

``summary.json``
    One row per (dataset, partition, variant, grid combination): over the finished seeds,
    ``[mean, std]`` of final-round and best-round test accuracy, of the first round reaching
    the target accuracy (among the seeds that reach it), and of the wall seconds per round;
    the mean accuracy curve and its std. ``null`` where there is nothing to average. The
    final accuracy minus the reference variant's (``fedavg`` when the grid has it), paired by
    seed; for the variants that learn from the server's labelled proxy slice (NP Merge,
    ``match-beta = auto``), also minus the grid's ``fedavg-ft`` variant's (``labelled-*``
    keys): the control that gets the same labelled samples.
``results.csv``
    The same rows, flat.
``report.md``
    Per dataset, final and best accuracy pivoted (variants x partitions), the paired
    differences (to the reference, and the label-using variants' to FedAvg-ft), then one detailed
    table per partition, and the plots. Partitions are named in words (``#C=2``, ``Dir(0.5)``,
    ``IID``: :func:`fedmerge.plots.partition_label`). A spec's ``[published]`` results appear
    as a row marked "published (not run)" in the tables of the column they compare with.
``accuracy-<dataset>.png``
    Test accuracy per round, one panel per partition, one line per variant: the mean over the
    seeds, with a translucent band from the seeds' min to their max.
``final-accuracy-<dataset>.png``, ``best-accuracy-<dataset>.png``
    Final-round and best-round accuracy, one panel per partition: per variant, the mean over
    seeds with an error bar of +- the sample std, and each seed as a dot.
``partitions-<dataset>.png``
    Per partition, the label counts per client (first seed).

Published results are drawn in the three accuracy plots as a dashed line at their mean with a
band of +- their std (in the final/best chart of their own metric only).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..config import RunConfig
from ..options import MatchOptions
from ..results import read_metrics
from .grid_spec import BenchSpec, Cell, accuracy_metric, last_rounds_accuracy
from .tuning import read_choices, tuning_lines

Group = tuple[str, str, str, str]
_PARTITION_FILE = "partition.json"
_DONE_FILE = "done.json"


def _mean_std(values: Sequence[float | None]) -> list[float] | None:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    return [statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0]


def rounds_to_target(rows: Sequence[dict[str, Any]], target: float) -> int | None:
    """The first round whose test accuracy reaches ``target`` (None if none does)."""
    return next((int(r["round"]) for r in rows if r["test-accuracy"] >= target), None)


def finished_runs(spec: BenchSpec, out: Path) -> dict[Cell, list[dict[str, Any]]]:
    """Per finished cell, its per-round metrics (cells in spec order)."""
    runs = {}
    for cell in spec.cells():
        if not spec.ready(cell):
            continue  # a tuned row whose trials have not chosen: its cells cannot be known
        folder = out / cell.path
        try:
            rows = read_metrics(folder)
        except (OSError, ValueError):
            continue
        if len(rows) == spec.config(cell, out).num_rounds + 1:
            runs[cell] = rows
    return runs


def dataset_title(spec: BenchSpec, cell: Cell) -> str:
    """How the report names a cell's dataset: its axis label, else the dataset key."""
    return cell.dataset or spec.dataset_name(cell)


def summarize_group(
    spec: BenchSpec, out: Path, cells: list[Cell], runs: list[list[dict]], target: float | None
) -> dict[str, Any]:
    """One row of the results table from the finished seeds ``runs`` of one group."""
    first = cells[0]
    final = [r[-1]["test-accuracy"] for r in runs]
    best = [max(x["test-accuracy"] for x in r) for r in runs]
    last = [last_rounds_accuracy(r, spec.last_rounds) for r in runs]
    reached = [rounds_to_target(r, target) for r in runs] if target is not None else []
    per_round = [statistics.fmean(x.get("round-time", math.nan) for x in r[1:]) for r in runs]
    per_eval = [statistics.fmean(x.get("eval-time", math.nan) for x in r) for r in runs]
    spread = [r[-1].get("scope-spread") for r in runs]
    curves = np.array([[x["test-accuracy"] for x in r] for r in runs])
    return {
        "dataset": dataset_title(spec, first),
        "partition": first.partition,
        "variant": first.variant,
        "combo": first.combo,
        "strategy": spec.config(first, out).strategy,
        "keys": {
            **spec.variants[first.variant],
            **spec.combos[first.combo],
            **spec.chosen.get(first.group, {}),
        },
        "tuned": spec.chosen.get(first.group),
        "seeds": len(runs),
        "seeds-expected": len(spec.seeds),
        "final-accuracy": _mean_std(final),
        "best-accuracy": _mean_std(best),
        "last-rounds": min(spec.last_rounds, len(runs[0]) - 1),
        "last-rounds-accuracy": _mean_std(last),
        **{
            f"round-{n}-accuracy": _mean_std([round_accuracy(r, n) for r in runs])
            for n in spec.report_rounds
        },
        "target-accuracy": target,
        "rounds-to-target": _mean_std([float(r) for r in reached if r is not None]),
        "reached-target": sum(r is not None for r in reached),
        "seconds-per-round": _mean_std(per_round),
        "eval-seconds-per-round": _mean_std(per_eval),
        "cell-seconds": _mean_std([_seconds(out / c.path) for c in cells]),
        "diverged": sum(not math.isfinite(r[-1].get("test-loss", math.nan)) for r in runs),
        "scope-spread": _mean_std(spread),
        "accuracy-curve": curves.mean(axis=0).tolist(),
        "accuracy-curve-std": curves.std(axis=0, ddof=1 if len(runs) > 1 else 0).tolist(),
    }


#: The control for labelled server data: FedAvg fine-tuned on the same labelled proxy slice.
LABELLED_CONTROL = "fedavg-ft"
#: The second control: FedMatch's matched average fine-tuned on the same slice, same budget.
MATCHED_CONTROL = "fedmatch-ft"


def uses_server_labels(cfg: RunConfig) -> bool:
    """Whether a cell learns from the server's labelled proxy slice: NP Merge's coefficients,
    FedAvg-ft's fine-tuning, and the dual matcher's ``match-beta = auto`` choice (FedMatch, or
    FedWSA with ``wsa-merge = matched``). Inputs alone (activation matching, BatchNorm
    repair) do not count."""
    if cfg.strategy in ("fednpmerge", LABELLED_CONTROL, MATCHED_CONTROL):
        return True
    matching = cfg.strategy == "fedmatch" or (
        cfg.strategy == "fedwsa" and cfg.wsa_merge == "matched"
    )
    return matching and MatchOptions.from_config(cfg).auto_beta


def labelled_control_variant(spec: BenchSpec, strategy: str = LABELLED_CONTROL) -> str | None:
    """The grid's first variant of a control strategy (default FedAvg-ft), or None."""
    for variant, keys in spec.variants.items():
        if keys.get("strategy") == strategy:
            return variant
    return None


#: The controls a label-using variant is paired with: report prefix -> control strategy.
CONTROLS = {"labelled-": LABELLED_CONTROL, "matched-": MATCHED_CONTROL}


def spec_controls(spec: BenchSpec) -> list[str]:
    """The grid's control variants (:data:`CONTROLS`): not paired with each other."""
    found = (labelled_control_variant(spec, strategy) for strategy in CONTROLS.values())
    return [v for v in found if v]


def reference_variant(spec: BenchSpec) -> str:
    """The variant every other is compared with, seed by seed: ``fedavg`` when the grid has
    it, else its first variant."""
    return "fedavg" if "fedavg" in spec.variants else next(iter(spec.variants))


Metric = Callable[[list[dict[str, Any]]], "float | None"]


def seed_metrics(spec: BenchSpec) -> dict[str, Metric]:
    """The per-seed accuracies the report compares between variants, by name: ``final``
    (last round), ``last-rounds`` (:func:`last_rounds_accuracy`) and ``round-R`` for each
    of the spec's ``report-rounds`` (None where a run has no round R)."""
    names = ["final", "last-rounds", *(["best"] if spec.headline == "best" else [])]
    metrics: dict[str, Metric] = {n: accuracy_metric(n, spec.last_rounds) for n in names}
    for r in spec.report_rounds:
        metrics[f"round-{r}"] = partial(round_accuracy, number=r)
    return metrics


def round_accuracy(rows: list[dict[str, Any]], number: int) -> float | None:
    """Test accuracy after round ``number`` (None if the run has no such round)."""
    return next((float(r["test-accuracy"]) for r in rows if r["round"] == number), None)


def ahead_key(metric: str) -> str:
    """``ahead-of-reference`` for ``final`` (the historic name), else ``METRIC-ahead-...``."""
    return "ahead-of-reference" if metric == "final" else f"{metric}-ahead-of-reference"


def paired_difference(
    cells: list[Cell],
    runs: dict[Cell, list[dict]],
    reference: str,
    metrics: Mapping[str, Metric] | None = None,
) -> dict[str, Any]:
    """Each metric (default: the final accuracy) minus the reference variant's, on the same
    dataset, partition, keys and seed, for the seeds where both finished: mean ± std of the
    differences (``METRIC-minus-reference``), and on how many seeds the variant is ahead
    (:func:`ahead_key`). Pairing removes what a seed's partition and initialisation do to
    every strategy alike, which the unpaired stds of two rows still contain."""
    metrics = metrics or {"final": lambda rows: rows[-1]["test-accuracy"]}
    diffs: dict[str, list[float]] = {name: [] for name in metrics}
    paired = 0
    for cell in cells:
        other = replace(cell, variant=reference)
        if cell.variant != reference and cell in runs and other in runs:
            paired += 1
            for name, of in metrics.items():
                mine, theirs = of(runs[cell]), of(runs[other])
                if mine is not None and theirs is not None:
                    diffs[name].append(mine - theirs)
    row: dict[str, Any] = {"reference": reference, "paired-seeds": paired}
    for name, values in diffs.items():
        row[f"{name}-minus-reference"] = _mean_std(values)
        row[ahead_key(name)] = sum(d > 0 for d in values)
    return row


def _seconds(folder: Path) -> float | None:
    try:
        return float(json.loads((folder / _DONE_FILE).read_text())["seconds"])
    except (OSError, ValueError, KeyError):
        return None


def summarize(spec: BenchSpec, out: Path, target: float | None = None) -> dict[str, Any]:
    """The results table of ``out``: cell counts, missing cells and one row per group.

    ``target`` overrides the spec's ``target-accuracy``.
    """
    runs = finished_runs(spec, out)
    all_cells = spec.cells()
    rows = []
    for group in spec.groups():
        cells = [c for c in all_cells if c.group == group and c in runs]
        if not cells:
            continue
        name = spec.dataset_name(cells[0])
        goal = target if target is not None else spec.target_for(group[0], name)
        row = summarize_group(spec, out, cells, [runs[c] for c in cells], goal)
        metrics = seed_metrics(spec)
        row |= paired_difference(cells, runs, reference_variant(spec), metrics)
        labels = uses_server_labels(spec.config(cells[0], out))
        for prefix, strategy in CONTROLS.items():
            control = labelled_control_variant(spec, strategy)
            if labels and control and group[2] not in (control, *spec_controls(spec)):
                versus = paired_difference(cells, runs, control, metrics)
                row |= {f"{prefix}{k}": v for k, v in versus.items()}
        rows.append(row)
    return {
        "source": spec.source,
        "seeds": list(spec.seeds),
        "cells": len(all_cells),
        "finished": len(runs),
        "missing": [c.label for c in all_cells if c not in runs],
        "rows": rows,
    }


# -- files -------------------------------------------------------------------------------------
CSV_COLUMNS = (
    "dataset", "partition", "variant", "combo", "strategy", "seeds", "final-accuracy",
    "best-accuracy", "last-rounds", "last-rounds-accuracy", "target-accuracy",
    "rounds-to-target", "reached-target",
    "seconds-per-round", "diverged", "scope-spread", "reference", "final-minus-reference",
    "paired-seeds", "ahead-of-reference", "labelled-reference",
    "labelled-final-minus-reference", "labelled-paired-seeds", "labelled-ahead-of-reference",
    "last-rounds-minus-reference", "last-rounds-ahead-of-reference",
    "labelled-last-rounds-minus-reference", "labelled-last-rounds-ahead-of-reference",
    "matched-reference", "matched-final-minus-reference", "matched-paired-seeds",
    "matched-ahead-of-reference", "matched-last-rounds-minus-reference",
    "matched-last-rounds-ahead-of-reference",
)  # fmt: skip


_PAIRS = (
    "final-accuracy",
    "final-minus-reference",
    "labelled-final-minus-reference",
    "last-rounds-accuracy",
    "last-rounds-minus-reference",
    "labelled-last-rounds-minus-reference",
    "matched-final-minus-reference",
    "matched-last-rounds-minus-reference",
    "best-accuracy",
    "rounds-to-target",
    "seconds-per-round",
    "scope-spread",
)


def _round_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The ``report-rounds`` keys of the rows (``round-R-...``, ``labelled-round-R-...``)."""
    prefixes = ("round-", *(f"{p}round-" for p in CONTROLS))
    keys = dict.fromkeys(k for r in rows for k in r if k.startswith(prefixes))
    return list(keys)


def write_csv(summary: dict[str, Any], path: Path) -> None:
    """The rows of ``summary`` as CSV; ``[mean, std]`` pairs become two columns."""
    rounds = _round_columns(summary["rows"])
    columns = [*CSV_COLUMNS, *rounds]
    pairs = set(_PAIRS) | {c for c in rounds if c.endswith(("-accuracy", "-minus-reference"))}
    header: list[str] = []
    for col in columns:
        header += [f"{col}-mean", f"{col}-std"] if col in pairs else [col]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in summary["rows"]:
        line: list[Any] = []
        for col in columns:
            if col in pairs:
                line += row.get(col) or ["", ""]
            else:
                line.append("" if row.get(col) is None else row[col])
        writer.writerow(line)
    path.write_text(buf.getvalue())


def _pct(pair: list[float] | None) -> str:
    return "–" if pair is None else f"{100 * pair[0]:.2f} ± {100 * pair[1]:.2f}"


def _num(pair: list[float] | None, digits: int) -> str:
    return "–" if pair is None else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def _row_label(row: dict[str, Any]) -> str:
    return f"{row['variant']} [{row['combo']}]" if row["combo"] else row["variant"]


def partition_titles(spec: BenchSpec) -> dict[str, str]:
    """Per partition of the spec, its name in words (``#C=2``, ``Dir(0.5)``, ``IID``) from its
    keys over ``[base]`` and the run-config defaults; keys an axis other than the partitions
    sets are left out (they differ between cells). The table name where that leaves nothing
    to say, or where two partitions would read the same."""
    from ..plots import partition_label

    defaults = {
        "partition": RunConfig.partition,
        "partition-beta": RunConfig.partition_beta,
        "partition-k": RunConfig.partition_k,
        "partition-sigma": RunConfig.partition_sigma,
    }
    tables = [*spec.datasets.values(), *spec.combos.values(), *spec.variants.values()]
    varied = {key for table in tables for key in table}
    titles = {}
    for name, table in spec.partitions.items():
        keys = {**defaults, **spec.base, **table}
        titles[name] = partition_label({k: v for k, v in keys.items() if k not in varied}, name)
    seen = list(titles.values())
    return {n: f"{t} ({n})" if seen.count(t) > 1 else t for n, t in titles.items()}


def _published(
    spec: BenchSpec, dataset: str, partitions: list[str]
) -> dict[str, tuple[float, float | None]]:
    """Per partition, the spec's published ``(mean, std)`` for this dataset (by its report
    title, then by the dataset it trains on)."""
    if spec.published is None:
        return {}
    cell = next(c for c in spec.cells() if dataset_title(spec, c) == dataset)
    name = spec.dataset_name(cell)
    values = {p: spec.published_for(dataset, name, p) for p in partitions}
    return {p: v for p, v in values.items() if v is not None}


def _published_label(spec: BenchSpec) -> str:
    assert spec.published is not None
    return f"*published: {spec.published.source} (not run)*"


def _pct_or_dash(pair: tuple[float, float | None] | None) -> str:
    if pair is None:
        return "–"
    mean, std = pair
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def _pivot(
    rows: list[dict[str, Any]],
    partitions: list[str],
    key: str,
    titles: dict[str, str] | None = None,
    published: tuple[str, dict[str, tuple[float, float | None]]] | None = None,
) -> list[str]:
    """Variants x partitions of ``key``; ``published`` = (row label, per partition) adds the
    published row under them."""
    heads = [(titles or {}).get(p, p) for p in partitions]
    labels = list(dict.fromkeys(_row_label(r) for r in rows))
    cell = {(_row_label(r), r["partition"]): _pct(r[key]) for r in rows}
    lines = ["| variant | " + " | ".join(heads) + " |", "|---" * (len(partitions) + 1) + "|"]
    for label in labels:
        values = [cell.get((label, p), "missing") for p in partitions]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    if published and published[1]:
        values = [_pct_or_dash(published[1].get(p)) for p in partitions]
        lines.append(f"| {published[0]} | " + " | ".join(values) + " |")
    return lines


def _paired(
    rows: list[dict[str, Any]],
    partitions: list[str],
    titles: dict[str, str] | None = None,
    prefix: str = "",
    metric: str = "final",
) -> list[str]:
    """A metric of :func:`seed_metrics` (the final accuracy, the mean of the last rounds, one
    round's) minus the reference's, paired by seed: points, (ahead/paired seeds).
    ``prefix="labelled-"``: the label-using variants minus the labelled-data control."""
    mine = [r for r in rows if r.get(f"{prefix}paired-seeds")]
    reference = mine[0][f"{prefix}reference"]
    which = {
        "labelled-": f", for the variants that learn from the server's labelled proxy slice; "
        f"{reference} is FedAvg fine-tuned on the same samples",
        "matched-": f", for the variants that learn from the server's labelled proxy slice; "
        f"{reference} is FedMatch's matched average fine-tuned on the same samples",
    }.get(prefix, "")
    what = {
        "final": "Final-round accuracy",
        "best": "Best-round accuracy",
        "last-rounds": f"Accuracy averaged over each seed's last {mine[0]['last-rounds']} rounds",
    }.get(metric) or f"Accuracy after round {metric.removeprefix('round-')}"
    ahead = ahead_key(metric)
    lines = [
        f"{what} minus {reference}'s on the same seed{which} (points, mean ± std over the "
        f"seeds both finished; in brackets: seeds ahead of {reference} / seeds paired):",
        "",
    ]
    labels = [lbl for lbl in dict.fromkeys(_row_label(r) for r in mine)]
    cell = {}
    for r in mine:
        diff = _pct(r[f"{prefix}{metric}-minus-reference"])
        cell[(_row_label(r), r["partition"])] = (
            f"{diff} ({r[f'{prefix}{ahead}']}/{r[f'{prefix}paired-seeds']})"
        )
    heads = [(titles or {}).get(p, p) for p in partitions]
    lines += ["| variant | " + " | ".join(heads) + " |", "|---" * (len(partitions) + 1) + "|"]
    for label in labels:
        values = [cell.get((label, p), "") for p in partitions]
        if any(values):
            lines.append(f"| {label} | " + " | ".join(values) + " |")
    return lines


#: Per headline, its column of the summary rows and its name in the report.
HEADLINE_COLUMNS = {
    "final": ("final-accuracy", "final-round accuracy"),
    "best": ("best-accuracy", "best-round accuracy"),
    "last-rounds": ("last-rounds-accuracy", "accuracy averaged over each seed's last rounds"),
}


def _headline(
    spec: BenchSpec,
    rows: list[dict[str, Any]],
    partitions: list[str],
    titles: dict[str, str],
    published: Mapping[str, tuple[str, dict[str, tuple[float, float | None]]]],
) -> list[str]:
    """The section's lead: the headline metric the spec declared, its table (with the
    published row where it compares with this metric), and its paired comparisons with the
    reference and the label controls."""
    column, name = HEADLINE_COLUMNS[spec.headline]
    if spec.headline == "last-rounds":
        name = f"accuracy averaged over each seed's last {rows[0]['last-rounds']} rounds"
    lines = [
        f'**Headline: {name}** (`headline = "{spec.headline}"`, declared in the spec '
        "before the run; the other metrics below are secondary).",
        "",
        f"{name[0].upper()}{name[1:]} (%):",
        "",
        *_pivot(rows, partitions, column, titles, published.get(column)),
    ]
    for prefix in ("", *CONTROLS):
        if any(r.get(f"{prefix}paired-seeds") for r in rows):
            lines += ["", *_paired(rows, partitions, titles, prefix, spec.headline)]
    return lines


def _detail(
    rows: list[dict[str, Any]],
    published: tuple[str, str, tuple[float, float | None]] | None = None,
) -> list[str]:
    """One partition's rows; ``published`` = (row label, metric, (mean, std)) adds the
    published row, its value in the column of its metric."""
    target = next((r["target-accuracy"] for r in rows if r["target-accuracy"]), None)
    spread = any(r["scope-spread"] for r in rows)
    head = ["variant", "keys", "final acc", "best acc"]
    head += [f"rounds to {100 * target:g}%"] if target else []
    head += ["s/round", "seeds", "diverged"] + (["scope spread"] if spread else [])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cols = [_row_label(r), f"`{json.dumps(r['keys'])}`", _pct(r["final-accuracy"])]
        cols.append(_pct(r["best-accuracy"]))
        if target:
            cols.append(f"{_num(r['rounds-to-target'], 1)} ({r['reached-target']}/{r['seeds']})")
        cols += [_num(r["seconds-per-round"], 2), f"{r['seeds']}/{r['seeds-expected']}"]
        cols.append(str(r["diverged"]))
        cols += [_num(r["scope-spread"], 4)] if spread else []
        lines.append("| " + " | ".join(cols) + " |")
    if published:
        label, metric, pair = published
        cols = [label, "–"]
        cols += [
            _pct_or_dash(pair if metric == m else None) for m in ("final-accuracy", "best-accuracy")
        ]
        cols += ["–"] * (len(head) - len(cols))
        lines.append("| " + " | ".join(cols) + " |")
    return lines


def _heatmaps(spec: BenchSpec, out: Path, cells: list[Cell]) -> dict[str, np.ndarray]:
    """Per partition (spec order), the label counts of its finished cell of lowest seed."""
    titles = partition_titles(spec)
    counts: dict[str, np.ndarray] = {}
    for partition in spec.partitions:
        for cell in sorted((c for c in cells if c.partition == partition), key=lambda c: c.seed):
            try:
                record = json.loads((out / cell.path / _PARTITION_FILE).read_text())
            except (OSError, ValueError):
                continue
            counts[f"{titles[partition]} (seed {cell.seed})"] = np.array(record["counts"])
            break
    return counts


def _seed_curves(
    spec: BenchSpec, runs: dict[Cell, list[dict[str, Any]]]
) -> dict[tuple[str, str, str], list[list[float]]]:
    """Per (dataset title, partition, row label), each finished seed's accuracy curve."""
    curves: dict[tuple[str, str, str], list[list[float]]] = {}
    for cell, rows in runs.items():
        label = f"{cell.variant} [{cell.combo}]" if cell.combo else cell.variant
        key = (dataset_title(spec, cell), cell.partition, label)
        curves.setdefault(key, []).append([float(x["test-accuracy"]) for x in rows])
    return curves


def _accuracy_plots(
    spec: BenchSpec,
    out: Path,
    dataset: str,
    partitions: list[str],
    titles: dict[str, str],
    curves: dict[tuple[str, str, str], list[list[float]]],
    published: dict[str, tuple[float, float | None]],
) -> list[str]:
    """Write a dataset's accuracy plots (per round, final round, best round: one panel per
    partition, the published results drawn in) and return their report lines."""
    from ..plots import Reference, dataset_label, plot_accuracy_panels, plot_accuracy_points

    name = dataset_label(dataset)
    per_round: dict[str, dict[str, list[list[float]]]] = {titles[p]: {} for p in partitions}
    for (d, p, label), seed_curves in curves.items():
        if d == dataset and p in partitions:
            per_round[titles[p]][label] = seed_curves
    metric = spec.published.metric if spec.published is not None else ""
    refs = {}
    if spec.published is not None:
        words = {"final-accuracy": "final round", "best-accuracy": "best round"}[metric]
        label = f"published (not run): {spec.published.source}, {words}, ± std"
        refs = {titles[p]: Reference(m, s, label) for p, (m, s) in published.items()}
    png = out / f"accuracy-{dataset}.png"
    plot_accuracy_panels(per_round, png, f"{name}: test accuracy per round", refs)
    lines = [
        "",
        f"![accuracy per round]({png.name})",
        "",
        "Lines: mean over the seeds; bands: the seeds' min to max."
        + (" Dashed: published, not run (band: ± its std)." if refs else ""),
    ]
    for key, pick, words in (
        ("final-accuracy", lambda c: c[-1], "final round"),
        ("best-accuracy", max, "best round"),
    ):
        points = {}  # per panel and variant, each seed's accuracy of that round
        for title, variants in per_round.items():
            points[title] = {v: [pick(c) for c in cs] for v, cs in variants.items()}
        png = out / f"{key}-{dataset}.png"
        ylabel = f"{words} test accuracy"
        shown = refs if metric == key else {}
        plot_accuracy_points(points, png, f"{name}: {ylabel}", ylabel, shown)
        lines += ["", f"![{words} accuracy]({png.name})"]
    lines += [
        "",
        "Points: mean over the seeds; error bars: ± sample std; dots: the seeds."
        + (" Dashed: published, not run (band: ± its std)." if refs else ""),
    ]
    return lines


def write_report(spec: BenchSpec, out: Path, target: float | None = None) -> Path:
    """Write ``summary.json``, ``results.csv``, the plots and ``report.md``; returns the last."""
    from ..plots import dataset_label, partition_heatmaps

    spec = read_choices(spec, out, write=True)
    summary = summarize(spec, out, target)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_csv(summary, out / "results.csv")
    missing = summary["missing"]
    lines = [f"# Benchmark: {spec.source}", ""]
    if spec.description:
        lines += [spec.description, ""]
    state = f"Cells: {summary['finished']} of {summary['cells']} finished"
    if missing:
        shown = ", ".join(f"`{m}`" for m in missing[:20]) + (", ..." if len(missing) > 20 else "")
        state += (
            f"; **{len(missing)} missing** (not run yet, cut off or failed; they are not in "
            f"the tables; run the same command again to resume): {shown}"
        )
    lines += [state + ".", ""]
    lines += [
        f"Seeds {list(spec.seeds)}: mean ± std over the finished seeds. Accuracy: centralized "
        "test accuracy in %, of the last round (final) and of the best round. Rounds to target: "
        "the first round reaching the target accuracy, over the seeds that reach it (reached/"
        "finished). s/round: wall seconds of a round (client training and aggregation; the "
        "central evaluation is excluded).",
        "",
        "Base config: `" + json.dumps(spec.base) + "`",
    ]
    gone = set(missing)
    all_cells = [c for c in spec.cells() if c.label not in gone]
    titles = partition_titles(spec)
    curves = _seed_curves(spec, finished_runs(spec, out))
    for dataset in dict.fromkeys(r["dataset"] for r in summary["rows"]):
        rows = [r for r in summary["rows"] if r["dataset"] == dataset]
        partitions = list(dict.fromkeys(r["partition"] for r in rows))
        published = _published(spec, dataset, partitions)
        row_of = {}  # the published row, in the table of the metric it compares with
        if published and spec.published is not None:
            row_of[spec.published.metric] = (_published_label(spec), published)
        lines += ["", f"## {dataset}", ""]
        lines += _headline(spec, rows, partitions, titles, row_of)
        k = rows[0]["last-rounds"]
        for metric, title in (
            ("final", "Final-round accuracy"),
            ("best", "Best-round accuracy"),
            ("last-rounds", f"Accuracy averaged over each seed's last {k} rounds"),
        ):
            if metric != spec.headline:
                column = HEADLINE_COLUMNS[metric][0]
                lines += ["", f"{title} (%):", ""]
                lines += _pivot(rows, partitions, column, titles, row_of.get(column))
        for n in spec.report_rounds:
            lines += ["", f"Accuracy after round {n} (%):", ""]
            lines += _pivot(rows, partitions, f"round-{n}-accuracy", titles)
        for prefix in ("", *CONTROLS):
            if any(r.get(f"{prefix}paired-seeds") for r in rows):
                for metric in seed_metrics(spec):
                    if metric != spec.headline:  # the headline's tables lead the section
                        lines += ["", *_paired(rows, partitions, titles, prefix, metric)]
        if spec.tuning is not None:
            lines += ["", *tuning_lines(spec, out, dataset)]
        lines += _accuracy_plots(spec, out, dataset, partitions, titles, curves, published)
        cells = [c for c in all_cells if dataset_title(spec, c) == dataset]
        counts = _heatmaps(spec, out, cells)
        if counts:
            png = out / f"partitions-{dataset}.png"
            title = f"{dataset_label(dataset)}: samples per client and class"
            partition_heatmaps(counts, png, title)
            lines += ["", f"![partitions]({png.name})"]
        for p in partitions:
            lines += ["", f"### {dataset}, {titles[p]} (partition `{p}`)", ""]
            mine = None
            if p in published and spec.published is not None:
                mine = (_published_label(spec), spec.published.metric, published[p])
            lines += _detail([r for r in rows if r["partition"] == p], mine)
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
