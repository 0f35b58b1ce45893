"""Cost of one NP Merge round against one matched-averaging round: time and peak memory.

    python -m fedmerge.bench.npmerge_cost [--models mlp,cnn,resnet20] [--clients 10]
        [--proxy 500] [--forms pairwise,softmax]

Each measurement runs in a fresh subprocess: it builds the global model and ``N`` client
models (the global model permuted and perturbed, as in :mod:`fedmerge.bench.matching`), a
labelled proxy slice of random inputs and labels, then merges once. Reported: wall seconds of
the merge and the growth of the process's peak resident memory during it (``ru_maxrss`` after
minus before, SciPy and the models already loaded: what the merge itself added), next to
NP Merge's own count of its learning state (``np-state-mb``: coefficients, Adam moments,
gradients, kept copies). CPU only; on CUDA the strategy reports ``np-peak-cuda-mb`` instead.

For NP Merge also the seconds of one of its Adam steps (its learning time over its steps,
held-out evaluations included) against one plain training step of the same network on a
batch of the same size (SGD with momentum, after the merge, in the same process): the ratio
says how far NP Merge is from the cost of its arithmetic, a forward and backward pass of the
merged network per step.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported in the child, after its memory baseline
    import torch


def _measure(model_name: str, method: str, clients: int, proxy: int, form: str) -> dict:
    """Runs in the child process: one merge, its time and peak-memory growth."""
    import torch

    from .. import matching  # noqa: F401  (SciPy imported before the baseline is taken)
    from ..merging import matched_average
    from ..npmerge import NPOptions, NPReport, np_merge
    from .matching import SHAPES, client_states

    torch.manual_seed(0)
    model, spec, state, states = client_states(model_name, clients, drift=0.05)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(proxy, *SHAPES[model_name], generator=g)
    y = torch.randint(0, 10, (proxy,), generator=g)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    report = NPReport()
    if method == "matched":
        matched_average(states, reference=state, spec=spec)
    else:
        np_merge(
            states,
            reference=state,
            model=model,
            x=x,
            y=y,
            spec=spec,
            options=NPOptions(form=form),
            seed=0,
            device="cpu",
            bn_repair=False,
            report=report,
        )
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {
        "seconds": seconds,
        "peak-growth-mb": (after - before) / 1024,  # ru_maxrss is in KiB on Linux
        "state-mb": report.state_bytes / 2**20,
        "steps": report.steps,
    }
    if report.steps:
        out["np-step-s"] = report.seconds / report.steps
        out["train-step-s"] = _train_step_seconds(model, x, y, NPOptions().batch_size)
    return out


def _train_step_seconds(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, steps: int = 20
) -> float:
    """Seconds of one plain SGD step (forward, backward, update) of ``model`` on a batch."""
    import torch.nn.functional as F

    from ..training import SGD

    model.train()
    opt = SGD(list(model.parameters()), lr=0.01, momentum=0.9)
    xb, yb = x[:batch_size], y[:batch_size]
    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    """Print the table (each cell measured in its own process)."""
    parser = argparse.ArgumentParser(prog="python -m fedmerge.bench.npmerge_cost")
    parser.add_argument("--models", default="mlp,cnn,resnet20")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--proxy", type=int, default=500)
    parser.add_argument("--forms", default="pairwise,softmax")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        model, method, form = args.child.split(":")
        print(json.dumps(_measure(model, method, args.clients, args.proxy, form)))
        return 0
    print(
        f"one merge of {args.clients} clients, proxy {args.proxy} samples, CPU, fresh process each"
    )
    print(
        f"{'model':<9} {'method':<20} {'seconds':>8} {'peak +MB':>9} {'state MB':>9} {'steps':>6}"
        f" {'s/step':>7} {'train s/step':>12} {'ratio':>6}"
    )
    for model in args.models.split(","):
        methods = [("matched", "-")] + [("npmerge", f) for f in args.forms.split(",")]
        for method, form in methods:
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "fedmerge.bench.npmerge_cost",
                    "--clients",
                    str(args.clients),
                    "--proxy",
                    str(args.proxy),
                    "--child",
                    f"{model}:{method}:{form}",
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            name = "matched average" if method == "matched" else f"NP Merge ({form})"
            step = ""
            if "np-step-s" in r:
                ratio = r["np-step-s"] / r["train-step-s"]
                step = f" {r['np-step-s']:>7.4f} {r['train-step-s']:>12.4f} {ratio:>6.2f}"
            print(
                f"{model:<9} {name:<20} {r['seconds']:>8.2f} {r['peak-growth-mb']:>9.1f} "
                f"{r['state-mb']:>9.2f} {r['steps']:>6}{step}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
