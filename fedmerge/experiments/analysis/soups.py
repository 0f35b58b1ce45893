"""Analysis 2: weight averaging (uniform and greedy soups) vs output averaging (ensembles)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError, unknown_name
from ...federation import DataSpec, client_seed, client_shard, load_data, make_model
from ...merging import average, repair_batchnorm
from ...training import SGDSettings, resolve_device

if TYPE_CHECKING:
    from ...config import RunConfig
    from ...datasets import FederatedDataset

from .common import (
    FEATURE_HEADS,
    INDEPENDENT_DATA,
    SETTINGS,
    StateDict,
    _cpu,
    _loaded,
    accuracy,
    analysis_sgd,
    fit,
    head_name,
    outputs,
)

log = logging.getLogger(__name__)


# -- 2. weight averaging vs output averaging -------------------------------------------------
@dataclass(frozen=True)
class ModelSet:
    """N trained models of one architecture, the setting they come from, their data sizes."""

    setting: str
    template: nn.Module
    states: tuple[StateDict, ...]
    sizes: tuple[int, ...]


def fedavg_rounds(
    template: nn.Module,
    state: StateDict,
    shards: Sequence[tuple[Tensor, Tensor]],
    settings: SGDSettings,
    *,
    rounds: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> StateDict:
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
    state: StateDict,
    x: Tensor,
    y: Tensor,
    settings: SGDSettings,
    *,
    seed: int,
    device: torch.device | str,
) -> StateDict:
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
    settings = analysis_sgd(cfg, epochs)
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
    states: Sequence[StateDict],
    x: Tensor,
    y: Tensor,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
) -> tuple[StateDict, list[int], float]:
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

    def held_out(state: StateDict) -> float:
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

    def test_outputs(state: StateDict) -> tuple[Tensor, Tensor]:
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
