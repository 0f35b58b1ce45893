"""Analysis 1: weight patterns (classifier rows and first-layer units vs class-mean images)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...federation import DataSpec, client_seed, client_shard, load_data, make_model
from ...training import evaluate, resolve_device

if TYPE_CHECKING:
    from ...config import RunConfig

from .common import analysis_sgd, fit

log = logging.getLogger(__name__)


# -- 1. weight patterns ----------------------------------------------------------------------
class LinearClassifier(nn.Module):
    """Softmax regression: flatten, one ``Linear`` named ``fc``; row ``c`` scores class c."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of a batch ``(N, *input_shape)``."""
        return self.fc(torch.flatten(x, 1))


def linear_classifier(
    input_shape: tuple[int, ...], num_classes: int, *, seed: int, zero: bool = True
) -> LinearClassifier:
    """A :class:`LinearClassifier` starting at zero, or from a seeded random initialisation.

    Zero is the default of the weight-pattern probe: softmax regression is convex, so the
    start does not change what is learnt, and from zero every row is a sum of gradient steps,
    i.e. a combination of training inputs, with no initialisation noise in the pictures.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)  # global RNG untouched
        model = LinearClassifier(input_shape, num_classes)
    if zero:
        with torch.no_grad():
            model.fc.weight.zero_()
            model.fc.bias.zero_()
    return model


def class_means(x: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """Mean input of every class, ``(num_classes, *input_shape)`` (zeros for an absent class)."""
    onehot = F.one_hot(y, num_classes).to(x.dtype)  # (N, C)
    sums = onehot.T @ x.flatten(1)
    counts = onehot.sum(0).clamp_min(1)[:, None]
    return (sums / counts).reshape(num_classes, *x.shape[1:])


def template_correlation(templates: Tensor, means: Tensor, *, centre: bool = True) -> Tensor:
    """Pearson correlation ``r[c, c']`` of template (row) ``c`` with class mean ``c'``.

    Parameters
    ----------
    templates, means : Tensor
        ``(C, ...)``: one flattened template and one class mean per class.
    centre : bool
        Subtract the mean over classes from templates and means first (module docstring).

    Returns
    -------
    Tensor
        ``(C, C)`` float64; the diagonal pairs each class's template with its own mean.
    """
    t, m = templates.flatten(1).double(), means.flatten(1).double()
    if centre:
        t, m = t - t.mean(0), m - m.mean(0)
    t = t - t.mean(1, keepdim=True)
    m = m - m.mean(1, keepdim=True)
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    m = m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return t @ m.T


def diagonal_contrast(r: Tensor, rows: Sequence[int] | None = None) -> tuple[float, float]:
    """Mean diagonal and mean off-diagonal entry of ``r`` over ``rows`` (all by default)."""
    idx = list(range(r.shape[0])) if rows is None else list(rows)
    if not idx:
        return math.nan, math.nan
    sub = r[idx]
    diag = sub[torch.arange(len(idx)), torch.tensor(idx)]
    off = (sub.sum() - diag.sum()) / (sub.numel() - len(idx)) if r.shape[1] > 1 else math.nan
    return float(diag.mean()), float(off)


def first_layer_units(
    model: nn.Module, input_shape: tuple[int, ...], limit: int | None = 8
) -> Tensor:
    """Up to ``limit`` (None: all) first-layer units as images ``(U, C, h, w)``: conv kernels,
    or the first Linear's rows reshaped to the input shape."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.weight.detach().cpu()[:limit].clone()
        if isinstance(module, nn.Linear):
            rows = module.weight.detach().cpu()[:limit]
            shape = input_shape if len(input_shape) == 3 else (1, 1, math.prod(input_shape))
            return rows.reshape(len(rows), *shape).clone()
    raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer")


@dataclass
class WeightPatterns:
    """What :func:`weight_patterns` found; ``labels`` index every dict ("all data", "client 0")."""

    classes: tuple[str, ...]
    means: Tensor  # (C, *input_shape) class means of the training split
    templates: dict[str, Tensor] = field(default_factory=dict)  # linear rows (C, *input_shape)
    correlations: dict[str, Tensor] = field(default_factory=dict)  # (C, C), centred
    counts: dict[str, list[int]] = field(default_factory=dict)  # samples per class
    seen: dict[str, list[int]] = field(default_factory=dict)  # classes with >= seen_min
    # first-layer units of cfg.model: "initial", then one per training set
    filters: dict[str, Tensor] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)


