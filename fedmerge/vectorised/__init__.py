"""Vectorised client training: K clients of one architecture trained together, exactly.

What
----
:func:`train_many` trains K clients that share an architecture in one loop. Their parameters
are stacked along a new leading "client" dimension; one step of all clients is one batched
forward pass (:func:`torch.func.functional_call` under :func:`torch.func.vmap`, so a
convolution becomes one grouped convolution and a linear layer one batched matmul), one
backward pass and a handful of ``torch._foreach_*`` ops for the SGD update of all clients.
For every client the result is what :func:`fedmerge.training.train` gives for that client on
its own, up to float rounding (summation order inside the batched kernels). One caveat of
float32 that any reordering of sums shares: a pre-ReLU value within rounding of zero can fall
on the other side of the kink, which moves a deep net's weights by ~1e-4 from then on. The
per-client path itself does the same when its starting weights move by 1e-7, so for
``resnet20`` (about 10^6 pre-ReLU values a step) exactness is tested in float64.

Why
---
The models of FL research are small: a step of the NIID-Bench CNN on a batch of 16 is a few
dozen kernels of microseconds each, so one client at a time spends much of its time on
per-op framework overhead (dispatch, autograd bookkeeping, Python), and on a GPU leaves the
device mostly idle. Batching K clients into each kernel pays that overhead once per step
instead of K times and gives the device larger kernels. On a CPU the gain is bounded by the
kernels themselves: once a model's steps are compute-bound (the CNN at batch 64, the MLP),
a grouped convolution or batched matmul costs about as much per FLOP as K small ones, so
expect parity to a small factor there; the gain grows as batches and models shrink.

Semantics reproduced per client (``training.train`` is the specification)
-------------------------------------------------------------------------
- **Batch order**: ``training.batches(len(y), batch_size, g)`` with
  ``g = torch.Generator().manual_seed(seed)``, once per epoch on the same generator,
  including the fold of a final batch of one sample into the previous batch.
- **Ragged steps**: clients have different sizes, hence different numbers of steps and
  different batch sizes at the end of each epoch. Clients are sorted by their number of steps
  (longest first), so at step ``j`` the clients that still have a ``j``-th batch are a prefix
  of the stack: the step runs on that prefix only (slices of the stacked tensors are views,
  nothing is copied) and finished clients are neither computed nor updated. Within a step the
  batches are padded to the longest one with samples of the client's own shard and a 0/1 mask;
  each client's task loss is ``sum(mask * CE) / (number of real samples)``, the mean
  cross-entropy over its real samples, so padded rows get a gradient of exactly zero and the
  gradient equals that of the unpadded batch. This needs a forward pass that treats samples
  independently, which is what rules out BatchNorm (below).
- **Loss per step**: the functions of :mod:`fedmerge.step` that the per-client path calls,
  mapped over the clients with ``vmap`` (a function of one client's params dict):
  :func:`fedmerge.step.loss` = CE ``+ proximal_mu / 2 * ||w - w_start||^2`` over the
  trainable parameters (:func:`fedmerge.step.proximal`, as
  :func:`fedmerge.training.proximal_term`; reference = the job's starting state) when
  ``proximal_mu > 0``, ``+ wsa_lambda * KL`` over the target's named parameters
  (:func:`fedmerge.step.wsa`, as :class:`fedmerge.scopes.WSARegularizer`: mean and population
  standard deviation of :func:`fedmerge.step.layer_stats`, the KL of
  :func:`fedmerge.step.gaussian_kl` in either direction, ``wsa_reverse``). Every client has
  its own coefficients, reference and target; terms that a client does not use are exactly
  zero for it (coefficient 0; WSA layers outside its target sit on the target).
- **SGD**: :func:`fedmerge.step.sgd_update`, the update of :class:`fedmerge.training.SGD`, on
  the stacked tensors: ``g = grad + wd * w``; momentum buffer ``= g`` on the first step, then
  ``buf = momentum * buf + g``; ``w -= lr * buf``. Buffers are per client (rows of a stack)
  and fresh for every call, like the per-client optimiser.
- **TrainResult**: ``loss`` is the mean task cross-entropy over all samples seen
  (regularizers excluded), ``num_examples = len(y)``, ``steps`` the client's optimiser
  steps. ``seconds`` is the client's share of the wall time of its chunk (preparation,
  training and unstacking), split in proportion to the samples the clients of the chunk saw
  (``epochs * len(y)``); the shares add up to the wall time spent in the chunks.
- **Buffers** (non-trainable state such as counters) are returned as copies of the job's
  starting state: without BatchNorm no supported layer writes to them.

Differences that do not change results: gradients come from one backward pass over the sum
of the clients' losses (clients are independent, so row ``k`` of the gradient of the sum is
client ``k``'s gradient) rather than from :func:`torch.func.grad`, which would import
TorchDynamo on first use (seconds of start-up, the reason ``training.SGD`` exists); the task
loss is the masked mean of :func:`fedmerge.step.cross_entropy` (padding) where the per-client
path takes the plain mean; and the proximal term sums over the trainable parameters only
(frozen ones equal their reference). A model whose parameters are frozen
(``requires_grad=False``) keeps them, as the per-client path does.

What falls back (:func:`can_vectorise` says False, with the reason)
-------------------------------------------------------------------
- **Dropout** (``vgg9``) and other layers that draw random numbers in training mode: the
  per-client path draws them from the global RNG seeded with the client's seed
  (``torch.manual_seed(seed)`` under ``fork_rng``); under ``vmap`` all clients would share one
  stream, so the masks could not match.
- **BatchNorm** (``resnet20`` with ``norm="batch"``) and instance norm with running
  statistics: the running statistics are buffers updated in place in training mode, and
  batch statistics couple the samples of a batch, which the padding of ragged batches would
  change.

Those clients go through :func:`fedmerge.training.train`. Group and layer norm
(``resnet20`` with ``norm="group"`` or ``"layer"``) normalise each sample on its own and have
no buffers: they are supported, as are ``mlp`` and ``cnn``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.utils.rnn import pad_sequence

from .. import step as _step
from ..errors import ConfigError
from ..scopes import Scope
from ..training import SGDSettings, TrainResult, batches
from .memory import choose_chunk_size

__all__ = ["ClientJob", "can_vectorise", "choose_chunk_size", "train_many"]

log = logging.getLogger(__name__)

#: Layers that draw random numbers in training mode (the per-client RNG stream is not
#: reproducible under vmap).
_RANDOM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.RReLU,
)


@dataclass(frozen=True)
class ClientJob:
    """One client's training task for :func:`train_many`.

    Parameters
    ----------
    state : mapping of str to torch.Tensor
        Starting weights (a state dict of the model's architecture, usually the global model);
        cast to the model's dtypes. Never modified.
    x, y : torch.Tensor
        The client's shard: inputs ``(n, *input_shape)`` and int64 labels ``(n,)``, ``n >= 1``.
        Never modified.
    seed : int
        The client's training seed (batch order), as ``seed`` of ``training.train``.
    proximal_mu : float
        FedProx coefficient of ``mu / 2 * ||w - state||^2``; 0 means no proximal term.
    wsa_target : Scope or None
        Target scope of the WSA regularizer; None means no WSA term.
    wsa_lambda : float
        Weight of the WSA term (no term unless > 0).
    wsa_reverse : bool
        ``KL(target || current)`` instead of ``KL(current || target)``.
    """

    state: Mapping[str, torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    seed: int
    proximal_mu: float = 0.0
    wsa_target: Scope | None = None
    wsa_lambda: float = 0.0
    wsa_reverse: bool = False

    @property
    def uses_wsa(self) -> bool:
        """Whether the job adds a WSA term (a target and ``wsa_lambda > 0``)."""
        return self.wsa_target is not None and self.wsa_lambda > 0


def can_vectorise(model: nn.Module) -> tuple[bool, str]:
    """Whether :func:`train_many` reproduces ``training.train`` exactly for this model.

    Parameters
    ----------
    model : nn.Module
        The architecture (only its module types and settings are inspected).

    Returns
    -------
    tuple of (bool, str)
        ``(True, "")`` when it can; otherwise ``(False, reason)``, the reason naming the first
        offending module. Such models train client by client with ``training.train``.

    Notes
    -----
    Refused: layers that draw random numbers in training mode (dropout with ``p > 0``,
    ``RReLU``): each client's stream comes from its own seeded global RNG, which vmap cannot
    reproduce; BatchNorm and instance norm with running statistics: running statistics are
    updated in place, and batch statistics couple the samples of a batch (the padding of
    ragged batches would change them); uninitialised lazy parameters; parameters tied under
    several names (stacking would untie them). The forward pass must
    also be vmap-able (``torch.func.vmap`` raises otherwise); every registered model is.
    """
    for name, module in model.named_modules():
        label = name or type(module).__name__
        if isinstance(module, _RANDOM_LAYERS) and getattr(module, "p", 1.0) > 0:
            return False, (
                f"{label} ({type(module).__name__}) draws random numbers in training mode; each "
                "client's stream comes from its own seed, which vmap cannot reproduce"
            )
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return False, (
                f"{label} ({type(module).__name__}) updates running statistics in place and its "
                "batch statistics couple the samples of a batch (padding would change them)"
            )
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and (
            module.track_running_stats
        ):
            return False, (
                f"{label} ({type(module).__name__}) updates running statistics in place in "
                "training mode"
            )
    for name, param in model.named_parameters():
        if isinstance(param, nn.parameter.UninitializedParameter):
            return False, f"parameter {name} is not initialised yet (lazy module)"
    if len(list(model.named_parameters(remove_duplicate=False))) != len(
        list(model.named_parameters())
    ):
        return False, "the model ties parameters (one tensor under several names)"
    return True, ""


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _num_steps(n: int, batch_size: int, epochs: int) -> int:
    """Steps of ``training.train`` on ``n`` samples (``batches`` folds a last batch of one)."""
    per_epoch = math.ceil(n / batch_size)
    if per_epoch > 1 and n % batch_size == 1:
        per_epoch -= 1
    return per_epoch * epochs


def _check_jobs(
    model: nn.Module, jobs: Sequence[ClientJob], epochs: int, batch_size: int
) -> list[str]:
    """Validate the arguments; return the model's state-dict keys."""
    ok, reason = can_vectorise(model)
    if not ok:
        raise ValueError(f"train_many cannot reproduce training.train for this model: {reason}")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keys = list(model.state_dict().keys())
    params = dict(model.named_parameters())
    sample_shape, x_dtype = jobs[0].x.shape[1:], jobs[0].x.dtype
    for i, job in enumerate(jobs):
        if set(job.state.keys()) != set(keys):
            missing = sorted(set(keys) - set(job.state.keys()))[:3]
            extra = sorted(set(job.state.keys()) - set(keys))[:3]
            raise ValueError(
                f"job {i}: state does not match the model (missing {missing}, unexpected {extra})"
            )
        if len(job.x) != len(job.y) or len(job.y) == 0 or job.y.ndim != 1:
            raise ValueError(
                f"job {i}: needs a non-empty shard with one label per sample, got x of shape "
                f"{tuple(job.x.shape)} and y of shape {tuple(job.y.shape)}"
            )
        if job.x.shape[1:] != sample_shape or job.x.dtype != x_dtype:
            raise ValueError(
                f"job {i}: inputs of shape {tuple(job.x.shape[1:])} ({job.x.dtype}) differ from "
                f"job 0's {tuple(sample_shape)} ({x_dtype})"
            )
        if job.uses_wsa:
            assert job.wsa_target is not None
            missing = [n for n in job.wsa_target.names if n not in params]
            if missing:
                raise ConfigError(
                    "wsa-layers", missing[:3], "names of trainable parameters of the model"
                )
    return keys


@dataclass
class _Schedule:
    """Batch indices of a chunk, padded into tables, and the shape of every step."""

    index: torch.Tensor  # (steps, clients, width): rows of the concatenated shards
    mask: torch.Tensor  # same shape, 1.0 for real samples, 0.0 for padding
    count: torch.Tensor  # (steps, clients): real samples per step
    active: list[int]  # clients (a prefix) that take step j
    width: list[int]  # padded batch size of step j


def _schedule(
    jobs: Sequence[ClientJob],
    offsets: Sequence[int],
    epochs: int,
    batch_size: int,
    dtype: torch.dtype,
) -> _Schedule:
    """Every client's batches, drawn exactly as ``training.train`` draws them."""
    per_client: list[torch.Tensor] = []
    for job in jobs:
        generator = torch.Generator().manual_seed(job.seed)
        drawn = [idx for _ in range(epochs) for idx in batches(len(job.y), batch_size, generator)]
        if drawn:
            per_client.append(pad_sequence(drawn, batch_first=True, padding_value=-1))
        else:  # epochs == 0
            per_client.append(torch.empty((0, 0), dtype=torch.long))
    steps = [len(t) for t in per_client]
    total_steps = max(steps)
    max_width = max(t.shape[1] for t in per_client)
    index = torch.full((total_steps, len(jobs), max_width), -1, dtype=torch.long)
    for k, table in enumerate(per_client):
        index[: table.shape[0], k, : table.shape[1]] = table
    real = index >= 0
    # Padding points at the client's own first sample: finite, and masked out of the loss.
    offset = torch.tensor(list(offsets), dtype=torch.long).view(1, -1, 1)
    index = torch.where(real, index, 0) + offset
    count = real.sum(-1)
    active = [sum(1 for s in steps if s > j) for j in range(total_steps)]
    width = [int(count[j, : active[j]].max()) for j in range(total_steps)]
    return _Schedule(index, real.to(dtype), count.to(dtype), active, width)


def _wsa_tables(
    jobs: Sequence[ClientJob], device: torch.device
) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Union of the WSA layer names and per-client targets over it.

    Returns names, include ``(K, L)`` bool, target mu and sigma ``(K, L)``, lambda ``(K,)``
    and reverse ``(K,)`` bool. Layers outside a client's target (and all layers of a client
    without WSA) get ``include = False`` and a dummy target of (0, 1).
    """
    names: list[str] = []
    for job in jobs:
        if job.uses_wsa:
            assert job.wsa_target is not None
            names.extend(n for n in job.wsa_target.names if n not in names)
    position = {n: i for i, n in enumerate(names)}
    k, layers = len(jobs), len(names)
    include = torch.zeros(k, layers, dtype=torch.bool)
    mu_t = torch.zeros(k, layers, dtype=torch.float32)
    sigma_t = torch.ones(k, layers, dtype=torch.float32)
    lam = torch.zeros(k, dtype=torch.float32)
    reverse = torch.zeros(k, dtype=torch.bool)
    for row, job in enumerate(jobs):
        if not job.uses_wsa:
            continue
        target = job.wsa_target
        assert target is not None
        cols = torch.tensor([position[n] for n in target.names], dtype=torch.long)
        mu, sigma = target.tensors()
        include[row, cols] = True
        mu_t[row, cols] = mu
        sigma_t[row, cols] = sigma
        lam[row] = job.wsa_lambda
        reverse[row] = job.wsa_reverse
    return (
        names,
        include.to(device),
        mu_t.to(device),
        sigma_t.to(device),
        lam.to(device),
        reverse.to(device),
    )


def _rows(tree: Any, a: int) -> Any:
    """The first ``a`` rows (clients) of every tensor of a dict tree (views)."""
    if isinstance(tree, dict):
        return {n: _rows(t, a) for n, t in tree.items()}
    return tree[:a]


def _train_chunk(
    model: nn.Module,
    jobs: Sequence[ClientJob],
    keys: Sequence[str],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    device: torch.device,
) -> tuple[list[dict[str, torch.Tensor]], list[float], list[int]]:
    """Train one chunk of jobs sorted by their number of steps, longest first."""
    k = len(jobs)
    model_tensors = dict(model.state_dict(keep_vars=True))
    named_params = dict(model.named_parameters())
    trainable = [n for n, p in named_params.items() if p.requires_grad]
    # Stacked per-client tensors: every entry of the state dict gets a client dimension.
    stacked = {
        n: torch.stack(
            [job.state[n].detach().to(device=device, dtype=model_tensors[n].dtype) for job in jobs]
        )
        for n in keys
    }
    # Non-persistent buffers are not in state dicts: every client uses the model's own.
    shared = {n: b.detach().to(device) for n, b in model.named_buffers() if n not in model_tensors}
    frozen = {n: stacked[n] for n in keys if n not in trainable}

    sizes = [len(job.y) for job in jobs]
    offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()[:-1]]
    x_all = torch.cat([job.x.detach().to(device) for job in jobs])
    y_all = torch.cat([job.y.detach().to(device) for job in jobs])
    sample_shape = x_all.shape[1:]
    loss_dtype = stacked[trainable[0]].dtype if trainable else torch.float32
    plan = _schedule(jobs, offsets, epochs, batch_size, loss_dtype)
    index, mask, count = plan.index.to(device), plan.mask.to(device), plan.count.to(device)

    # Per-client coefficients of the loss terms, one row per client (vmapped with the params).
    terms: dict[str, Any] = {}
    if any(job.proximal_mu > 0 for job in jobs):
        terms["reference"] = {n: stacked[n].clone() for n in trainable}
        terms["mu"] = torch.tensor(
            [float(job.proximal_mu) for job in jobs], dtype=loss_dtype, device=device
        )
    wsa_names: list[str] = []
    reverse: bool | None = None  # the clients' common KL direction, None when they differ
    if any(job.uses_wsa for job in jobs):
        wsa_names, include, mu_t, sigma_t, lam, rev = _wsa_tables(jobs, device)
        terms.update(include=include, mu_t=mu_t, sigma_t=sigma_t, lam=lam)
        if bool(rev.all()) or not bool(rev.any()):
            reverse = bool(rev[0])
        else:
            terms["reverse"] = rev

    def client_loss(
        params: dict[str, torch.Tensor],
        xb: torch.Tensor,
        yb: torch.Tensor,
        real: torch.Tensor,
        coef: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One client's ``(loss, task loss)``: the per-client path's step math on its params."""

        def extra() -> Iterator[torch.Tensor]:
            if "mu" in coef:
                ref = coef["reference"]
                yield _step.proximal(
                    [params[n] for n in trainable], [ref[n] for n in trainable], coef["mu"]
                )
            if wsa_names:
                yield _step.wsa(
                    [params[n] for n in wsa_names],
                    coef["mu_t"],
                    coef["sigma_t"],
                    coef["lam"],
                    coef["reverse"] if reverse is None else reverse,
                    coef["include"],
                )

        logits = functional_call(model, (params, shared), (xb,))
        return _step.loss(logits, yb, extra(), real)

    batched_loss = vmap(client_loss)
    momentum_buffers: list[torch.Tensor] | None = None  # one per parameter with a gradient
    # Accumulated in the default dtype, as training.train does.
    total = torch.zeros(k, device=device)

    for step, (a, width) in enumerate(zip(plan.active, plan.width, strict=True)):
        rows = index[step, :a, :width]
        xb = x_all.index_select(0, rows.reshape(-1)).view(a, width, *sample_shape)
        yb = y_all.index_select(0, rows.reshape(-1))
        real, n_real = mask[step, :a, :width], count[step, :a]
        leaves = {n: stacked[n][:a].detach().requires_grad_() for n in trainable}
        batched = {**{n: t[:a] for n, t in frozen.items()}, **leaves}
        coef = {n: _rows(t, a) for n, t in terms.items()}
        with torch.enable_grad():
            full, task = batched_loss(batched, xb, yb.view(a, width), real, coef)
            grads = torch.autograd.grad(
                full.sum(), [leaves[n] for n in trainable], allow_unused=True
            )
        with torch.no_grad():
            # training.SGD: parameters without a gradient are skipped.
            names = [n for n, g in zip(trainable, grads, strict=True) if g is not None]
            # Momentum buffers start as the first gradients (at step 0, where every client of
            # the chunk is active); later steps update the rows of the active prefix.
            new = _step.sgd_update(
                [stacked[n][:a] for n in names],
                [g for g in grads if g is not None],
                None if momentum_buffers is None else [b[:a] for b in momentum_buffers],
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
            )
            if momentum_buffers is None:
                momentum_buffers = new
            total[:a] += task.detach() * n_real

    states = [{n: stacked[n][i].clone() for n in keys} for i in range(k)]
    seen = [epochs * size for size in sizes]
    losses = [t / max(s, 1) for t, s in zip(total.tolist(), seen, strict=True)]
    return states, losses, [_num_steps(size, batch_size, epochs) for size in sizes]


