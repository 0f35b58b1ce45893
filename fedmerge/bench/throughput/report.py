"""The throughput benchmark as a whole: every variant run and repeated, the report of their
medians and ratios, and its printed form.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch

from ...processes import available_cpus
from .bare import measure_bare, measure_bare_multi
from .engines import measure_flower, measure_local
from .workload import (
    TARGET_RATIO,
    TARGET_WORKERS_RATIO,
    BenchSettings,
    prepare_federation,
    warm_up,
)


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def machine_facts(device: torch.device) -> dict[str, Any]:
    """Versions and hardware the figures were taken on."""
    import flwr

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": getattr(flwr, "__version__", "unknown"),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpus_available": available_cpus(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "device": str(device),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over repeats of every numeric figure; the repeats themselves kept."""
    summary: dict[str, Any] = {}
    for key, value in runs[0].items():
        if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
            summary[key] = _median([r[key] for r in runs])
        elif key not in ("round_seconds", "results_dir"):
            summary[key] = value
    summary["repeats"] = runs
    return summary


def run_benchmark(
    settings: BenchSettings, log: Callable[[str], None] = lambda line: None
) -> dict[str, Any]:
    """Run every variant ``settings.repeats`` times; returns the report (medians).

    ``settings.threads`` sets torch's intra-op threads for the run (restored afterwards).
    """
    threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        if settings.threads:
            torch.set_num_threads(settings.threads)
            stack.callback(torch.set_num_threads, threads)
        out = settings.output_dir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="fedmerge-bench-")
        )
        fed = prepare_federation(settings, out)
        warm_up(fed)
        processes = settings.processes
        variants: list[tuple[str, Callable[[int], dict[str, Any]]]] = [
            ("bare", lambda rep: measure_bare(fed))
        ]
        if "local" in settings.engines:
            variants.append(("local", lambda rep: measure_local(fed, f"bench-local-{rep}")))
        if "local-workers" in settings.engines:
            variants.append(("bare-processes", lambda rep: measure_bare_multi(fed, processes)))
            variants.append(
                (
                    "local-workers",
                    lambda rep: measure_local(fed, f"bench-workers-{rep}", processes),
                )
            )
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in variants}
        for rep in range(settings.repeats):  # variants alternate: drifts hit them alike
            for name, measure in variants:
                runs[name].append(measure(rep))
                log(_progress_line(name, rep, settings.repeats, runs[name][-1]))
        if "flower" in settings.engines:
            runs["flower"] = []
            for rep in range(settings.repeats):
                runs["flower"].append(measure_flower(fed, settings, f"bench-flower-{rep}"))
                log(_progress_line("flower", rep, settings.repeats, runs["flower"][-1]))
        results = {name: _summarise(r) for name, r in runs.items()}
        machine = machine_facts(fed.device)  # while --threads is in force
    bare = results["bare"]["samples_per_s"]
    ratios = {name: res["samples_per_s"] / bare for name, res in results.items()}
    report: dict[str, Any] = {
        "settings": {key: value for key, value in asdict(settings).items() if key != "output_dir"},
        "run_config": fed.cfg.to_mapping(),
        "shard_sizes": fed.sizes,
        "samples_per_round": fed.samples_per_round,
        "machine": machine,
        "results": results,
        "ratios": ratios,
        "target_ratio": TARGET_RATIO,
        "target_workers_ratio": TARGET_WORKERS_RATIO,
    }
    if "local" in ratios:
        report["local_meets_target"] = ratios["local"] >= TARGET_RATIO
    if "local-workers" in ratios:
        limit = results["bare-processes"]["samples_per_s"]
        report["workers_ratio"] = results["local-workers"]["samples_per_s"] / limit
        report["workers_meet_target"] = report["workers_ratio"] >= TARGET_WORKERS_RATIO
    return report


