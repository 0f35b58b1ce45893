"""Run a grid of simulations (variants x partitions x seeds) and tabulate mean +- std.

    python -m fedmerge.bench.sweep SPEC.toml --out DIR [--jobs N] [--report-only]

SPEC.toml::

    seeds = [0, 1, 2]
    [base]                      # run-config keys shared by every cell
    dataset = "fashion-mnist"
    [partitions.c2]             # one table per partition (name -> run-config keys)
    partition = "label-quantity"
    partition-k = 2
    [variants.fedavg]           # one row per variant (name -> run-config keys)
    strategy = "fedavg"

Each cell (partition, variant, seed) is one local-engine run, in
``DIR/<partition>/<variant>/s<seed>``.
A cell whose metrics are complete is skipped when the command runs again, so an interrupted
sweep resumes where it stopped (a cell cut off mid-run is run again from its start). The
report (``DIR/report.md``, ``DIR/summary.json``, plots) is rebuilt from the folders alone.

``fedmerge bench SPEC.toml`` (:mod:`fedmerge.bench.grid`) runs these specs too, in the same
folder layout, and adds dataset, ``strategies = "all"`` and ``[grid]`` axes, cells renamed
into place only once finished, parallel jobs by default and rounds to a target accuracy.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tomllib
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import ConfigError, FedmergeError
from ..results import read_metrics

log = logging.getLogger(__name__)


def load_spec(path: Path) -> dict[str, Any]:
    """Read and check a sweep spec (every cell's config is validated before anything runs)."""
    try:
        spec = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("SPEC", str(path), "a readable TOML sweep spec", str(exc)) from None
    for key in ("base", "partitions", "variants"):
        if key not in spec:
            raise ConfigError(key, None, f"a [{key}] table in {path}")
    seeds = spec.get("seeds", [0])
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError("seeds", seeds, "a list of integers >= 0")
    for cell in cells(spec):
        cell_config(spec, *cell, out=Path("."))  # raises on any bad key or value
    return spec


def cells(spec: dict[str, Any]) -> list[tuple[str, str, int]]:
    """Every (partition, variant, seed) of the grid, in run order."""
    return [
        (p, v, s)
        for p in spec["partitions"]
        for v in spec["variants"]
        for s in spec.get("seeds", [0])
    ]


def cell_dir(out: Path, partition: str, variant: str, seed: int) -> Path:
    """Where one cell's results live."""
    return out / partition / variant / f"s{seed}"


def cell_config(
    spec: dict[str, Any], partition: str, variant: str, seed: int, *, out: Path
) -> RunConfig:
    """The run-config of one cell: base, then the partition's keys, then the variant's, then
    the seed and the results folder."""
    folder = cell_dir(out, partition, variant, seed)
    values = {
        **spec["base"],
        **spec["partitions"][partition],
        **spec["variants"][variant],
        "seed": seed,
        "output-dir": str(folder.parent),
        "run-name": folder.name,
    }
    return RunConfig.from_mapping(values)


def is_complete(folder: Path, num_rounds: int) -> bool:
    """A cell is done when its metrics hold every round."""
    try:
        return len(read_metrics(folder)) == num_rounds + 1
    except (OSError, json.JSONDecodeError):
        return False


def _run_cell(cfg_map: dict[str, Any], threads: int) -> str:
    import torch

    from ..runner import quiet_flower, run

    torch.set_num_threads(threads)
    quiet_flower()
    return str(run(RunConfig.from_mapping(cfg_map), "local"))


def run_sweep(spec: dict[str, Any], out: Path, jobs: int = 1) -> None:
    """Run every missing cell (``jobs`` processes at a time)."""
    todo = []
    for cell in cells(spec):
        cfg = cell_config(spec, *cell, out=out)
        folder = cell_dir(out, *cell)
        if is_complete(folder, cfg.num_rounds):
            continue
        if folder.exists():  # cut off mid-run: start the cell again
            shutil.rmtree(folder)
        todo.append((cell, cfg))
    total = len(cells(spec))
    print(f"{total - len(todo)} of {total} cells done; running {len(todo)} with {jobs} job(s)")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    if jobs == 1:
        for i, (cell, cfg) in enumerate(todo, 1):
            _run_cell(cfg.to_mapping(), threads)
            print(f"[{i}/{len(todo)}] {'/'.join(map(str, cell))} done", flush=True)
        return
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_run_cell, cfg.to_mapping(), threads): cell for cell, cfg in todo}
        for i, fut in enumerate(as_completed(futures), 1):
            fut.result()
            print(f"[{i}/{len(todo)}] {'/'.join(map(str, futures[fut]))} done", flush=True)


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if math.isfinite(v)]  # a diverged run has no scope spread
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """Per partition and variant: mean and std over seeds of final and best accuracy, the
    final scope spread, seconds per round, and the mean accuracy / spread curves."""
    summary: dict[str, Any] = {}
    for partition in spec["partitions"]:
        rows = {}
        for variant in spec["variants"]:
            runs = []
            for seed in spec.get("seeds", [0]):
                cfg = cell_config(spec, partition, variant, seed, out=out)
                folder = cell_dir(out, partition, variant, seed)
                if is_complete(folder, cfg.num_rounds):
                    runs.append(read_metrics(folder))
            if not runs:
                continue
            final = [r[-1]["test-accuracy"] for r in runs]
            best = [max(x["test-accuracy"] for x in r) for r in runs]
            spread = [r[-1]["scope-spread"] for r in runs if "scope-spread" in r[-1]]
            secs = [statistics.fmean(x["round-time"] for x in r if "round-time" in x) for r in runs]
            curve = [
                statistics.fmean(r[i]["test-accuracy"] for r in runs) for i in range(len(runs[0]))
            ]
            spread_curve = [
                statistics.fmean(r[i].get("scope-spread", math.nan) for r in runs)
                for i in range(1, len(runs[0]))
            ]
            rows[variant] = {
                "seeds": len(runs),
                # a run whose final test loss is not finite: its weights blew up (NaN / inf)
                "diverged": sum(not math.isfinite(r[-1]["test-loss"]) for r in runs),
                "final": _mean_std(final),
                "best": _mean_std(best),
                "scope-spread": _mean_std(spread),
                "seconds-per-round": statistics.fmean(secs),
                "accuracy-curve": curve,
                "scope-spread-curve": spread_curve,
            }
        summary[partition] = rows
    return summary