def train_many(
    model: nn.Module,
    jobs: Sequence[ClientJob],
    sgd: SGDSettings,
    *,
    device: torch.device | str = "cpu",
    chunk_size: int | None = None,
) -> list[tuple[dict[str, torch.Tensor], TrainResult]]:
    """Train many clients of one architecture together, each exactly as ``training.train``.

    Parameters
    ----------
    model : nn.Module
        The architecture, used as a stateless template for ``functional_call``: its weights
        are neither read nor written, and its ``training`` flags are set for the call and
        restored. Must pass :func:`can_vectorise`.
    jobs : sequence of ClientJob
        One per client: starting state, shard, seed and regularizers.
    sgd : SGDSettings
        SGD settings, shared by all clients, as in ``training.train``.
    device : torch.device or str
        Where to train; states, shards and results live there.
    chunk_size : int, optional
        Clients per batched step; default :func:`choose_chunk_size`. Clients are sorted by
        their number of steps (longest first) before chunking, so a chunk holds clients of
        similar sizes.

    Returns
    -------
    list of (dict, TrainResult)
        Per job, in the order of ``jobs``: the trained state dict (parameters trained, buffers
        copied from the job's state, all on ``device``) and its :class:`TrainResult`, whose
        ``seconds`` is the client's share of its chunk's wall time, split in proportion to
        the samples each client of the chunk saw.

    Raises
    ------
    ValueError
        When the model cannot be vectorised (see :func:`can_vectorise`), a state does not
        match the model, a shard is empty or the shards' sample shapes differ.
    ConfigError
        When a WSA target names tensors that are not parameters of the model.
    """
    if not jobs:
        return []
    device = torch.device(device)
    epochs, batch_size = sgd.epochs, sgd.batch_size
    keys = _check_jobs(model, jobs, epochs, batch_size)
    if chunk_size is None:
        chunk_size = choose_chunk_size(model, batch_size, device, input_shape=jobs[0].x.shape[1:])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    steps = [_num_steps(len(job.y), batch_size, epochs) for job in jobs]
    order = sorted(range(len(jobs)), key=lambda i: -steps[i])
    results: list[tuple[dict[str, torch.Tensor], TrainResult] | None] = [None] * len(jobs)
    modes = {m: m.training for m in model.modules()}
    model.train()
    try:
        for first in range(0, len(order), chunk_size):
            chunk = order[first : first + chunk_size]
            start = time.perf_counter()
            states, losses, chunk_steps = _train_chunk(
                model,
                [jobs[i] for i in chunk],
                keys,
                epochs=epochs,
                batch_size=batch_size,
                lr=sgd.lr,
                momentum=sgd.momentum,
                weight_decay=sgd.weight_decay,
                device=device,
            )
            seconds = time.perf_counter() - start
            samples = [epochs * len(jobs[i].y) for i in chunk]
            shares = (
                [s / sum(samples) for s in samples]
                if sum(samples)
                else [1 / len(chunk)] * len(chunk)
            )
            for i, state, loss, n_steps, share in zip(
                chunk, states, losses, chunk_steps, shares, strict=True
            ):
                if not math.isfinite(loss):
                    log.warning("training diverged: mean loss %s (lower lr?)", loss)
                results[i] = (
                    state,
                    TrainResult(loss, len(jobs[i].y), n_steps, seconds * share),
                )
    finally:
        for module, mode in modes.items():
            module.training = mode
    return [r for r in results if r is not None]
