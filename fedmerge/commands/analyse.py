"""``fedmerge analyse``: the weight-averaging analyses of arXiv 2411.09263 as commands.

    fedmerge analyse weight-patterns [key=value ...] [--epochs 3] [--clients 3] [--out DIR]
    fedmerge analyse soups   [key=value ...] [TRAINING] [--feature-head soup|first] [--out DIR]
    fedmerge analyse scaling [key=value ...] [TRAINING] [--factors 100] [--out DIR]
    fedmerge analyse all     [key=value ...] [all of the above] [--probes soups,scaling]

    TRAINING: [--epochs N] [--warmup-rounds R] [--settings shared,independent]
              [--independent-data shards|full]

``key=value`` are run-config keys (dataset, data-root, model, partition, num-clients,
proxy-size...). Each probe prints its table and writes ``DIR/<probe>.json`` (config, title,
rows), ``DIR/<probe>.md`` (the table in Markdown) and its PNG plot(s); ``all`` runs the three,
``soups`` and ``scaling`` on the same trained models. The same commands run as
``python -m fedmerge.commands.analyse PROBE ...``. What each probe does and every choice it makes:
:mod:`fedmerge.analysis`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from ..cli_args import floats, overrides_last
from ..command_config import command_config, config_args, warn_unused
from ..config import RunConfig
from ..errors import ConfigError, FedmergeError, unknown_name

# The library (torch, matplotlib) is imported inside the commands: `fedmerge --help` and the
# parser that add_parsers() extends stay fast.
if TYPE_CHECKING:
    from ..experiments.analysis import ModelSet

console = Console()
err_console = Console(stderr=True)

HEAD_HELP = "head of the feature ensemble: soup (the uniform soup's, default) or first (model 0's)"
#: The probes, in the order ``all`` runs them.
PROBES: tuple[str, ...] = ("weight-patterns", "soups", "scaling")

#: Table columns per probe: (header, row key, format); "{model}" is the config's model name.
Column = tuple[str, str, str]
PATTERN_COLUMNS: tuple[Column, ...] = (
    ("data", "data", "s"),
    ("samples", "samples", "d"),
    ("classes seen", "classes-seen", "d"),
    ("classes absent", "classes-absent", "d"),
    ("linear acc", "linear-accuracy", ".4f"),
    ("{model} acc", "{model}-accuracy", ".4f"),
    ("r diag", "corr-diag", ".3f"),
    ("r off-diag", "corr-off", ".3f"),
    ("r diag seen", "corr-diag-seen", ".3f"),
    ("r diag absent", "corr-diag-absent", ".3f"),
    ("r diag raw", "corr-diag-raw", ".3f"),
    ("r off-diag raw", "corr-off-raw", ".3f"),
    ("{model} conv1/fc1 change", "first-layer-change", ".3f"),
)
SOUP_COLUMNS: tuple[Column, ...] = (
    ("initialisation", "setting", "s"),
    ("method", "method", "s"),
    ("test acc", "test-accuracy", ".4f"),
    ("models", "models", "d"),
    ("min", "min", ".4f"),
    ("max", "max", ".4f"),
    ("held-out acc", "held-out", ".4f"),
)
SCALING_COLUMNS: tuple[Column, ...] = (
    ("initialisation", "setting", "s"),
    ("M", "factor", "g"),
    ("scaled", "case", "s"),
    ("models scaled", "scaled", "d"),
    ("test acc", "test-accuracy", ".4f"),
    ("agreement w/ unscaled soup", "agreement-unscaled", ".4f"),
    ("agreement w/ soup of scaled", "agreement-subset", ".4f"),
    ("acc of soup of scaled", "subset-accuracy", ".4f"),
    ("mean |logit| ratio", "logit-ratio", ".3g"),
)


# -- helpers ---------------------------------------------------------------------------------
def _cell(row: Mapping[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, fmt)


def tables(
    title: str, columns: Sequence[Column], rows: Sequence[Mapping[str, Any]], model: str
) -> tuple[Table, str]:
    """The rows as a rich table and as a Markdown table (with the title above it)."""
    cols = [(h.format(model=model), k.format(model=model), f) for h, k, f in columns]
    table = Table(*[h for h, _, _ in cols], title=title, title_justify="left")
    lines = [f"**{title}**", "", "| " + " | ".join(h for h, _, _ in cols) + " |"]
    lines.append("|" + "---|" * len(cols))
    for row in rows:
        cells = [_cell(row, k, f) for _, k, f in cols]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    return table, "\n".join(lines) + "\n"


def _finite(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _write(
    out: Path,
    name: str,
    cfg: RunConfig,
    title: str,
    rows: Sequence[Mapping[str, Any]],
    md: str,
    **extra: Any,
) -> None:
    payload = {"config": cfg.to_mapping(), "title": title, "rows": rows, **extra}
    (out / f"{name}.json").write_text(json.dumps(_finite(payload), indent=2))
    (out / f"{name}.md").write_text(md)


def _factors(text: str) -> list[float]:
    """The ``--factors`` of the scaling probe: numbers > 0."""
    return floats(text, "--factors", positive=True, example="10,100", error=ConfigError)


def _probes(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names or any(name not in PROBES for name in names):
        raise ConfigError("--probes", text, "a comma-separated subset of " + ",".join(PROBES))
    return names


def _settings(text: str) -> list[str]:
    from ..experiments.analysis import SETTINGS

    names = [s.strip() for s in text.split(",") if s.strip()]
    for name in names or [text]:
        if name not in SETTINGS:
            raise ConfigError("--settings", text, "a comma-separated subset of shared,independent")
    return names


def _describe(cfg: RunConfig) -> str:
    part = cfg.partition
    if part == "dirichlet":
        part = f"Dir({cfg.partition_beta:g})"
    elif part == "label-quantity":
        part = f"#C={cfg.partition_k}"
    return f"{cfg.model} on {cfg.dataset}, {cfg.num_clients} clients {part}"


# -- the probes ------------------------------------------------------------------------------
def run_weight_patterns(args: argparse.Namespace, cfg: RunConfig, out: Path) -> None:
    """Train, print, write weight-patterns.{json,md} and the two PNGs."""
    from ..experiments import analysis
    from ..experiments.analysis.plots import plot_filters, plot_templates

    epochs = args.pattern_epochs
    patterns = analysis.weight_patterns(
        cfg, epochs=epochs, clients=args.clients, zero=not args.random_init
    )
    title = f"weight patterns: {_describe(cfg)}, {epochs} epochs"
    table, md = tables(title, PATTERN_COLUMNS, patterns.rows, cfg.model)
    console.print(table)
    extra = {
        "classes": list(patterns.classes),
        "seen": patterns.seen,
        "counts": patterns.counts,
        "correlations": {k: v.tolist() for k, v in patterns.correlations.items()},
    }
    _write(out, "weight-patterns", cfg, title, patterns.rows, md, **extra)
    plot_templates(patterns, out / "weight-patterns-linear.png", f"linear classifier rows; {title}")
    plot_filters(patterns, out / "weight-patterns-filters.png", f"{cfg.model} first layer; {title}")


def _train(args: argparse.Namespace, cfg: RunConfig) -> list[ModelSet]:
    from ..experiments import analysis

    return analysis.model_sets(
        cfg,
        settings=_settings(args.settings),
        epochs=args.epochs,
        warmup_rounds=args.warmup_rounds,
        independent_data=args.independent_data,
    )


def _training_title(args: argparse.Namespace, cfg: RunConfig) -> str:
    epochs = args.epochs or cfg.local_epochs
    settings = _settings(args.settings)
    if settings == ["independent"] and args.independent_data == "full":  # no shards involved
        parts = [f"{cfg.model} on {cfg.dataset}, {cfg.num_clients} models, {epochs} epochs"]
    else:
        parts = [f"{_describe(cfg)}, {epochs} local epochs"]
    if "shared" in settings and args.warmup_rounds:
        parts.append(f"shared start after {args.warmup_rounds} FedAvg rounds")
    if "independent" in settings:
        where = "shards" if args.independent_data == "shards" else "the whole training split"
        parts.append(f"independent models on {where}")
    return "; ".join(parts) + f"; held-out {cfg.proxy_size} training samples"


def run_soups(args: argparse.Namespace, cfg: RunConfig, out: Path, sets: list[ModelSet]) -> None:
    """Score the soups and ensembles of ``sets``; print, write soups.{json,md,png}."""
    from ..experiments import analysis
    from ..experiments.analysis.plots import plot_soups
    from ..federation import DataSpec, load_data
    from ..training import resolve_device

    data, device = load_data(DataSpec.of(cfg)), resolve_device(cfg.device)
    rows = [
        row
        for models in sets
        for row in analysis.soup_rows(models, data, feature_head=args.feature_head, device=device)
    ]
    title = f"weight vs output averaging: {_training_title(args, cfg)}"
    table, md = tables(title, SOUP_COLUMNS, rows, cfg.model)
    console.print(table)
    _write(out, "soups", cfg, title, rows, md)
    plot_soups(rows, out / "soups.png", title)


def run_scaling(args: argparse.Namespace, cfg: RunConfig, out: Path, sets: list[ModelSet]) -> None:
    """Run the scaling probe on ``sets``; print, write scaling.{json,md,png}."""
    from ..experiments import analysis
    from ..experiments.analysis.plots import plot_scaling
    from ..federation import DataSpec, load_data
    from ..training import resolve_device

    data, device = load_data(DataSpec.of(cfg)), resolve_device(cfg.device)
    factors = _factors(args.factors)
    rows = [
        row
        for models in sets
        for row in analysis.scaling_rows(
            models, data, factors=factors, device=device, repair=args.repair
        )
    ]
    title = f"magnitude scaling before uniform averaging: {_training_title(args, cfg)}"
    table, md = tables(title, SCALING_COLUMNS, rows, cfg.model)
    console.print(table)
    _write(out, "scaling", cfg, title, rows, md)
    plot_scaling(rows, out / "scaling.png", title)


def _check_options(args: argparse.Namespace) -> None:
    """Raise ConfigError on a bad probe option, before anything trains."""
    from ..experiments.analysis import FEATURE_HEADS, INDEPENDENT_DATA

    if "settings" in args:
        _settings(args.settings)
    if "factors" in args:
        _factors(args.factors)
    if "feature_head" in args and args.feature_head not in FEATURE_HEADS:
        raise unknown_name("--feature-head", args.feature_head, FEATURE_HEADS)
    if "independent_data" in args and args.independent_data not in INDEPENDENT_DATA:
        raise unknown_name("--independent-data", args.independent_data, INDEPENDENT_DATA)
    if "clients" in args and args.clients < 1:
        raise ConfigError("--clients", args.clients, "an integer >= 1")


def _command(default: Sequence[str]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from ..experiments import analysis

        probes = _probes(args.probes) if "probes" in args else list(default)
        cfg, read = command_config(args)
        _check_options(args)
        if not args.quiet:
            logging.getLogger(analysis.__name__).setLevel(logging.INFO)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if "weight-patterns" in probes:
            run_weight_patterns(args, cfg, out)
        if "soups" in probes or "scaling" in probes:
            cfg = analysis.with_holdout(cfg)
            sets = _train(args, cfg)
            if "soups" in probes:
                run_soups(args, cfg, out, sets)
            if "scaling" in probes:
                run_scaling(args, cfg, out, sets)
        console.print(f"results in {out}", soft_wrap=True)
        warn_unused(f"analyse {' '.join(probes)}", args, read)
        return 0

    return run


# -- argument parsing ------------------------------------------------------------------------
def _add_probes(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the four probe sub-commands to a sub-parsers action."""

    def common(p: argparse.ArgumentParser) -> None:
        config_args(p)
        p.add_argument("--out", default="runs/analyses", help="output folder")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")

    def training(p: argparse.ArgumentParser) -> None:
        p.add_argument("--epochs", type=int, help="local epochs of every model (local-epochs)")
        p.add_argument(
            "--warmup-rounds", type=int, default=0, help="FedAvg rounds before the shared start"
        )
        p.add_argument("--settings", default="shared,independent", help="model sets to build")
        p.add_argument(
            "--independent-data",
            default="shards",
            help="shards (default): independent models train on the clients' shards; full: "
            "each on the whole training split",
        )

    def patterns(p: argparse.ArgumentParser, flag: str) -> None:
        p.add_argument(
            flag, dest="pattern_epochs", type=int, default=3, help="epochs of the pattern models"
        )
        p.add_argument("--clients", type=int, default=3, help="clients whose models are shown")
        p.add_argument(
            "--random-init", action="store_true", help="linear classifiers start random, not 0"
        )

    def probe(name: str, text: str, probes: Sequence[str]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text)
        common(p)
        p.set_defaults(func=_command(probes))
        return p

    p = probe(
        "weight-patterns", "linear classifier rows and first-layer filters", ["weight-patterns"]
    )
    patterns(p, "--epochs")
    p = probe("soups", "uniform/greedy soup vs logit/feature ensemble of N models", ["soups"])
    training(p)
    p.add_argument("--feature-head", default="soup", help=HEAD_HELP)
    p = probe("scaling", "scale one, half or all models by M before averaging", ["scaling"])
    training(p)
    p.add_argument("--factors", default="100", help="scaling factors M, comma-separated")
    p.add_argument("--repair", action="store_true", help=REPAIR_HELP)
    p = probe("all", "the three probes (soups and scaling share models)", list(PROBES))
    training(p)
    patterns(p, "--pattern-epochs")
    p.add_argument("--feature-head", default="soup", help=HEAD_HELP)
    p.add_argument("--factors", default="100", help="scaling factors M, comma-separated")
    p.add_argument("--repair", action="store_true", help=REPAIR_HELP)
    p.add_argument("--probes", default=",".join(PROBES), help="which probes to run")


REPAIR_HELP = (
    "scaling: recompute BatchNorm statistics of every average on the proxy slice (default: "
    "not, as the paper's code; repair cancels the scaling of convolutions before BatchNorm)"
)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``analyse PROBE`` to the ``fedmerge`` command's sub-parsers."""
    p = sub.add_parser("analyse", help="weight-averaging analyses (arXiv 2411.09263)")
    _add_probes(p.add_subparsers(dest="probe", required=True, metavar="PROBE"))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedmerge.commands.analyse PROBE [key=value ...] [options]``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        prog="fedmerge analyse", description="Weight-averaging analyses (arXiv 2411.09263)."
    )
    _add_probes(parser.add_subparsers(dest="probe", required=True, metavar="PROBE"))
    # key=value tokens may sit among the options: argparse wants positionals together.
    args = parser.parse_args(overrides_last(parser, sys.argv[1:] if argv is None else argv))
    try:
        return args.func(args)
    except FedmergeError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
