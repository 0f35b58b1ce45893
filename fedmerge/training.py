"""Local training and evaluation on in-memory tensors.

The data path is deliberately bare: the shard lives on the training device as one tensor, each
epoch draws a seeded permutation and slices index batches from it. No DataLoader, no worker
processes, no per-sample Python: for the small models of FL research the per-batch framework
overhead is what separates a simulator from bare PyTorch (see docs/benchmarks.md).

Regularizers are extra loss terms a client adds (FedProx's proximal term is the first; later
methods add their own): callables ``model -> scalar tensor`` evaluated at every step.

The step's math (loss, proximal term, SGD update) is :mod:`fedmerge.step`, which the
vectorised path (:mod:`fedmerge.vectorised`) calls too.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from . import step as _step
from .errors import ConfigError
from .spread import shares as share_ranges

log = logging.getLogger(__name__)

Regularizer = Callable[[nn.Module], torch.Tensor]


@dataclass(frozen=True)
class SGDSettings:
    """One run of SGD: what :func:`train` and :func:`fedmerge.vectorised.train_many` take whole.

    Attributes
    ----------
    epochs : int
        Passes over the data.
    batch_size : int
        Samples per step (a final batch of one sample joins the previous one).
    lr : float
        Learning rate.
    momentum : float
        Heavy-ball momentum (``torch.optim.SGD``'s, dampening 0, not Nesterov).
    weight_decay : float
        L2 penalty added to the gradient.
    """

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0

    @classmethod
    def of(cls, cfg: Any, **changes: Any) -> SGDSettings:
        """A run's local training (a :class:`fedmerge.config.RunConfig`: ``local-epochs``,
        ``batch-size``, ``lr``, ``momentum``, ``weight-decay``), with ``changes`` (fields)."""
        settings = cls(cfg.local_epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay)
        return replace(settings, **changes) if changes else settings


@dataclass(frozen=True)
class TrainResult:
    """What one call of :func:`train` did."""

    loss: float  # mean task loss over all samples seen (regularizers excluded)
    num_examples: int  # samples in the shard (the FedAvg weight)
    steps: int  # optimiser steps taken
    seconds: float  # wall time of the loop


def resolve_device(name: str) -> torch.device:
    """Map ``auto | cpu | cuda | cuda:N | mps`` to a device; ``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", name, "auto or cpu", "no CUDA device is visible to torch")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device", name, "auto or cpu", "no MPS device is visible to torch")
    return torch.device(name)


def proximal_term(reference: Sequence[torch.Tensor], mu: float) -> Regularizer:
    """FedProx's proximal term ``mu / 2 * ||w - w_global||^2`` (Li et al., MLSys 2020).

    ``reference`` holds the global model's trainable parameters in ``model.parameters()``
    order, detached and on the training device.
    """
    ref = [t.detach() for t in reference]

    def term(model: nn.Module) -> torch.Tensor:
        return _step.proximal(model.parameters(), ref, mu)

    return term


