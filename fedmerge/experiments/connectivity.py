"""Linear mode connectivity: loss and accuracy along the straight path between two models.

Used to show what a shared weight scope (WSA, arXiv 2408.12237) does to merging: two models
trained from different seeds, with and without a shared target scope, then evaluated at
``theta(t) = (1 - t) theta_A + t theta_B`` for t in [0, 1].

Barrier (Frankle et al. 2020; Entezari et al. 2022): ``max_t [loss(t) - ((1 - t) loss(0) + t
loss(1))]``; the accuracy barrier is ``max_t [((1 - t) acc(0) + t acc(1)) - acc(t)]``.
Models with BatchNorm get their running statistics recomputed at every t on training data
(stale statistics would make any interpolation look bad).

With a matcher (``match_method``), the path is measured a second time after aligning B's hidden
units to A's (:func:`fedmerge.matching.match`; the data-based matchers read the first
``MATCH_SAMPLES`` training inputs): the permutation symmetry that a shared scope does not touch.
B's function is unchanged by the alignment, so both paths share their end points.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..merging import align_one, has_batchnorm, reset_batchnorm_stats
from ..permutations import State
from ..scopes import Scope, WSARegularizer, fuse_scopes, scope_names, scope_of
from ..training import SGDSettings, evaluate, train

if TYPE_CHECKING:
    from ..config import RunConfig

log = logging.getLogger(__name__)


#: Training inputs the data-based matchers (activation, dual) read.
MATCH_SAMPLES = 2000


def interpolate(a: State, b: State, t: float) -> dict[str, torch.Tensor]:
    """``(1 - t) a + t b`` for floating tensors; integer buffers are taken from ``a``."""
    out = {}
    for k, va in a.items():
        vb = b[k]
        out[k] = torch.lerp(va, vb, t) if va.is_floating_point() else va.clone()
    return out


def barrier(values: Sequence[float], ts: Sequence[float], *, higher_is_better: bool) -> float:
    """Largest gap between the straight line joining the end points and the curve."""
    v0, v1 = values[0], values[-1]
    gaps = []
    for v, t in zip(values, ts, strict=True):
        line = (1 - t) * v0 + t * v1
        gaps.append(line - v if higher_is_better else v - line)
    return max(gaps)


@dataclass
class PathResult:
    """Loss and accuracy along the path, and the two barriers."""

    ts: list[float]
    loss: list[float]
    accuracy: list[float]
    loss_barrier: float = field(init=False)
    accuracy_barrier: float = field(init=False)

    def __post_init__(self) -> None:
        self.loss_barrier = barrier(self.loss, self.ts, higher_is_better=False)
        self.accuracy_barrier = barrier(self.accuracy, self.ts, higher_is_better=True)


def evaluate_path(
    model: nn.Module,
    a: State,
    b: State,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    points: int = 11,
    bn_data: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
) -> PathResult:
    """Evaluate ``model`` loaded with each interpolation of ``a`` and ``b`` on ``(x, y)``."""
    ts = [i / (points - 1) for i in range(points)]
    losses, accs = [], []
    for t in ts:
        model.load_state_dict(interpolate(a, b, t))
        model.to(device)
        if bn_data is not None and has_batchnorm(model):
            reset_batchnorm_stats(model, bn_data.to(device))
        loss, acc = evaluate(model, x, y, batch_size=batch_size, device=device)
        losses.append(loss)
        accs.append(acc)
    return PathResult(ts, losses, accs)


def shared_target(models: Sequence[nn.Module], layers: str = "conv-linear") -> Scope:
    """The target both models are trained toward: the moment fusion of their initial scopes."""
    states = [m.state_dict() for m in models]
    names = scope_names(states[0], layers)
    return fuse_scopes([scope_of(s, names) for s in states], [1.0] * len(states), "moment")


def train_pair(
    model_a: nn.Module,
    model_b: nn.Module,
    data_a: tuple[torch.Tensor, torch.Tensor],
    data_b: tuple[torch.Tensor, torch.Tensor],
    *,
    wsa_lambda: float,
    sgd: SGDSettings,
    seeds: tuple[int, int],
    device: torch.device | str = "cpu",
    layers: str = "conv-linear",
) -> Scope | None:
    """Train two models in place; with ``wsa_lambda > 0`` both toward one shared target scope.

    Returns the target used (None without WSA).
    """
    target = shared_target([model_a, model_b], layers) if wsa_lambda > 0 else None
    for model, (x, y), seed in ((model_a, data_a, seeds[0]), (model_b, data_b, seeds[1])):
        regs = [WSARegularizer(target, wsa_lambda, device=device)] if target is not None else []
        train(
            model,
            x,
            y,
            sgd,
            seed=seed,
            device=device,
            regularizers=regs,
        )
    return target


def scope_gap(a: State, b: State, names: Sequence[str]) -> float:
    """Mean over layers of ``|s_A - s_B| / ((s_A + s_B) / 2)``: how far apart two scopes are."""
    sa, sb = scope_of(a, names), scope_of(b, names)
    gaps = [abs(x - y) / ((x + y) / 2) for x, y in zip(sa.sigma, sb.sigma, strict=True)]
    return sum(gaps) / len(gaps)


def connectivity_experiment(
    cfg: RunConfig,  # not imported at run time: keeps this module light
    *,
    lambdas: Sequence[float],
    epochs: int,
    seeds: tuple[int, int] = (1, 2),
    split: str = "same",
    points: int = 11,
    match_method: str | None = None,
) -> list[dict[str, Any]]:
    """Train model pairs from two seeds for each ``wsa-lambda``; measure the path between them.

    ``split = "same"``: both models see the whole training split; ``"partition"``: model A gets
    client 0's and model B client 1's shard of a 2-client ``cfg.partition`` split (Non-IID).
    ``match_method`` (``weight``, ``activation``, ``dual``; None: no matching) adds the path
    from A to B aligned to A, as ``matched-*`` keys of each result.
    """
    from ..config import RunConfig
    from ..errors import ConfigError
    from ..federation import DataSpec, client_shard, load_data, make_model
    from ..training import resolve_device

    assert isinstance(cfg, RunConfig)
    if split not in ("same", "partition"):
        raise ConfigError("--split", split, "one of: same, partition")
    if match_method is not None:
        from ..matching import MATCHERS

        if match_method not in MATCHERS:
            raise ConfigError("--match", match_method, "one of: none, " + ", ".join(MATCHERS))
    device = resolve_device(cfg.device)
    data = load_data(DataSpec.of(cfg))
    if split == "same":
        data_a = data_b = (data.x_train, data.y_train)
    else:
        spec = DataSpec.of(cfg, num_clients=2)
        data_a, data_b = client_shard(spec, 0), client_shard(spec, 1)
    results = []
    for lam in lambdas:
        model_a = make_model(cfg, data, seed=seeds[0])
        model_b = make_model(cfg, data, seed=seeds[1])
        train_pair(
            model_a,
            model_b,
            data_a,
            data_b,
            wsa_lambda=lam,
            sgd=SGDSettings.of(cfg, epochs=epochs),
            seeds=seeds,
            device=device,
            layers=cfg.wsa_layers,
        )
        a = {k: v.detach().cpu().clone() for k, v in model_a.state_dict().items()}
        b = {k: v.detach().cpu().clone() for k, v in model_b.state_dict().items()}
        names = scope_names(a, cfg.wsa_layers)

        def path_to(end: State, a: State = a, model_a: nn.Module = model_a) -> PathResult:
            return evaluate_path(
                model_a,
                a,
                end,
                data.x_test,
                data.y_test,
                points=points,
                bn_data=data.x_train[:5000],
                device=device,
                batch_size=cfg.eval_batch_size,
            )

        path = path_to(b)
        log.info(
            "lambda %s: loss barrier %.4f, accuracy barrier %.4f",
            lam,
            path.loss_barrier,
            path.accuracy_barrier,
        )
        matched = {}
        if match_method is not None:
            inputs = data.x_train[:MATCH_SAMPLES]
            mpath = path_to(_aligned(cfg, model_a, a, b, match_method, inputs))
            matched = {
                "matched-accuracy-mid": mpath.accuracy[len(mpath.ts) // 2],
                "matched-accuracy-barrier": mpath.accuracy_barrier,
                "matched-loss-barrier": mpath.loss_barrier,
                "matched-loss": mpath.loss,
                "matched-accuracy": mpath.accuracy,
            }
        results.append(
            {
                "wsa-lambda": lam,
                "accuracy-a": path.accuracy[0],
                "accuracy-b": path.accuracy[-1],
                "accuracy-mid": path.accuracy[len(path.ts) // 2],
                "accuracy-barrier": path.accuracy_barrier,
                "loss-barrier": path.loss_barrier,
                "scope-gap": scope_gap(a, b, names),
                "t": path.ts,
                "loss": path.loss,
                "accuracy": path.accuracy,
                **matched,
            }
        )
    return results


def _aligned(
    cfg: RunConfig, template: nn.Module, a: State, b: State, method: str, inputs: torch.Tensor
) -> State:
    """``b`` with its hidden units permuted to match ``a``'s (same function as ``b``); the
    run's ``match-*`` options with ``method`` as the matcher (``match-beta = auto``, which FL
    merges choose on labelled data, is refused for the dual matcher: give the beta to
    measure)."""
    from ..models import model_spec
    from ..options import MatchOptions

    options = replace(MatchOptions.from_config(cfg), method=method)
    aligned, _ = align_one(
        model_spec(template), a, b, options, model=template, inputs=inputs, seed=cfg.seed
    )
    return aligned
