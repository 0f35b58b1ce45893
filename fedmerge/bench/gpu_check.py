"""One script that checks fedmerge on a CUDA machine and records GPU figures.

    python -m fedmerge.bench.gpu_check [--out DIR] [--data-root DIR] [--budget SECONDS]

On a machine without CUDA it says so and exits 0 (nothing to check). With CUDA it runs, in
order, each step in its own process with its own time limit (the whole fits in ``--budget``
seconds, 480 by default):

1. the CUDA tests (``pytest -k cuda``: per-client against vectorised training on the GPU);
2. the throughput benchmark on the GPU (bare PyTorch, the local engine per client and with
   its workers; ``python -m fedmerge.bench.throughput --device cuda``);
3. the vectorised engine on the GPU (``python -m fedmerge.bench.vectorised --device cuda``);
4. one FedMatch round (activation matching) and one FedNPMerge round on the GPU
   (``fedmerge run ... device=cuda``; merge times from their metrics);
5. one NIID-Bench Fashion-MNIST cell (simple CNN, 10 clients, Dir(0.5), 10 local epochs, batch
   64, SGD lr 0.01, momentum 0.9) for 5 rounds instead of 50, when Fashion-MNIST is under
   ``--data-root`` (digits otherwise, said so).

It writes ``DIR/gpu-check.json`` (every step: command, exit status, seconds, the figures it
reported) and prints a short table. A step that fails or runs out of time is recorded as such
and the next one runs; the exit status is 1 when any step failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

NO_GPU = "no CUDA device found: nothing to check on this machine (CPU only)"
THROUGHPUT = (
    "-m fedmerge.bench.throughput --device cuda --rounds 2 --engines local,local-workers --json"
)
VECTORISED = (
    "-m fedmerge.bench.vectorised --device cuda --dataset digits --clients 10,100 --rounds 2 --json"
)
FEDMATCH = "strategy=fedmatch match-method=activation proxy-size=500 model=resnet20 num-rounds=1"
FEDNPMERGE = "strategy=fednpmerge proxy-size=500 model=cnn num-rounds=1"
NIID_CELL = (
    "model=cnn num-clients=10 partition=dirichlet partition-beta=0.5 local-epochs=10 "
    "batch-size=64 lr=0.01 momentum=0.9 weight-decay=0.00001 num-rounds=5"
)


@dataclass
class Step:
    """One check: a command, its time limit, and what it gave."""

    name: str
    command: list[str]
    limit_s: int
    status: str = "not run"
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    tail: str = ""


def _fashion_mnist_present(root: Path) -> bool:
    return (root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()


def plan(out: Path, data_root: Path) -> list[Step]:
    """The steps, in order (see the module docstring)."""
    py = sys.executable
    run = [py, "-m", "fedmerge.cli", "run"]
    fashion = _fashion_mnist_present(data_root)
    cell_data = (
        ["dataset=fashion-mnist", f"data-root={data_root}"] if fashion else ["dataset=digits"]
    )
    common = ["device=cuda", "save-model=false", f"output-dir={out / 'runs'}"]
    return [
        Step("cuda tests", [py, *"-m pytest -q -k cuda tests".split()], 120),
        Step(
            "throughput (GPU)",
            [py, *THROUGHPUT.split(), str(out / "throughput.json")],
            90,
        ),
        Step(
            "vectorised (GPU)",
            [py, *VECTORISED.split(), str(out / "vectorised.json")],
            60,
        ),
        Step(
            "fedmatch activation round (GPU)",
            [*run, *FEDMATCH.split(), "run-name=fedmatch", *common],
            60,
        ),
        Step(
            "fednpmerge round (GPU)",
            [*run, *FEDNPMERGE.split(), "run-name=fednpmerge", *common],
            60,
        ),
        Step(
            "NIID-Bench cell, 5 rounds" + ("" if fashion else " (digits: no Fashion-MNIST)"),
            [*run, *cell_data, *NIID_CELL.split(), "run-name=niid", *common],
            90,
        ),
    ]


def _figures(step: Step, out: Path) -> dict[str, Any]:
    """What a finished step reported: the last round's metrics of a run, or its JSON file."""
    from ..results import read_metrics

    run_name = next((a.split("=", 1)[1] for a in step.command if a.startswith("run-name=")), None)
    if run_name is not None:
        try:
            last = read_metrics(out / "runs" / run_name)[-1]
        except (OSError, ValueError, IndexError):
            return {}
        keys = ("test-accuracy", "round-time", "merge-time", "match-time", "np-time")
        return {k: last[k] for k in keys if k in last}
    files = [a for a in step.command if a.endswith(".json") and Path(a).exists()]
    return {"json": files[0]} if files else {}


def check(out: Path, data_root: Path, budget_s: float) -> list[Step]:
    """Run the steps within ``budget_s`` seconds in all."""
    out.mkdir(parents=True, exist_ok=True)
    steps = plan(out, data_root)
    start = time.monotonic()
    for step in steps:
        left = budget_s - (time.monotonic() - start)
        limit = min(step.limit_s, left)
        if limit < 10:
            step.status = "skipped (budget spent)"
            continue
        begun = time.monotonic()
        try:
            done = subprocess.run(
                step.command, capture_output=True, text=True, timeout=limit, check=False
            )
            step.status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
            step.tail = (done.stdout + done.stderr)[-2000:]
        except subprocess.TimeoutExpired:
            step.status = f"timed out ({limit:.0f} s)"
        step.seconds = time.monotonic() - begun
        step.figures = _figures(step, out)
        print(f"{step.name}: {step.status}, {step.seconds:.1f} s {step.figures}", flush=True)
    return steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedmerge.bench.gpu_check", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    p.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all steps")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    steps = check(args.out, args.data_root, args.budget)
    report["steps"] = [asdict(s) for s in steps]
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=2))
    print(f"\n{report['device']} (torch {report['torch']}, CUDA {report['cuda']})")
    print(f"{'step':<44} {'status':<22} {'s':>7}")
    for s in steps:
        print(f"{s.name:<44} {s.status:<22} {s.seconds:>7.1f}")
    print(f"results in {args.out / 'gpu-check.json'}")
    return 0 if all(s.status == "ok" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
