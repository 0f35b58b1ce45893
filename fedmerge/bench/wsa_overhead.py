"""Cost of the WSA regularizer per training step (and of FedProx's term, for comparison).

    python -m fedmerge.bench.wsa_overhead [--models cnn,resnet20,mlp] [--batch-size 64]
        [--steps 200] [--repeats 5] [--device auto] [--threads N]

Times ``fedmerge.training.train`` on random inputs of each model's usual input shape (the
content of the data does not change the cost of a step), with no regularizer, with the WSA
term (KL to a target scope over the conv/linear weights) and with FedProx's proximal term.
Reports the median over repeats of milliseconds per step and the overhead in percent.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from ..models import build_model
from ..scopes import WSARegularizer, scope_names, scope_of
from ..training import Regularizer, SGDSettings, proximal_term, resolve_device, train

SHAPES = {"cnn": (1, 28, 28), "mlp": (1, 28, 28), "vgg9": (3, 32, 32), "resnet20": (3, 32, 32)}


def time_steps(
    model_name: str, variant: str, *, batch_size: int, steps: int, device: torch.device
) -> float:
    """Milliseconds per training step of one model and regularizer variant."""
    shape = SHAPES[model_name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size * steps, *shape, generator=g)
    y = torch.randint(0, 10, (batch_size * steps,), generator=g)
    model = build_model(model_name, shape, 10, seed=0).to(device)
    state = model.state_dict()
    regs: list[Regularizer] = []
    if variant == "wsa":
        regs = [WSARegularizer(scope_of(state, scope_names(state)), 0.01, device=device)]
    elif variant == "fedprox":
        regs = [proximal_term([p.detach().clone() for p in model.parameters()], 0.01)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    result = train(
        model,
        x,
        y,
        SGDSettings(1, batch_size, 0.01, momentum=0.9),
        seed=0,
        device=device,
        regularizers=regs,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * result.seconds / result.steps


def main(argv: list[str] | None = None) -> int:
    """Print the table."""
    parser = argparse.ArgumentParser(prog="python -m fedmerge.bench.wsa_overhead")
    parser.add_argument("--models", default="cnn,resnet20,mlp")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    models = args.models.split(",")
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        print(f"error: --models: unknown {unknown}; allowed: {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    print(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"batch {args.batch_size}, {args.steps} steps, median of {args.repeats}"
    )
    print(
        f"{'model':<10}{'plain ms/step':>15}{'wsa ms/step':>13}{'wsa +%':>9}"
        f"{'fedprox ms/step':>17}{'fedprox +%':>12}"
    )
    for name in models:
        time_steps(name, "plain", batch_size=args.batch_size, steps=20, device=device)  # warm-up
        times: dict[str, list[float]] = {"plain": [], "wsa": [], "fedprox": []}
        for _ in range(args.repeats):  # interleaved, so drifts in machine load hit all alike
            for variant in times:
                times[variant].append(
                    time_steps(
                        name, variant, batch_size=args.batch_size, steps=args.steps, device=device
                    )
                )
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"{name:<10}{med['plain']:>15.3f}{med['wsa']:>13.3f}"
            f"{100 * (med['wsa'] / med['plain'] - 1):>9.1f}{med['fedprox']:>17.3f}"
            f"{100 * (med['fedprox'] / med['plain'] - 1):>12.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
