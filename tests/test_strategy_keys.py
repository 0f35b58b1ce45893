"""Run-config keys of the server reach what they configure: Flower's built-in strategies'
attributes (``server-lr``, ``fedopt-*``, ``trimmed-beta``, ``proximal-mu``, sampling) and
``strategy.start(timeout=...)`` (``round-timeout``)."""

from __future__ import annotations

import pytest
from fedmerge.strategies.registry import build_strategy
from fedmerge.strategies.validation import ValidatedReplies
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
)

from fedmerge.config import RunConfig
from fedmerge.engine.local import LocalGrid
from fedmerge.runner import run

# Every value differs from its RunConfig default and from Flower's constructor default.
KEYS = {
    "server-lr": 0.7,
    "server-momentum": 0.35,
    "fedopt-eta": 0.123,
    "fedopt-tau": 0.0042,
    "fedopt-beta-1": 0.81,
    "fedopt-beta-2": 0.977,
    "trimmed-beta": 0.3,
    "proximal-mu": 0.25,
    "lr": 0.037,  # FedOpt's eta_l is the clients' lr
    "fraction-train": 0.6,
    "fraction-evaluate": 0.4,
    "min-train-clients": 3,
}

FEDOPT = {"eta": 0.123, "eta_l": 0.037, "tau": 0.0042}
BETAS = {"beta_1": 0.81, "beta_2": 0.977}

EXPECTED = {
    "fedavgm": (FedAvgM, {"server_learning_rate": 0.7, "server_momentum": 0.35}),
    "fedadam": (FedAdam, {**FEDOPT, **BETAS}),
    "fedyogi": (FedYogi, {**FEDOPT, **BETAS}),
    "fedadagrad": (FedAdagrad, FEDOPT),
    "fedtrimmedavg": (FedTrimmedAvg, {"beta": 0.3}),
    "fedprox": (FedProx, {"proximal_mu": 0.25}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_strategy_keys_reach_the_flower_strategy(name):
    cls, attrs = EXPECTED[name]
    strategy = build_strategy(RunConfig.from_mapping({**KEYS, "strategy": name}))
    assert isinstance(strategy, cls) and isinstance(strategy, ValidatedReplies)
    for attr, value in attrs.items():
        assert getattr(strategy, attr) == pytest.approx(value), (name, attr)
    # The sampling keys every entry shares.
    assert strategy.fraction_train == pytest.approx(0.6)
    assert strategy.fraction_evaluate == pytest.approx(0.4)
    assert strategy.min_train_nodes == 3 and strategy.min_available_nodes == 3
    assert strategy.min_evaluate_nodes == 3


def _timeouts_seen(tmp_path, monkeypatch, **over) -> list[float | None]:
    """The ``timeout`` every ``send_and_receive`` of a 2-round local run received."""
    seen: list[float | None] = []
    original = LocalGrid.send_and_receive

    def spy(self, messages, *, timeout=None):
        seen.append(timeout)
        return original(self, messages, timeout=timeout)

    monkeypatch.setattr(LocalGrid, "send_and_receive", spy)
    values = {
        "num-rounds": 2,
        "num-clients": 3,
        "model": "mlp",
        "mlp-hidden": "16",
        "local-epochs": 1,
        "save-model": False,
        "output-dir": str(tmp_path),
        **over,
    }
    run(RunConfig.from_mapping(values), "local")
    return seen


def test_round_timeout_reaches_strategy_start(tmp_path, monkeypatch):
    # Flower's start() hands its timeout to every grid call: train and evaluate, each round.
    seen = _timeouts_seen(tmp_path, monkeypatch, **{"round-timeout": 7.5, "run-name": "a"})
    assert seen == [7.5] * 4


def test_round_timeout_zero_means_flowers_default_hour(tmp_path, monkeypatch):
    seen = _timeouts_seen(tmp_path, monkeypatch, **{"run-name": "b"})
    assert seen == [3600.0] * 4
