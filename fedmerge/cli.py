"""The ``fedmerge`` command.

    fedmerge run [--config FILE.toml] [--engine local|flower] [--overwrite] [key=value ...]
    fedmerge run --resume DIR [--engine local|flower]
    fedmerge strategies | datasets | models
    fedmerge partitions [--config FILE.toml] [--out FILE.png] [key=value ...]
    fedmerge simulate APP_DIR --num-supernodes N [--run-config "k=v ..."] [--workers W] [--seed S]

``key=value`` arguments use the run-config keys of ``pyproject.toml`` (the same keys as
``flwr run --run-config``). Any configuration error ends with one line naming the key and
what is allowed, and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .cli_args import floats, overrides_last
from .command_config import command_config, config_from_args, warn_unused
from .config import RunConfig, parse_overrides
from .errors import FedmergeError

console = Console()
err_console = Console(stderr=True)


def _config(args: argparse.Namespace) -> RunConfig:
    return config_from_args(args)


# -- run --------------------------------------------------------------------------------
def _summary(run_dir: Path, seconds: float) -> None:
    from .results import read_metrics

    rows = read_metrics(run_dir)
    table = Table(title=f"fedmerge run: {run_dir.name}", title_justify="left")
    for col in ("round", "test-accuracy", "test-loss", "train-loss", "round-time"):
        table.add_column(col, justify="right")
    shown = rows if len(rows) <= 12 else rows[:3] + rows[-8:]
    for i, row in enumerate(shown):
        if len(rows) > 12 and i == 3:
            table.add_row("...", "", "", "", "")
        table.add_row(
            str(row["round"]),
            f"{row['test-accuracy']:.4f}",
            f"{row['test-loss']:.4f}",
            f"{row['train-loss']:.4f}" if "train-loss" in row else "",
            f"{row['round-time']:.2f}s" if "round-time" in row else "",
        )
    console.print(table)
    best = max(rows, key=lambda r: r["test-accuracy"])
    console.print(
        f"final accuracy {rows[-1]['test-accuracy']:.4f}  |  best {best['test-accuracy']:.4f} "
        f"(round {best['round']})  |  {seconds:.1f} s  |  results in {run_dir}",
        soft_wrap=True,
    )


def _run_config(args: argparse.Namespace) -> RunConfig:
    """The config of ``fedmerge run``: the arguments', or with --resume the run's own."""
    from .runner import resume_config

    if not args.resume:
        return _config(args)
    if args.config:
        raise FedmergeError("--resume uses the run's own config.json; drop --config")
    if args.overwrite:
        raise FedmergeError("--overwrite and --resume exclude each other")
    return resume_config(args.resume, parse_overrides(args.overrides))


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import AlreadyFinished, prepare, quiet_flower, run

    quiet_flower(args.verbose)
    try:
        cfg = _run_config(args)
    except AlreadyFinished as exc:
        console.print(str(exc), highlight=False, soft_wrap=True)
        return 0
    # every config and data error surfaces before any output
    cfg = prepare(cfg, overwrite=args.overwrite)
    flower_options: dict[str, Any] = {}
    if args.engine == "flower":
        flower_options = {
            "cpus_per_client": args.cpus_per_client,
            "gpus_per_client": args.gpus_per_client,
        }
        if args.app_dir:
            flower_options["app_dir"] = Path(args.app_dir).resolve()
        if args.verbose:
            flower_options["on_line"] = lambda line: console.print(
                line, markup=False, highlight=False
            )
    start = time.perf_counter()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=args.quiet,
    ) as progress:
        task = progress.add_task(f"{cfg.strategy} ({args.engine})", total=cfg.num_rounds, status="")

        def on_round(row: dict[str, Any]) -> None:
            progress.update(
                task,
                completed=row["round"],
                status=f"acc {row['test-accuracy']:.4f}  loss {row['test-loss']:.4f}",
            )
            if not args.quiet:
                progress.console.print(
                    f"round {row['round']:>3}/{cfg.num_rounds}  test-accuracy "
                    f"{row['test-accuracy']:.4f}  test-loss {row['test-loss']:.4f}",
                    highlight=False,
                )

        if cfg.resume:
            done = _rounds_done(Path(cfg.output_dir) / cfg.run_name)
            progress.update(task, completed=done, status=f"resumed after round {done}")
        run_dir = run(
            cfg,
            args.engine,
            on_round=on_round,
            flower_options=flower_options,
            overwrite=args.overwrite,
        )
    _summary(run_dir, time.perf_counter() - start)
    return 0


def _rounds_done(run_dir: Path) -> int:
    from .checkpoint import load_checkpoint

    return load_checkpoint(run_dir).round


# -- simulate ---------------------------------------------------------------------------
def cmd_simulate(args: argparse.Namespace) -> int:
    from .engine.simulate import simulate
    from .runner import quiet_flower

    quiet_flower(verbose=not args.quiet)  # Flower's log once (its handler), unless --quiet
    result = simulate(
        args.app_dir,
        args.num_supernodes,
        args.run_config or None,
        workers=args.workers,
        seed=args.seed,
    )
    if not args.quiet:
        console.print(
            f"simulated {Path(args.app_dir).resolve()} on {result.num_supernodes} supernodes "
            f"({result.workers} worker{'s' if result.workers > 1 else ''}, seed {result.seed})"
            f" in {result.seconds:.2f} s",
            highlight=False,
            soft_wrap=True,
        )
    return 0


# -- listings ---------------------------------------------------------------------------
def cmd_strategies(args: argparse.Namespace) -> int:
    from .strategies.registry import STRATEGIES

    table = Table("strategy", "what it does", title="strategies (run-config key: strategy)")
    for name, (_, text) in STRATEGIES.items():
        table.add_row(name, text)
    console.print(table)
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from .datasets import describe_datasets

    table = Table(
        "dataset", "input", "classes", "train", "test", "source", title="datasets (key: dataset)"
    )
    training = Table(
        "dataset",
        "lr",
        "batch-size",
        "local-epochs",
        "from",
        title="training defaults (when lr, batch-size, local-epochs are 0, the default)",
    )
    for d in describe_datasets():
        table.add_row(
            d["name"],
            "x".join(map(str, d["input_shape"])),
            str(d["num_classes"]),
            str(d["train_size"] or "varies"),
            str(d["test_size"] or "varies"),
            d["source"],
        )
        t = d["training"]
        training.add_row(
            d["name"], f"{t['lr']:g}", str(t["batch-size"]), str(t["local-epochs"]), t["source"]
        )
    console.print(table)
    console.print(training)
    console.print("A value set by hand wins; fedmerge's were tuned on digits.")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import MODELS, build_model, count_parameters

    table = Table(
        "model", "parameters (28x28, 10 classes)", "description", title="models (key: model)"
    )
    for name, builder in MODELS.items():
        n = count_parameters(build_model(name, (1, 28, 28), 10, seed=0))
        doc = (builder.__doc__ or "").strip().splitlines()[0] if builder.__doc__ else ""
        table.add_row(name, f"{n:,}", doc)
    console.print(table)
    return 0


def cmd_partitions(args: argparse.Namespace) -> int:
    from .federation import DataSpec, load_data, partition_indices
    from .partitions import label_counts
    from .plots import partition_heatmap

    cfg, read = command_config(args)
    spec = DataSpec.of(cfg)
    data = load_data(spec)
    parts = partition_indices(spec)
    counts = label_counts(list(parts), data.y_train.numpy(), data.num_classes)
    title = f"{cfg.dataset}: {cfg.partition} partition, {cfg.num_clients} clients, seed {cfg.seed}"
    table = Table("client", *[str(c) for c in range(data.num_classes)], "total", title=title)
    for i, row in enumerate(counts):
        table.add_row(str(i), *[str(int(v)) for v in row], str(int(row.sum())))
    console.print(table)
    out = Path(args.out or f"partition-{cfg.dataset}-{cfg.partition}-{cfg.num_clients}.png")
    partition_heatmap(counts, out, title)
    console.print(f"heatmap saved to {out}")
    warn_unused("partitions", args, read)
    return 0


def cmd_connectivity(args: argparse.Namespace) -> int:
    import json

    from .experiments.connectivity import connectivity_experiment
    from .plots import plot_paths

    cfg, read = command_config(args)
    seeds = tuple(int(v) for v in floats(args.seeds, "--seeds"))
    if len(seeds) != 2 or seeds[0] == seeds[1]:
        raise FedmergeError(f"--seeds: got {args.seeds!r}; allowed: two different seeds, e.g. 1,2")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = connectivity_experiment(
        cfg,
        lambdas=floats(args.lambdas, "--lambdas"),
        epochs=args.epochs,
        seeds=seeds,
        split=args.split,
        points=args.points,
        match_method=None if args.match == "none" else args.match,
    )
    matched = args.match != "none"
    title = (
        f"{cfg.model} on {cfg.dataset}, seeds {seeds[0]} and {seeds[1]}, {args.epochs} epochs, "
        f"split {args.split}" + (f", {args.match} matching" if matched else "")
    )
    table = Table(
        "lambda",
        "acc A",
        "acc B",
        "acc t=0.5",
        "acc barrier",
        "loss barrier",
        "scope gap",
        title=f"linear mode connectivity: {title}",
    )
    aligned = Table(
        "lambda", "acc t=0.5", "acc barrier", "loss barrier", title=f"after {args.match} matching"
    )
    for r in results:
        table.add_row(
            f"{r['wsa-lambda']:g}",
            f"{r['accuracy-a']:.4f}",
            f"{r['accuracy-b']:.4f}",
            f"{r['accuracy-mid']:.4f}",
            f"{r['accuracy-barrier']:.4f}",
            f"{r['loss-barrier']:.4f}",
            f"{r['scope-gap']:.4f}",
        )
        if matched:
            keys = ("matched-accuracy-mid", "matched-accuracy-barrier", "matched-loss-barrier")
            aligned.add_row(f"{r['wsa-lambda']:g}", *(f"{r[k]:.4f}" for k in keys))
    console.print(table)
    if matched:
        console.print(aligned)
    (out / "connectivity.json").write_text(
        json.dumps({"config": cfg.to_mapping(), "title": title, "results": results}, indent=2)
    )
    plot_paths(results, out / "connectivity.png", title, "wsa-lambda")
    console.print(f"results in {out}", soft_wrap=True)
    warn_unused("connectivity", args, read)
    return 0


def cmd_merge_experiment(args: argparse.Namespace) -> int:
    import json

    from .experiments.one_shot import one_shot_experiment, user_model_factory

    cfg, read = command_config(args)
    pairs = [int(v) for v in floats(args.pairs, "--pairs")]
    betas = floats(args.betas, "--betas")
    if not pairs or any(not 0 <= b <= 1 for b in betas):
        raise FedmergeError(
            f"--pairs/--betas: got {args.pairs!r}/{args.betas!r}; allowed: at least one pair, "
            "betas in [0, 1]"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    factory = user_model_factory(args.model_class) if args.model_class else None
    rows, summary = one_shot_experiment(
        cfg,
        pairs=pairs,
        epochs=args.epochs,
        betas=betas,
        merge_samples=args.merge_samples,
        model_factory=factory,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    model = args.model_class or cfg.model
    title = (
        f"one-shot merge: {model} on {cfg.dataset}, classes split in halves, "
        f"{args.epochs} epochs, {len(pairs)} pair(s), {args.merge_samples} merge-site samples"
    )
    table = Table("method", "joint accuracy", "gap closed", "merge s", title=title)
    for r in summary:
        gap = "" if r["gap-closed"] != r["gap-closed"] else f"{100 * r['gap-closed']:.0f}%"
        table.add_row(
            r["method"],
            f"{100 * r['accuracy-mean']:.2f} ± {100 * r['accuracy-std']:.2f}",
            gap,
            f"{r['seconds-mean']:.2f}",
        )
    console.print(table)
    (out / "merge-experiment.json").write_text(
        json.dumps(
            {"config": cfg.to_mapping(), "title": title, "rows": rows, "summary": summary},
            indent=2,
        )
    )
    console.print(f"results in {out}", soft_wrap=True)
    warn_unused("merge-experiment", args, read)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fedmerge`` command."""
    parser = argparse.ArgumentParser(
        prog="fedmerge",
        description="Federated learning on Non-IID data with model-merging aggregation (Flower).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="TOML file of run-config keys (or a pyproject.toml)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="run-config overrides")

    p = sub.add_parser("run", help="run a federated simulation")
    config_args(p)
    p.add_argument(
        "--engine",
        choices=("local", "flower"),
        default="local",
        help="local: in-process (default); flower: Flower's simulation engine (Ray)",
    )
    p.add_argument(
        "--cpus-per-client",
        type=float,
        default=1.0,
        help="flower engine: client-resources-num-cpus (default 1)",
    )
    p.add_argument(
        "--gpus-per-client",
        type=float,
        default=0.0,
        help="flower engine: client-resources-num-gpus (default 0)",
    )
    p.add_argument("--app-dir", help="flower engine: the fedmerge project folder (default: found)")
    p.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the interrupted run in DIR (its results folder) from its checkpoint, "
        "with its own config",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results an explicit run-name already holds",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("-v", "--verbose", action="store_true", help="show Flower's own log")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "simulate",
        help="run any Flower app (a folder with pyproject.toml) on fedmerge's in-process engine",
    )
    p.add_argument("app_dir", metavar="APP_DIR", help="the Flower app folder")
    p.add_argument("--num-supernodes", type=int, required=True, help="simulated nodes (partitions)")
    p.add_argument(
        "--run-config",
        "-c",
        action="append",
        default=[],
        metavar='"k=v ..."',
        help="run-config overrides as for flwr run (TOML values; repeatable) or one FILE.toml",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes running the ClientApp (0: one per CPU core, default; 1: in-process)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds random, numpy, torch (default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no Flower log, no summary")
    p.set_defaults(func=cmd_simulate)

    sub.add_parser("strategies", help="list strategies").set_defaults(func=cmd_strategies)
    sub.add_parser("datasets", help="list datasets").set_defaults(func=cmd_datasets)
    sub.add_parser("models", help="list models").set_defaults(func=cmd_models)

    p = sub.add_parser(
        "connectivity",
        help="loss/accuracy barrier between two models, with and without a shared WSA scope "
        "(and neuron matching: --match)",
    )
    config_args(p)
    p.add_argument("--lambdas", default="0,0.01,0.1,1", help="wsa-lambda values (0 = no WSA)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs of each model")
    p.add_argument("--seeds", default="1,2", help="initialisation/shuffling seeds of A and B")
    p.add_argument(
        "--split",
        choices=("same", "partition"),
        default="same",
        help="same: both see all data; partition: clients 0 and 1 of a 2-client split",
    )
    p.add_argument("--points", type=int, default=11, help="points on the path, ends included")
    p.add_argument(
        "--match",
        choices=("none", "weight", "activation", "dual"),
        default="none",
        help="also measure the path after aligning B's units to A's with this matcher "
        "(match-beta, match-max-sweeps apply)",
    )
    p.add_argument("--out", default="runs/connectivity", help="output folder")
    p.set_defaults(func=cmd_connectivity)

    p = sub.add_parser(
        "merge-experiment",
        help="one-shot merge of two models trained on disjoint halves of the classes",
    )
    config_args(p)
    p.add_argument("--pairs", default="0,1,2", help="pair seeds (model seeds 2s and 2s+1)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs of each model")
    p.add_argument("--betas", default="0.25,0.5,0.75", help="dual-space (MuDSC) beta values")
    p.add_argument(
        "--merge-samples", type=int, default=1000, help="labelled samples at the merge site"
    )
    p.add_argument("--out", default="runs/merge-experiment", help="output folder")
    p.add_argument(
        "--model-class",
        help="your own model instead of model=: FILE.py:Class or module:Class, built with no "
        "arguments (a spec is inferred when it has no permutation_spec())",
    )
    p.set_defaults(func=cmd_merge_experiment)

    p = sub.add_parser("partitions", help="per-client label counts and a heatmap PNG")
    config_args(p)
    p.add_argument("--out", help="PNG path (default: partition-<dataset>-<scheme>-<n>.png)")
    p.set_defaults(func=cmd_partitions)

    from .bench.analyses import add_parsers as add_analyses  # imports no torch: --help stays fast

    add_analyses(sub)

    from .bench.grid import add_parser as add_bench_parser  # imports no torch either

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedmerge`` console script."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(overrides_last(parser, sys.argv[1:] if argv is None else argv))
    try:
        return args.func(args)
    except FedmergeError as exc:
        # Messages name TOML tables ([tool.flwr.app]): not rich markup.
        err_console.print(
            f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted: rounds already finished are in the results folder")
        return 130


if __name__ == "__main__":
    sys.exit(main())