def weight_patterns(
    cfg: RunConfig,
    *,
    epochs: int = 3,
    clients: int = 3,
    seen_min: int = 10,
    units: int = 8,
    zero: bool = True,
) -> WeightPatterns:
    """Train a linear classifier and ``cfg.model`` on all data and on clients ``0..clients-1``.

    Parameters
    ----------
    cfg : RunConfig
        Dataset, partition (for the clients' shards), model, batch size, lr, momentum, weight
        decay, seed and device.
    epochs : int
        Training epochs of every model (the linear ones and ``cfg.model``).
    clients : int
        How many clients' shards get their own models (at most ``cfg.num_clients``).
    seen_min : int
        Samples of a class a shard must hold for the class to count as seen.
    units : int
        First-layer units of ``cfg.model`` kept for the plot.
    zero : bool
        Start the linear classifiers at zero (else from seed ``cfg.seed``; see
        :func:`linear_classifier`). ``cfg.model`` always starts from seed ``cfg.seed``.

    Returns
    -------
    WeightPatterns
        Its ``rows``, one per training set: samples, classes seen, both models' test accuracy,
        the template-to-class-mean correlation ``r`` (mean over the diagonal and
        off-diagonal, centred; the diagonal over seen and over absent classes; uncentred), and
        ``first-layer-change``, ``|W - W_init| / |W_init|`` of ``cfg.model``'s first layer.
    """
    device = resolve_device(cfg.device)
    settings = analysis_sgd(cfg, epochs)
    spec = DataSpec.of(cfg)
    data = load_data(spec)
    clients = min(clients, cfg.num_clients)
    out = WeightPatterns(data.classes, class_means(data.x_train, data.y_train, data.num_classes))
    sources = [("all data", data.x_train, data.y_train, cfg.seed)]
    for k in range(clients):
        sources.append((f"client {k}", *client_shard(spec, k), client_seed(cfg.seed, k, 1)))
    initial = first_layer_units(make_model(cfg, data, seed=cfg.seed), data.input_shape, None)
    out.filters["initial"] = initial[:units]  # every cfg.model below starts from it
    for label, x, y, seed in sources:
        counts = torch.bincount(y, minlength=data.num_classes)
        seen = [c for c in range(data.num_classes) if counts[c] >= seen_min]
        absent = [c for c in range(data.num_classes) if counts[c] == 0]
        linear = linear_classifier(data.input_shape, data.num_classes, seed=cfg.seed, zero=zero)
        state = fit(linear, x, y, settings, seed=seed, device=device)
        rows = state["fc.weight"].reshape(data.num_classes, *data.input_shape)
        r = template_correlation(rows, out.means)
        model = make_model(cfg, data, seed=cfg.seed)
        fit(model, x, y, settings, seed=seed, device=device)
        trained = first_layer_units(model, data.input_shape, None)
        out.templates[label], out.correlations[label], out.seen[label] = rows, r, seen
        out.counts[label] = counts.tolist()
        out.filters[label] = trained[:units]
        diag, off = diagonal_contrast(r)
        raw_diag, raw_off = diagonal_contrast(template_correlation(rows, out.means, centre=False))
        out.rows.append(
            {
                "data": label,
                "samples": len(y),
                "classes-seen": len(seen),
                "classes-absent": len(absent),
                "linear-accuracy": evaluate(linear, data.x_test, data.y_test, device=device)[1],
                f"{cfg.model}-accuracy": evaluate(model, data.x_test, data.y_test, device=device)[
                    1
                ],
                "corr-diag": diag,
                "corr-off": off,
                "corr-diag-seen": diagonal_contrast(r, seen)[0],
                "corr-diag-absent": diagonal_contrast(r, absent)[0],
                "corr-diag-raw": raw_diag,
                "corr-off-raw": raw_off,
                "first-layer-change": float((trained - initial).norm() / initial.norm()),
            }
        )
        log.info("weight patterns %s: r diag %.3f off %.3f", label, diag, off)
    return out
