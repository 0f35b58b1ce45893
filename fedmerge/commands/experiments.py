"""``fedmerge connectivity`` and ``fedmerge merge-experiment``: the experiments on the library
(:mod:`fedmerge.experiments`) as commands.

    fedmerge connectivity [--config FILE] [key=value ...] [--lambdas 0,0.01,0.1,1] [--epochs 3]
        [--seeds 1,2] [--split same|partition] [--points 11] [--match none|weight|...] [--out DIR]
    fedmerge merge-experiment [--config FILE] [key=value ...] [--pairs 0,1,2] [--epochs 5]
        [--betas 0.25,0.5,0.75] [--merge-samples 1000] [--model-class FILE.py:Class] [--out DIR]

Each prints its table and writes its JSON (and, for connectivity, a plot) into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..cli_args import floats
from ..command_config import command_config, config_args, warn_unused
from ..errors import FedmergeError

# The library (torch, matplotlib) is imported inside the commands: `fedmerge --help` and the
# parser that add_parsers() extends stay fast.
console = Console()


def cmd_connectivity(args: argparse.Namespace) -> int:
    import json

    from ..experiments.connectivity import connectivity_experiment
    from ..plots import plot_paths

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

    from ..experiments.one_shot import one_shot_experiment, user_model_factory

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


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``connectivity`` and ``merge-experiment`` to the ``fedmerge`` command's subparsers."""
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
