"""Weight-averaging analyses: "Rethinking Weight-Averaged Model-merging", arXiv 2411.09263.

The paper's three probes as functions of a :class:`~fedmerge.config.RunConfig` that train what
they need and return table rows (dicts); ``fedmerge analyse`` prints and plots them.

1. **Weight patterns** (:func:`weight_patterns`): a linear classifier's rows reshaped to the
   image size next to the class-mean images, and the first-layer units of the configured model,
   for a model trained on all data and for models trained on single clients' Non-IID shards.
2. **Weight vs output averaging** (:func:`soups`): for N models, uniform soup, greedy soup,
   logit ensemble and feature ensemble, for models that share an initialisation (the clients of
   one FL round) and for independently initialised ones.
3. **Magnitude scaling** (:func:`scaling`): scale all parameters of one, half or all of the N
   models by a factor M before the uniform average; accuracy and prediction agreement.

Only the abstract of the paper is available here; every protocol detail below is our choice:

- The linear classifier is a separate softmax regression (:class:`LinearClassifier`), because
  the models of :mod:`fedmerge.models` have hidden layers and a hidden unit belongs to no
  class: only a linear model's row ``c`` is "the template of class c". It starts at zero (an
  option: random), so its rows hold what training wrote into them and no initialisation
  noise. Its template-to-class-mean correlation is computed after centring rows and class
  means over the classes: softmax is invariant to adding one vector to every row, so only the
  class-centred part of the rows is determined by the loss.
- A class counts as "seen" by a client with at least ``seen_min`` (10) of its samples and as
  "absent" with none; Dirichlet shards also hold classes with a handful of samples (neither:
  a few samples already write a template into a row).
- Shared initialisation: the N clients of one FedAvg round of ``cfg`` (partition, number of
  clients, local epochs, client seeds of round ``warmup_rounds + 1``), started from the seeded
  initial model or, with ``warmup_rounds > 0``, from the model after that many FedAvg rounds.
  Independent: model k starts from seed ``cfg.seed + 1 + k`` and is trained with the same
  data and seed as client k (``independent_data="shards"``, so the two settings differ only in
  the initialisation) or on the whole training split (``"full"``, the model-soup setting).
- Held-out set = the config's proxy slice of the *training* split (``proxy-size``; 1000 samples,
  or a tenth of a small training split, when it is 0): never seen by any model, never the test
  split. The greedy soup selects on it and BatchNorm models get their statistics recomputed on
  its inputs after every weight average (:func:`fedmerge.merging.repair_batchnorm`).
- Greedy soup (Wortsman et al., ICML 2022): models sorted by held-out accuracy, a model joins
  the (uniform) soup only if the held-out accuracy strictly improves.
- Feature ensemble: mean of the models' penultimate features (the input of the last ``Linear``
  layer) through one head, by default the uniform soup's head (symmetric in the models, and
  it isolates the body: the uniform soup is the same head on the averaged body's features);
  ``feature_head="first"`` uses model 0's head. With each model's own head it would equal the
  logit ensemble (the head is linear).
- Scaling multiplies the parameters (``named_parameters``; not BN running statistics, which are
  recomputed) of models ``0`` (one), ``0..N/2-1`` (half) or all by M, then averages uniformly.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, unknown_name
from .federation import DataSpec, client_seed, client_shard, load_data, make_model
from .merging import average, repair_batchnorm
from .training import evaluate, resolve_device, train

if TYPE_CHECKING:
    from .config import RunConfig
    from .datasets import FederatedDataset

log = logging.getLogger(__name__)

State = dict[str, Tensor]

#: Model sets of :func:`soups` and :func:`scaling`.
SETTINGS: tuple[str, ...] = ("shared", "independent")
#: Heads of the feature ensemble.
FEATURE_HEADS: tuple[str, ...] = ("soup", "first")
#: Training data of independently initialised models.
INDEPENDENT_DATA: tuple[str, ...] = ("shards", "full")
#: Which models :func:`scaling` scales.
CASES: tuple[str, ...] = ("one", "half", "all")
#: Held-out samples when the config's ``proxy-size`` is 0.
DEFAULT_HOLDOUT = 1000


# -- shared helpers --------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSettings:
    """Local SGD settings of every model an analysis trains."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float

    @classmethod
    def of(cls, cfg: RunConfig, epochs: int | None = None) -> TrainSettings:
        """The config's local-training settings (``local-epochs`` unless ``epochs``)."""
        if epochs is not None and epochs < 1:
            raise ConfigError("--epochs", epochs, "an integer >= 1")
        n = cfg.local_epochs if epochs is None else epochs
        return cls(n, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay)