def _progress_line(engine: str, rep: int, repeats: int, res: dict[str, Any]) -> str:
    return (
        f"{engine:<14} repeat {rep + 1}/{repeats}: {res['samples_per_s']:,.0f} samples/s, "
        f"{res['seconds_per_round']:.3f} s/round"
    )


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(report: dict[str, Any]) -> None:
    """Print the settings, the machine and the table of figures."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = 130  # a file or a pipe: keep the table's headers whole
    s, m = report["settings"], report["machine"]
    console.print(
        f"settings: dataset {s['dataset']} ({report['samples_per_round'] // s['local_epochs']:,} "
        f"training samples), model {s['model']}, {s['clients']} clients ({s['partition']}), "
        f"batch {s['batch_size']}, {s['local_epochs']} local epoch(s), {s['rounds']} rounds, "
        f"SGD lr {s['lr']} momentum {s['momentum']} weight-decay {s['weight_decay']}, "
        f"max-train-samples {s['max_train_samples']}, median of {s['repeats']} repeat(s)"
    )
    console.print(
        f"machine: torch {m['torch']}, flwr {m['flwr']}, python {m['python']}, device "
        f"{m['device']} (cuda: {m['cuda']}), torch threads {m['torch_threads']}, "
        f"{m['cpus_available']} of {m['cpu_count']} CPUs, {m['platform']}"
    )
    table = Table(title="training throughput (rounds 1..R, centralized evaluation excluded)")
    for col in (
        "engine",
        "samples/s",
        "x bare",
        "s/round",
        "s/round 2..R",
        "train s/round",
        "overhead s/round",
        "loop samples/s",
        "start-up s",
    ):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for name, res in report["results"].items():
        table.add_row(
            name,
            f"{res['samples_per_s']:,.0f}",
            f"{report['ratios'][name]:.3f}",
            f"{res['seconds_per_round']:.3f}",
            _fmt(res["later_seconds_per_round"], ".3f"),
            _fmt(res["train_seconds_per_round"], ".3f"),
            _fmt(res["overhead_seconds_per_round"], ".3f"),
            _fmt(res["loop_samples_per_s"], ",.0f"),
            _fmt(res.get("startup_seconds"), ".2f"),
        )
    console.print(table)
    bare = report["results"]["bare"]
    console.print(
        f"bare overhead = load weights + optimisers + state-dict copies + averaging "
        f"(averaging alone {bare['averaging_seconds_per_round'] * 1e3:.1f} ms/round)."
    )
    if "local" in report["results"]:
        loc = report["results"]["local"]
        console.print(
            f"local overhead = round-time - sum of the clients' recorded loop seconds; the "
            f"steps-proportional estimate used for flower gives "
            f"{loc['estimated_train_seconds_per_round']:.3f} train s/round here "
            f"(recorded {loc['train_seconds_per_round']:.3f})."
        )
        verdict = "meets" if report["local_meets_target"] else "MISSES"
        console.print(
            f"local engine (workers=1) / bare PyTorch = {report['ratios']['local']:.3f} "
            f"({verdict} the target >= {report['target_ratio']})"
        )
    if "local-workers" in report["results"]:
        procs = report["results"]["bare-processes"]["processes"]
        verdict = "meets" if report["workers_meet_target"] else "MISSES"
        console.print(
            f"local engine (workers={procs}) / bare PyTorch in {procs} processes = "
            f"{report['workers_ratio']:.3f} ({verdict} the target >= "
            f"{report['target_workers_ratio']}); x bare single process = "
            f"{report['ratios']['local-workers']:.3f}"
        )
    if "flower" in report["results"]:
        fl = report["results"]["flower"]
        console.print(
            f"flower: {fl['cpus_per_client']:g} CPUs per client, {fl['concurrent_clients']} "
            f"client(s) at a time; start-up = call until the round-0 line reaches this "
            f"process (includes the initial evaluation; Flower streams logs in batches, so "
            f"to about a second); round 1 includes starting the Ray actors (see s/round "
            f"2..R); overhead {fl['train_seconds_method']}. Ray sets the clients' threads; "
            f"--threads does not apply to them."
        )
