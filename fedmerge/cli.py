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

from .cli_args import overrides_last
from .command_config import command_config, config_args, config_from_args, warn_unused
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fedmerge`` command."""
    parser = argparse.ArgumentParser(
        prog="fedmerge",
        description="Federated learning on Non-IID data with model-merging aggregation (Flower).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    p = sub.add_parser("partitions", help="per-client label counts and a heatmap PNG")
    config_args(p)
    p.add_argument("--out", help="PNG path (default: partition-<dataset>-<scheme>-<n>.png)")
    p.set_defaults(func=cmd_partitions)

    # The experiment commands (connectivity, merge-experiment, analyse) and the bench import no
    # torch at import time: `fedmerge --help` stays fast.
    from .commands.analyse import add_parsers as add_analyses
    from .commands.experiments import add_parsers as add_experiments

    add_experiments(sub)
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
