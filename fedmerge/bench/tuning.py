"""Choosing a bench variant's hyper-parameters on a validation split (``[tune]`` of a spec).

Each trial (one value of a ``[tune.VARIANT]`` grid, one tuning seed) is a simulation scored on
``validation-size`` training samples held out for the purpose, never on the test split. Per
row of the results table (dataset, partition, variant, grid combination), the trial with the
best mean of the spec's headline metric over the tuning seeds gives the keys of the row's
cells; ties go to the trial listed first. The choice and every trial's score are written to
``tuning.json`` in the results folder, and the report prints them.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .grid_spec import BenchSpec, Cell, accuracy_metric

TUNING_FILE = "tuning.json"
Group = tuple[str, str, str, str]


def trial_scores(spec: BenchSpec, out: Path) -> dict[Group, dict[str, list[float]]]:
    """Per tuned row, per trial label, the headline on validation of each finished seed."""
    from ..results import read_metrics

    score = accuracy_metric(spec.headline, spec.last_rounds)
    scores: dict[Group, dict[str, list[float]]] = {}
    for cell, label in spec.trial_cells():
        row = scores.setdefault(cell.group, {}).setdefault(label, [])
        cfg = spec.trial_config(cell, label, out)
        try:
            rows = read_metrics(out / spec.trial_path(cell, label))
        except (OSError, ValueError):
            continue
        if len(rows) == cfg.num_rounds + 1:
            row.append(score(rows))
    return scores


def choose(spec: BenchSpec, out: Path, *, write: bool = True) -> dict[Group, dict[str, Any]]:
    """Per tuned row whose trials all finished, the keys of its best trial; ``write`` records
    every trial's scores and the choices in ``tuning.json`` (rows still waiting for trials
    are listed there with no choice)."""
    if spec.tuning is None:
        return {}
    tuning = spec.tuning
    chosen: dict[Group, dict[str, Any]] = {}
    record = []
    for group, trials in trial_scores(spec, out).items():
        means = {label: statistics.fmean(v) if v else None for label, v in trials.items()}
        best = None
        if all(len(values) == len(tuning.seeds) for values in trials.values()):
            # max() keeps the first of equal scores: ties go to the trial listed first
            best = max(trials, key=lambda label: statistics.fmean(trials[label]))
            chosen[group] = dict(tuning.trials[group[2]][best])
        record.append(
            {
                "row": list(group),
                "label": Cell(*group, 0).path.parent.as_posix(),
                "metric": spec.headline,
                "trials": [
                    {"trial": label, "validation": trials[label], "mean": means[label]}
                    for label in trials
                ],
                "chosen": best,
                "keys": chosen.get(group),
            }
        )
    if record and write:
        (out / TUNING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return chosen


def read_choices(spec: BenchSpec, out: Path, *, write: bool = False) -> BenchSpec:
    """``spec`` with the choices its finished trials in ``out`` make."""
    if spec.tuning is None:
        return spec
    return spec.with_choices(choose(spec, out, write=write))


def tuning_lines(spec: BenchSpec, out: Path, dataset: str) -> list[str]:
    """The report's table of the trials of one dataset: validation score per trial, the
    choice in bold."""
    path = out / TUNING_FILE
    if spec.tuning is None or not path.is_file():
        return []
    rows = [r for r in json.loads(path.read_text()) if (r["row"][0] or dataset) == dataset]
    if not rows:
        return []
    what = {"final": "final-round", "best": "best-round", "last-rounds": "last-rounds"}
    lines = [
        f"Tuned on validation ({spec.tuning.validation_size} training samples held out; the "
        f"{what[spec.headline]} accuracy in %, mean over tuning seeds "
        f"{list(spec.tuning.seeds)}; the test split is not read). The chosen trial in bold:",
        "",
        "| row | trials (validation accuracy %) | chosen |",
        "|---|---|---|",
    ]
    for r in rows:
        cells = []
        for t in r["trials"]:
            text = f"{t['trial']}: " + ("–" if t["mean"] is None else f"{100 * t['mean']:.2f}")
            cells.append(f"**{text}**" if t["trial"] == r["chosen"] else text)
        label = "/".join(p for p in r["row"][1:] if p)
        lines.append(f"| {label} | " + "; ".join(cells) + f" | {r['chosen'] or 'waiting'} |")
    return lines
