"""FedMA against the other strategies of a grid at equal Flower rounds, equal client epochs and
equal megabytes sent, from a finished ``fedmerge bench`` folder (the ``fedma`` preset).

    python -m fedmerge.bench.fedma_costs runs/fedma [--reference fedavg] [--plots DIR]

For every variant and seed, each round's cost is added up from the run's own metrics and
config: client epochs (``local-epochs`` a round; in FedMA's matching phases
``fedma-retrain-epochs``) times the clients that replied, and megabytes of arrays sent both
ways (FedMA reports ``fedma-mb-down`` / ``fedma-mb-up``; every other strategy sends the model
to each sampled client and receives it back: 2 x model size x clients). Printed, as mean ± std
over seeds: the final accuracy; the reference's accuracy at the round whose cumulative cost
first reaches each variant's final cost (epochs, megabytes); the Flower rounds and megabytes
each needs to reach the other's final accuracy. Plots (``--plots``): accuracy against rounds
and against megabytes, the mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..results import read_metrics


def _model_mb(config: dict[str, Any]) -> float:
    """Megabytes of the run's initial model (float32 arrays)."""
    from ..config import RunConfig
    from ..federation import DataSpec, load_data, make_model

    cfg = RunConfig.from_mapping(config)
    model = make_model(cfg, load_data(DataSpec.of(cfg)))
    return sum(v.numel() * v.element_size() for v in model.state_dict().values()) / 1e6


def costs(run_dir: Path, model_mb: float | None = None) -> list[dict[str, float]]:
    """Per round of one run: accuracy and cumulative rounds, client epochs and megabytes."""
    rows = read_metrics(run_dir)
    config = json.loads((run_dir / "config.json").read_text())["config"]
    out, epochs, mb = [], 0.0, 0.0
    for row in rows[1:]:
        clients = float(row.get("num-clients", 0))
        if "fedma-phase" in row:
            retrain = int(row["fedma-phase"]) > 0
            each = config["fedma-retrain-epochs"] if retrain else config["local-epochs"]
            mb += float(row["fedma-mb-down"]) + float(row["fedma-mb-up"])
        else:
            each = config["local-epochs"]
            size = model_mb if model_mb is not None else _model_mb(config)
            model_mb = size
            mb += 2 * size * clients
        epochs += each * clients
        out.append(
            {
                "round": float(row["round"]),
                "accuracy": float(row["test-accuracy"]),
                "epochs": epochs,
                "mb": mb,
            }
        )
    return out


def _at(curve: Sequence[dict[str, float]], key: str, budget: float) -> float:
    """Accuracy at the first round whose cumulative ``key`` reaches ``budget`` (else the last)."""
    for point in curve:
        if point[key] >= budget - 1e-9:
            return point["accuracy"]
    return curve[-1]["accuracy"]


def _reach(curve: Sequence[dict[str, float]], target: float, key: str) -> float | None:
    """Cumulative ``key`` at the first round reaching ``target`` accuracy (None: never)."""
    for point in curve:
        if point["accuracy"] >= target - 1e-12:
            return point[key]
    return None


def _ms(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def load(folder: Path) -> dict[str, dict[str, list[dict[str, float]]]]:
    """``{variant: {seed folder: per-round costs}}`` of every finished cell under ``folder``."""
    out: dict[str, dict[str, list[dict[str, float]]]] = {}
    sizes: dict[str, float] = {}
    for metrics in sorted(folder.glob("*/*/*/s*/metrics.json")):
        cell = metrics.parent
        variant = cell.parent.name
        config = json.loads((cell / "config.json").read_text())["config"]
        key = f"{config.get('model')}-{config.get('dataset')}"
        if key not in sizes and "fedma" not in str(config.get("strategy")):
            sizes[key] = _model_mb(config)
        out.setdefault(variant, {})[cell.name] = costs(cell, sizes.get(key))
    return out


def report(folder: Path, reference: str = "fedavg") -> str:
    """The comparison table (markdown)."""
    runs = load(folder)
    if reference not in runs:
        raise SystemExit(f"no finished {reference!r} cells in {folder}; variants: {sorted(runs)}")
    lines = [
        f"| variant | final accuracy % | {reference} at equal epochs % | {reference} at equal MB % "
        f"| client epochs | MB sent | rounds to {reference}'s final | MB to {reference}'s final "
        f"| {reference}: rounds to this final | {reference}: MB to this final |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = runs[reference]
    for variant, seeds in runs.items():
        finals: list[float] = []
        at_epochs: list[float] = []
        at_mb: list[float] = []
        epochs: list[float] = []
        mb: list[float] = []
        rounds_to: list[float] = []
        mb_to: list[float] = []
        ref_rounds: list[float] = []
        ref_mb: list[float] = []
        for seed, curve in seeds.items():
            if seed not in ref:
                continue
            last, base = curve[-1], ref[seed]
            finals.append(100 * last["accuracy"])
            at_epochs.append(100 * _at(base, "epochs", last["epochs"]))
            at_mb.append(100 * _at(base, "mb", last["mb"]))
            epochs.append(last["epochs"])
            mb.append(last["mb"])
            for values, curve_, target, key in (
                (rounds_to, curve, base[-1]["accuracy"], "round"),
                (mb_to, curve, base[-1]["accuracy"], "mb"),
                (ref_rounds, base, last["accuracy"], "round"),
                (ref_mb, base, last["accuracy"], "mb"),
            ):
                found = _reach(curve_, target, key)
                if found is not None:
                    values.append(found)
        lines.append(
            f"| {variant} | {_ms(finals)} | {_ms(at_epochs)} | {_ms(at_mb)} | {_ms(epochs)} "
            f"| {_ms(mb)} | {_ms(rounds_to)} ({len(rounds_to)}/{len(finals)}) "
            f"| {_ms(mb_to)} | {_ms(ref_rounds)} ({len(ref_rounds)}/{len(finals)}) "
            f"| {_ms(ref_mb)} |"
        )
    return "\n".join(lines)


def plot(folder: Path, out: Path) -> None:
    """Accuracy against Flower rounds and against megabytes sent (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load(folder)
    out.mkdir(parents=True, exist_ok=True)
    for key, label, name in (("round", "Flower round", "rounds"), ("mb", "MB sent", "mb")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant, seeds in runs.items():
            curves = list(seeds.values())
            n = min(len(c) for c in curves)
            xs = [statistics.fmean(c[i][key] for c in curves) for i in range(n)]
            ys = [100 * statistics.fmean(c[i]["accuracy"] for c in curves) for i in range(n)]
            ax.plot(xs, ys, marker="o", markersize=3, label=variant)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy %")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"fedma-accuracy-{name}.png", dpi=120)
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="a fedmerge bench results folder")
    parser.add_argument("--reference", default="fedavg", help="the variant compared against")
    parser.add_argument("--plots", type=Path, help="write the two plots into this folder")
    args = parser.parse_args(argv)
    print(report(args.folder, args.reference))
    if args.plots:
        plot(args.folder, args.plots)
        print(f"plots in {args.plots}")


if __name__ == "__main__":
    main()
