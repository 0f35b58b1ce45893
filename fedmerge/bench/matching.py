"""Cost of neuron-matched averaging per FL round: matching N client models to one reference.

    python -m fedmerge.bench.matching [--models mlp,cnn,vgg9,resnet20,vit] [--clients 10,20]
        [--matchers weight,activation,dual] [--proxy 500] [--drift 0.05] [--repeats 3]
        [--readings auto,one-pass,streamed] [--threads N] [--workers N]

Each "round" aligns ``N`` client models to the global model and averages them, exactly what
:class:`FedMatch` does per round (:func:`fedmerge.merging.matched_average`, reference
``global``). The client models are the global model, randomly permuted and perturbed with
Gaussian noise of ``drift`` times each tensor's standard deviation: the shape of FL client
drift, without the cost of training. (Permuting them makes every matcher do real work; the
cost of a linear assignment does not depend on how far the solution is from the identity,
but the number of coordinate-descent sweeps does: ``sweeps`` is reported.)

Reported per model and matcher: median seconds per round over ``repeats``, seconds per client
(the cost is linear in N: one matching per client; compare N=10 and N=20), and FedAvg's plain
average of the same states for scale.

``--workers N`` (N >= 2) reads the activations as a strategy's merge does under the local
engine with N worker processes: spread over N forked workers of one thread each
(:mod:`fedmerge.spread`); the main process runs the assignments on ``--threads``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch
from flwr.app import Context, Message
from torch import Tensor, nn

from ..merging import READINGS, MatchReport, activation_similarities_of, average, matched_average
from ..models import build_model, model_spec
from ..options import MatchOptions
from ..permutations import PermutationSpec, apply_permutations, random_permutations
from ..spread import spreading

SHAPES = {
    "mlp": (1, 28, 28),
    "cnn": (1, 28, 28),
    "vgg9": (3, 32, 32),
    "resnet20": (3, 32, 32),
    "vit": (3, 32, 32),
}


def client_states(
    model_name: str, n: int, drift: float, seed: int = 0
) -> tuple[nn.Module, PermutationSpec, dict[str, Tensor], list[dict[str, Tensor]]]:
    """The global model and ``n`` permuted, perturbed copies of it."""
    model = build_model(model_name, SHAPES[model_name], 10, seed=seed)
    spec = model_spec(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    clients = []
    for _ in range(n):
        noisy = {}
        for k, v in state.items():
            if v.is_floating_point() and v.numel() > 1:
                noise = torch.randn(v.shape, generator=g) * float(v.std()) * drift
                noisy[k] = v + noise
            else:
                noisy[k] = v.clone()
        clients.append(apply_permutations(spec, random_permutations(spec, g), noisy))
    return model, spec, state, clients


def time_round(
    model_name: str,
    matcher: str,
    n: int,
    *,
    proxy: int,
    drift: float,
    repeats: int,
    reading: str = "auto",
) -> tuple[float, float, float]:
    """Median seconds of one matched round, of FedAvg's average, and the result's distance.

    ``reading`` (data-based matchers): how the activations are read
    (:func:`fedmerge.merging.activation_similarities_of`); the round is then that reading
    plus ``matched_average`` on its similarities, which is what ``matched_average`` does
    by itself (reference ``global``, one pass, BatchNorm statistics reset)."""
    model, spec, state, clients = client_states(model_name, n, drift)
    x = torch.randn(proxy, *SHAPES[model_name], generator=torch.Generator().manual_seed(2))
    model.eval()
    times, plain = [], []
    error = 0.0
    for _ in range(repeats):
        report = MatchReport()
        start = time.perf_counter()
        sims = None
        if matcher != "weight":
            sims = activation_similarities_of(
                spec,
                model,
                state,
                clients,
                x,
                reset_target=True,
                reset_states=True,
                reading=reading,
            )
        merged = matched_average(
            clients,
            reference=state,
            spec=spec,
            options=MatchOptions(method=matcher),
            model=model,
            inputs=x,
            similarities=sims,
            report=report,
        )
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        average(clients, reference=state)
        plain.append(time.perf_counter() - start)
        error = max(
            float((merged[k] - state[k]).abs().max() / (state[k].abs().max() + 1e-12))
            for k in state
            if state[k].is_floating_point()
        )
    return statistics.median(times), statistics.median(plain), error


def main(argv: list[str] | None = None) -> int:
    """Print a table of matching cost per round."""
    parser = argparse.ArgumentParser(prog="python -m fedmerge.bench.matching")
    parser.add_argument("--models", default="mlp,cnn,vgg9,resnet20,vit")
    parser.add_argument("--clients", default="10,20")
    parser.add_argument("--matchers", default="weight,activation,dual")
    parser.add_argument("--proxy", type=int, default=500, help="proxy inputs for data matchers")
    parser.add_argument("--drift", type=float, default=0.05, help="client noise / tensor std")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument(
        "--readings",
        default="auto",
        help=f"how data-based matchers read activations, comma-separated: {', '.join(READINGS)}",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes the activation reading is spread over (1 = this process)",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    readings = args.readings.split(",")
    bad = [r for r in readings if r not in READINGS]
    if bad:
        parser.error(f"unknown reading(s) {bad}; allowed: {', '.join(READINGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models.split(",")
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; allowed: {', '.join(SHAPES)}")
    print(
        f"matched averaging per round, reference = global model; drift {args.drift}, "
        f"proxy {args.proxy} inputs, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, activations read on {args.workers} worker process(es)"
    )
    with contextlib.ExitStack() as stack:
        if args.workers >= 2:
            # local: the engine's pool, as the local engine gives it to a strategy's merge
            from ..engine.workers import WorkerPool

            pool = stack.enter_context(WorkerPool(_no_client, args.workers))
            pool.start()  # forked before the first timed round
            stack.enter_context(spreading(pool))
        _table(args, models, readings)
    return 0


def _no_client(message: Message, context: Context) -> Message:
    """The worker pool's ClientApp: this benchmark sends its workers no client call."""
    raise RuntimeError("the matching benchmark runs no client")


def _table(args: argparse.Namespace, models: list[str], readings: list[str]) -> None:
    """One row per model, matcher, reading and number of clients."""
    print(
        f"{'model':<9} {'params':>9} {'matcher':<10} {'reading':<9} {'N':>4} {'s/round':>9} "
        f"{'s/client':>9} "
        f"{'fedavg s':>9} {'max rel err':>11}"
    )
    for name in models:
        params = sum(p.numel() for p in build_model(name, SHAPES[name], 10, seed=0).parameters())
        for matcher in args.matchers.split(","):
            ways = ["-"] if matcher == "weight" else readings
            for reading, n in ((r, int(v)) for r in ways for v in args.clients.split(",")):
                seconds, plain, err = time_round(
                    name,
                    matcher,
                    n,
                    proxy=args.proxy,
                    drift=args.drift,
                    repeats=args.repeats,
                    reading="auto" if reading == "-" else reading,
                )
                print(
                    f"{name:<9} {params:>9,} {matcher:<10} {reading:<9} {n:>4} {seconds:>9.3f} "
                    f"{seconds / n:>9.4f} {plain:>9.4f} {err:>11.3g}",
                    flush=True,
                )


if __name__ == "__main__":
    sys.exit(main())