def _cpu(state: dict[str, Tensor]) -> State:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    settings: TrainSettings,
    *,
    seed: int,
    device: torch.device | str = "cpu",
) -> State:
    """Train ``model`` in place and return its state dict (a CPU copy)."""
    train(
        model,
        x,
        y,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        seed=seed,
        device=device,
    )
    return _cpu(model.state_dict())


def _loaded(template: nn.Module, state: State, device: torch.device | str) -> nn.Module:
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model.to(device).eval()


def with_holdout(cfg: RunConfig) -> RunConfig:
    """``cfg`` with a held-out proxy slice: its own ``proxy-size``, else 1000 (or a tenth)."""
    if cfg.proxy_size > 0:
        return cfg
    n = len(load_data(DataSpec.of(cfg)).y_train)
    return cfg.replace(proxy_size=min(DEFAULT_HOLDOUT, max(1, n // 10)))


def head_name(model: nn.Module) -> str:
    """Name of the model's last ``nn.Linear`` (its classifier head)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear head")
    return names[-1]


@torch.no_grad()
def outputs(
    model: nn.Module, x: Tensor, *, device: torch.device | str = "cpu", batch_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """Logits and penultimate features (the input of the head) of ``model`` on ``x``, on CPU."""
    model.to(device).eval()
    feats: list[Tensor] = []
    hook = model.get_submodule(head_name(model)).register_forward_pre_hook(
        lambda _m, inputs: feats.append(inputs[0].detach().cpu())
    )
    try:
        logits = [
            model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)
        ]
    finally:
        hook.remove()
    return torch.cat(logits), torch.cat(feats)


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Share of rows whose arg-max is the label."""
    return float((logits.argmax(1) == y).double().mean())


def agreement(a: Tensor, b: Tensor) -> float:
    """Share of rows where two logit tensors predict the same class."""
    return float((a.argmax(1) == b.argmax(1)).double().mean())


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
    settings = TrainSettings.of(cfg, epochs)
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


# -- 2. weight averaging vs output averaging -------------------------------------------------
@dataclass(frozen=True)
class ModelSet:
    """N trained models of one architecture, the setting they come from, their data sizes."""

    setting: str
    template: nn.Module
    states: tuple[State, ...]
    sizes: tuple[int, ...]


def fedavg_rounds(
    template: nn.Module,
    state: State,
    shards: Sequence[tuple[Tensor, Tensor]],
    settings: TrainSettings,
    *,
    rounds: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> State:
    """``rounds`` rounds of FedAvg (all clients, data-size weights) from ``state``."""
    for r in range(1, rounds + 1):
        states = [
            _train_from(
                template, state, x, y, settings, seed=client_seed(seed, k, r), device=device
            )
            for k, (x, y) in enumerate(shards)
        ]
        state = average(states, [len(y) for _, y in shards], reference=state)
    return state


def _train_from(
    template: nn.Module,
    state: State,
    x: Tensor,
    y: Tensor,
    settings: TrainSettings,
    *,
    seed: int,
    device: torch.device | str,
) -> State:
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return fit(model, x, y, settings, seed=seed, device=device)


def train_model_set(
    cfg: RunConfig,
    setting: str,
    *,
    epochs: int | None = None,
    warmup_rounds: int = 0,
    independent_data: str = "shards",
) -> ModelSet:
    """Train ``cfg.num_clients`` models for ``setting`` ("shared" or "independent").

    Parameters
    ----------
    cfg : RunConfig
        Dataset, partition, model, local training (module docstring).
    setting : {"shared", "independent"}
        One FL round's clients from one start, or models from seeds ``cfg.seed + 1 + k``.
    epochs : int, optional
        Local epochs (``cfg.local_epochs`` by default).
    warmup_rounds : int
        Shared start = the model after this many FedAvg rounds (0: the initial model).
    independent_data : {"shards", "full"}
        Training data of the independent models.

    Returns
    -------
    ModelSet
    """
    if setting not in SETTINGS:
        raise unknown_name("--settings", setting, SETTINGS)
    if independent_data not in INDEPENDENT_DATA:
        raise unknown_name("--independent-data", independent_data, INDEPENDENT_DATA)
    if warmup_rounds < 0:
        raise ConfigError("--warmup-rounds", warmup_rounds, "an integer >= 0")
    device = resolve_device(cfg.device)
    settings = TrainSettings.of(cfg, epochs)
    spec = DataSpec.of(cfg)
    data = load_data(spec)
    shards = [client_shard(spec, k) for k in range(cfg.num_clients)]
    template = make_model(cfg, data, seed=cfg.seed)
    n = cfg.num_clients
    if setting == "shared":
        start = _cpu(template.state_dict())
        if warmup_rounds:
            start = fedavg_rounds(
                template,
                start,
                shards,
                settings,
                rounds=warmup_rounds,
                seed=cfg.seed,
                device=device,
            )
        inits = [start] * n
    else:
        inits = [_cpu(make_model(cfg, data, seed=cfg.seed + 1 + k).state_dict()) for k in range(n)]
        if independent_data == "full":
            shards = [(data.x_train, data.y_train)] * n
    seeds = [client_seed(cfg.seed, k, warmup_rounds + 1) for k in range(n)]
    states = tuple(
        _train_from(template, init, x, y, settings, seed=s, device=device)
        for init, (x, y), s in zip(inits, shards, seeds, strict=True)
    )
    log.info("trained %d %s models", n, setting)
    return ModelSet(setting, template, states, tuple(len(y) for _, y in shards))


def greedy_soup(
    template: nn.Module,
    states: Sequence[State],
    x: Tensor,
    y: Tensor,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
) -> tuple[State, list[int], float]:
    """Greedy soup (Wortsman et al., ICML 2022) selected on a held-out set ``(x, y)``.

    Models are visited by decreasing held-out accuracy (ties: lower index first); one joins
    the uniform average of the ingredients only if the held-out accuracy strictly improves,
    so the soup is never below the best single model on ``(x, y)``. BatchNorm statistics of
    every candidate average are recomputed on ``x``.

    Parameters
    ----------
    template : torch.nn.Module
        The architecture (not modified).
    states : sequence of state dicts
        The candidate models.
    x, y : Tensor
        Held-out inputs and labels (a slice of the training split, never the test split).
    device : torch.device or str
        Where to evaluate.
    batch_size : int
        Evaluation batch size.

    Returns
    -------
    tuple
        ``(soup state, indices of the ingredients in the order added, held-out accuracy)``.
    """

    def held_out(state: State) -> float:
        model = _loaded(template, state, device)
        return accuracy(outputs(model, x, device=device, batch_size=batch_size)[0], y)

    scores = [held_out(s) for s in states]
    order = sorted(range(len(states)), key=lambda k: (-scores[k], k))
    chosen, soup, best = [order[0]], dict(states[order[0]]), scores[order[0]]
    for k in order[1:]:
        candidate = repair_batchnorm(template, average([states[i] for i in (*chosen, k)]), x)
        score = held_out(candidate)
        if score > best:
            chosen, soup, best = [*chosen, k], candidate, score
    return soup, chosen, best


def soup_rows(
    models: ModelSet,
    data: FederatedDataset,
    *,
    feature_head: str = "soup",
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
) -> list[dict]:
    """Test accuracy of the individual models, the soups and the two ensembles.

    Parameters
    ----------
    models : ModelSet
        The N models.
    data : FederatedDataset
        Test split for the scores; its proxy slice is the held-out set (greedy selection,
        BatchNorm repair of every weight average).
    feature_head : {"soup", "first"}
        Head of the feature ensemble: the uniform soup's or model 0's.
    device : torch.device or str
        Where to evaluate.
    batch_size : int
        Evaluation batch size.

    Returns
    -------
    list of dict
        One row per method (``setting``, ``method``, ``test-accuracy``, ``models``; ``min`` and
        ``max`` for the individual models, ``held-out`` for the greedy soup).
    """
    if feature_head not in FEATURE_HEADS:
        raise unknown_name("--feature-head", feature_head, FEATURE_HEADS)
    if len(data.y_proxy) == 0:
        raise ConfigError("proxy-size", 0, "an integer > 0 (the held-out slice)")
    t, xs, xt, yt = models.template, data.x_proxy, data.x_test, data.y_test

    def test_outputs(state: State) -> tuple[Tensor, Tensor]:
        return outputs(_loaded(t, state, device), xt, device=device, batch_size=batch_size)

    per_model = [test_outputs(s) for s in models.states]
    accs = [accuracy(logits, yt) for logits, _ in per_model]
    uniform = repair_batchnorm(t, average(models.states), xs)
    weighted = repair_batchnorm(t, average(models.states, models.sizes), xs)
    greedy, chosen, held = greedy_soup(t, models.states, xs, data.y_proxy, device=device)
    head = head_name(t)
    head_state = uniform if feature_head == "soup" else models.states[0]
    features = torch.stack([f for _, f in per_model]).mean(0)
    feature_logits = F.linear(features, head_state[f"{head}.weight"], head_state[f"{head}.bias"])
    logit_ens = torch.stack([logits for logits, _ in per_model]).mean(0)
    n = len(models.states)
    rows = [
        ("individual (mean)", sum(accs) / n, n, {"min": min(accs), "max": max(accs)}),
        ("best individual (held-out)", accs[chosen[0]], 1, {}),
        ("uniform soup", accuracy(test_outputs(uniform)[0], yt), n, {}),
        ("size-weighted soup (FedAvg)", accuracy(test_outputs(weighted)[0], yt), n, {}),
        ("greedy soup", accuracy(test_outputs(greedy)[0], yt), len(chosen), {"held-out": held}),
        ("logit ensemble", accuracy(logit_ens, yt), n, {}),
        (f"feature ensemble ({feature_head} head)", accuracy(feature_logits, yt), n, {}),
    ]
    return [
        {"setting": models.setting, "method": m, "test-accuracy": a, "models": k, **extra}
        for m, a, k, extra in rows
    ]


# -- 3. magnitude scaling --------------------------------------------------------------------
def scaled_indices(case: str, n: int) -> list[int]:
    """Models scaled in ``case``: ``[0]``, the first ``max(1, n // 2)``, or all ``n``."""
    if case not in CASES:
        raise unknown_name("case", case, CASES)
    return {"one": [0], "half": list(range(max(1, n // 2))), "all": list(range(n))}[case]


def scale_parameters(state: State, names: set[str], factor: float) -> State:
    """``state`` with the entries in ``names`` (the parameters) multiplied by ``factor``."""
    return {k: v * factor if k in names else v.clone() for k, v in state.items()}


def scaling_rows(
    models: ModelSet,
    data: FederatedDataset,
    *,
    factors: Sequence[float] = (100.0,),
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
) -> list[dict]:
    """Uniform averages in which some models' parameters are multiplied by a factor.

    Parameters
    ----------
    models : ModelSet
        The N models.
    data : FederatedDataset
        Test split for the scores; BatchNorm statistics of every average are recomputed on
        its proxy slice.
    factors : sequence of float
        Factors M; each is applied in every case of :data:`CASES`.
    device : torch.device or str
        Where to evaluate.
    batch_size : int
        Evaluation batch size.

    Returns
    -------
    list of dict
        A baseline row (``case="none"``: the uniform soup) and one row per factor and case:
        ``test-accuracy``; ``agreement-unscaled``, the share of test predictions equal to the
        uniform soup's; ``agreement-subset``, equal to the uniform soup of only the scaled
        models (unscaled), and ``subset-accuracy``, that soup's test accuracy;
        ``logit-ratio``, mean ``|logit|`` over the uniform soup's.
    """
    t, xs, xt, yt = models.template, data.x_proxy, data.x_test, data.y_test
    names = {name for name, _ in t.named_parameters()}
    n = len(models.states)

    def merged_logits(states: Sequence[State]) -> Tensor:
        state = repair_batchnorm(t, average(states), xs)
        return outputs(_loaded(t, state, device), xt, device=device, batch_size=batch_size)[0]

    base = merged_logits(models.states)
    scale = float(base.abs().mean())
    rows = [
        {
            "setting": models.setting,
            "factor": 1.0,
            "case": "none",
            "scaled": 0,
            "test-accuracy": accuracy(base, yt),
            "agreement-unscaled": 1.0,
            "agreement-subset": 1.0,
            "subset-accuracy": accuracy(base, yt),
            "logit-ratio": 1.0,
        }
    ]
    for factor in factors:
        for case in CASES:
            idx = scaled_indices(case, n)
            states = [
                scale_parameters(s, names, factor) if k in idx else s
                for k, s in enumerate(models.states)
            ]
            logits = merged_logits(states)
            subset = merged_logits([models.states[k] for k in idx])
            rows.append(
                {
                    "setting": models.setting,
                    "factor": float(factor),
                    "case": case,
                    "scaled": len(idx),
                    "test-accuracy": accuracy(logits, yt),
                    "agreement-unscaled": agreement(logits, base),
                    "agreement-subset": agreement(logits, subset),
                    "subset-accuracy": accuracy(subset, yt),
                    "logit-ratio": float(logits.abs().mean()) / scale,
                }
            )
    return rows


# -- experiments: config in, rows out ---------------------------------------------------------
def model_sets(
    cfg: RunConfig,
    *,
    settings: Sequence[str] = SETTINGS,
    epochs: int | None = None,
    warmup_rounds: int = 0,
    independent_data: str = "shards",
) -> list[ModelSet]:
    """One :class:`ModelSet` per setting (``cfg`` should carry a held-out slice)."""
    return [
        train_model_set(
            cfg, s, epochs=epochs, warmup_rounds=warmup_rounds, independent_data=independent_data
        )
        for s in settings
    ]


def soups(cfg: RunConfig, *, feature_head: str = "soup", **train_options: Any) -> list[dict]:
    """Weight vs output averaging (probe 2) for every setting.

    Parameters
    ----------
    cfg : RunConfig
        The run configuration; a held-out slice is added when ``proxy-size`` is 0
        (:func:`with_holdout`).
    feature_head : {"soup", "first"}
        Head of the feature ensemble.
    **train_options
        ``settings``, ``epochs``, ``warmup_rounds``, ``independent_data`` of
        :func:`model_sets`.

    Returns
    -------
    list of dict
        The rows of :func:`soup_rows`, setting after setting.
    """
    cfg = with_holdout(cfg)
    data, device = load_data(DataSpec.of(cfg)), resolve_device(cfg.device)
    rows: list[dict] = []
    for models in model_sets(cfg, **train_options):
        rows += soup_rows(models, data, feature_head=feature_head, device=device)
    return rows


def scaling(
    cfg: RunConfig, *, factors: Sequence[float] = (100.0,), **train_options: Any
) -> list[dict]:
    """The magnitude-scaling probe (probe 3) for every setting.

    Parameters
    ----------
    cfg : RunConfig
        As in :func:`soups`.
    factors : sequence of float
        Factors M (the paper's default probe: 100).
    **train_options
        As in :func:`soups`.

    Returns
    -------
    list of dict
        The rows of :func:`scaling_rows`, setting after setting.
    """
    cfg = with_holdout(cfg)
    data, device = load_data(DataSpec.of(cfg)), resolve_device(cfg.device)
    rows: list[dict] = []
    for models in model_sets(cfg, **train_options):
        rows += scaling_rows(models, data, factors=factors, device=device)
    return rows