class SGD:
    """SGD with momentum and weight decay, the update of ``torch.optim.SGD`` (dampening 0,
    no Nesterov), written out with ``torch._foreach`` ops (:func:`fedmerge.step.sgd_update`).

    Why not ``torch.optim.SGD``: its first construction in a process imports TorchDynamo
    (about 7 s on 2 CPU cores with torch 2.15), which is most of a short simulation's wall
    time. The update rule is identical (tests/test_training.py checks it step by step):
    ``g = grad + wd * w; buf = g (first step) else momentum * buf + g; w -= lr * buf``.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        # Momentum buffers by parameter (its position in self.params), as torch keeps them per
        # parameter: a parameter without a gradient in a step (frozen for a while, as FedMA's
        # clients freeze the matched layers) keeps its buffer and lends it to no other.
        self.buffers: dict[int, torch.Tensor] = {}

    def zero_grad(self) -> None:
        """Drop the gradients (set to None, as ``set_to_none=True``)."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        moving = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in moving]
        grads = cast(list[torch.Tensor], [p.grad for p in params])
        buffers = _step.sgd_update(
            params,
            grads,
            [self.buffers.get(i) for i in moving],
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )
        if buffers is not None:
            self.buffers.update(zip(moving, buffers, strict=True))


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's index batches of ``range(n)``: a permutation drawn from ``generator``, split
    into batches of ``batch_size``, a final batch of one sample folded into the previous one.

    :func:`train` calls it once per epoch on one generator seeded with the client's seed; the
    vectorised path draws every client's batches with it.
    """
    order = torch.randperm(n, generator=generator)
    out = list(torch.split(order, batch_size))
    # A final batch of one sample breaks BatchNorm in train mode; fold it into the previous one.
    if len(out) > 1 and len(out[-1]) == 1:
        last = out.pop()
        out[-1] = torch.cat([out[-1], last])
    return out


def _seed_generators(seed: int, device: torch.device) -> None:
    """Seed the random generators a training step on ``device`` draws from (dropout): the
    CPU's, and the CUDA device's when it is one. The values are those ``torch.manual_seed``
    gives them; it also seeds every other device, and without CUDA initialised it records a
    stack trace for a deferred call each time, which made it the costliest line of a tiny
    client's training (about 2 ms of 6 ms per client call for 60-sample clients, profiled)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sgd: SGDSettings,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    regularizers: Sequence[Regularizer] = (),
) -> TrainResult:
    """Train ``model`` in place with SGD (momentum, weight decay) on ``(x, y)``.

    Parameters
    ----------
    model : nn.Module
        Moved to ``device`` and trained in place.
    x, y : torch.Tensor
        The shard (inputs, int64 labels); moved to ``device`` once.
    sgd : SGDSettings
        Epochs, batch size and the update of ``torch.optim.SGD`` (see :class:`SGD`); a fresh
        optimiser per call (FL clients start each round from the global model with no
        optimiser state).
    seed : int
        Seeds the batch order and every random op inside the loop (dropout), without
        touching the caller's global RNG state.
    device : torch.device or str
        Where to train.
    regularizers : sequence of callables
        Extra loss terms ``model -> scalar`` added at every step.

    Returns
    -------
    TrainResult
    """
    device = torch.device(device)
    model.to(device)
    model.train()
    x, y = x.to(device), y.to(device)
    epochs, batch_size = sgd.epochs, sgd.batch_size
    opt = SGD(
        list(model.parameters()), lr=sgd.lr, momentum=sgd.momentum, weight_decay=sgd.weight_decay
    )
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros((), device=device)
    seen, steps = 0, 0
    start = time.perf_counter()
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        _seed_generators(seed, device)
        for _ in range(epochs):
            for idx in batches(len(y), batch_size, generator):
                idx = idx.to(device)
                xb, yb = x.index_select(0, idx), y.index_select(0, idx)
                # The terms are evaluated after the forward pass and the cross-entropy.
                full, loss = _step.loss(model(xb), yb, (reg(model) for reg in regularizers))
                opt.zero_grad()
                full.backward()
                opt.step()
                # Summing on the device avoids one host sync per step (.item()).
                total += loss.detach() * len(idx)
                seen += len(idx)
                steps += 1
    mean_loss = float(total) / max(seen, 1)
    if not math.isfinite(mean_loss):
        log.warning("training diverged: mean loss %s (lower lr?)", mean_loss)
    return TrainResult(mean_loss, len(y), steps, time.perf_counter() - start)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``; model left in eval mode."""
    sums = evaluation_sums(model, x, y, batch_size=batch_size, device=device)
    if len(y) == 0:
        return float("nan"), float("nan")
    return combine_sums(sums, len(y))


EvalSums = list[tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def evaluation_sums(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> EvalSums:
    """Per batch of ``batch_size`` samples, in order: (summed cross-entropy, correct count).

    The parts of :func:`evaluate`: batches evaluated elsewhere (a worker process each share
    of whole batches) and combined in order by :func:`combine_sums` give its result to the bit.
    """
    device = torch.device(device)
    model.to(device)
    model.eval()
    sums = []
    for start in range(0, len(y), batch_size):
        xb = x[start : start + batch_size].to(device)
        yb = y[start : start + batch_size].to(device)
        logits = model(xb)
        sums.append((F.cross_entropy(logits, yb, reduction="sum"), (logits.argmax(1) == yb).sum()))
    return sums


def evaluation_share(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> EvalSums:
    """:func:`evaluation_sums` on the CPU, positional (what a worker process runs)."""
    return evaluation_sums(model, x, y, batch_size=batch_size)


def evaluate_in_shares(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    shares: int,
    run: Callable[[Callable[..., EvalSums], list[tuple[Any, ...]]], list[EvalSums] | None],
) -> tuple[float, float] | None:
    """:func:`evaluate` on the CPU with its batches cut into ``shares`` contiguous shares of
    whole batches, each evaluated by ``run`` (``run(evaluation_share, args)``, e.g. a worker
    pool's ``map``, one share a process), the sums added in batch order: equal to
    :func:`evaluate` to the bit. None when ``run`` returns None (then evaluate here)."""
    batches = -(-len(y) // batch_size)
    cuts = [(batch_size * r.start, batch_size * r.stop) for r in share_ranges(batches, shares)]
    args = [(model, x[a:b], y[a:b], batch_size) for a, b in cuts]
    parts = run(evaluation_share, args)
    if parts is None:
        return None
    return combine_sums([s for part in parts for s in part], len(y))


def combine_sums(sums: EvalSums, n: int) -> tuple[float, float]:
    """Mean loss and accuracy over ``n`` samples from per-batch sums, added in their order."""
    device = sums[0][0].device if sums else torch.device("cpu")
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for loss, hits in sums:
        loss_sum += loss.to(device)
        correct += hits.to(device)
    return float(loss_sum) / n, float(correct) / n