def write_report(spec: dict[str, Any], out: Path) -> Path:
    """Write ``summary.json``, ``report.md`` and one plot per partition; returns the report."""
    from ..plots import plot_sweep

    summary = summarize(spec, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"# Sweep report: {out.name}",
        "",
        "Base config: `" + json.dumps(spec["base"]) + "`",
        "",
    ]
    lines.append(f"Seeds: {spec.get('seeds', [0])}; mean +- std over seeds; accuracy in %.")
    for partition, rows in summary.items():
        keys = json.dumps(spec["partitions"][partition])
        lines += ["", f"## {partition} (`{keys}`)", ""]
        lines.append(
            "| variant | keys | final acc | best acc | scope spread (last round) | s/round "
            "| seeds | diverged |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for variant, r in rows.items():
            fm, fs = r["final"]
            bm, bs = r["best"]
            sm, ss = r["scope-spread"]
            lines.append(
                f"| {variant} | `{json.dumps(spec['variants'][variant])}` "
                f"| {100 * fm:.2f} +- {100 * fs:.2f} "
                f"| {100 * bm:.2f} +- {100 * bs:.2f} | {sm:.4f} +- {ss:.4f} "
                f"| {r['seconds-per-round']:.2f} | {r['seeds']} | {r['diverged']} |"
            )
        png = out / f"{partition}.png"
        plot_sweep(rows, png, f"{partition}: {keys}")
        lines += ["", f"![{partition}]({png.name})"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line of the sweep."""
    parser = argparse.ArgumentParser(
        prog="python -m fedmerge.bench.sweep", description=__doc__.splitlines()[0]
    )
    parser.add_argument("spec", type=Path, help="sweep spec (TOML)")
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    parser.add_argument("--jobs", type=int, default=1, help="cells run in parallel processes")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        spec = load_spec(args.spec)
        args.out.mkdir(parents=True, exist_ok=True)
        if args.spec.resolve() != (args.out / "spec.toml").resolve():
            shutil.copy(args.spec, args.out / "spec.toml")
        if not args.report_only:
            run_sweep(spec, args.out, max(1, args.jobs))
        print(f"report: {write_report(spec, args.out)}")
    except FedmergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
