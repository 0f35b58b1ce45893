"""Per-dataset training defaults (lr, batch-size, local-epochs at 0) and the divergence warning."""

from __future__ import annotations

import logging

import pytest

from fedmerge.config import RunConfig
from fedmerge.datasets import DATASETS
from fedmerge.errors import ConfigError
from fedmerge.results import read_metrics
from fedmerge.runner import run


def _training(cfg: RunConfig) -> tuple[float, int, int]:
    return cfg.lr, cfg.batch_size, cfg.local_epochs


def test_each_dataset_brings_its_training_and_explicit_values_win():
    assert _training(RunConfig()) == (0.05, 16, 2)  # digits: fedmerge's, as before
    for name in ("mnist", "fashion-mnist", "cifar10", "cifar100"):  # NIID-Bench's
        assert _training(RunConfig.from_mapping({"dataset": name})) == (0.01, 64, 10)
    assert _training(RunConfig.from_mapping({"dataset": "synthetic"})) == (0.05, 16, 2)
    mixed = RunConfig.from_mapping({"dataset": "fashion-mnist", "lr": 0.05, "batch-size": 0})
    assert _training(mixed) == (0.05, 64, 10)
    # A new dataset brings its defaults, except for values set by hand.
    assert _training(RunConfig().replace(dataset="mnist")) == (0.01, 64, 10)
    assert _training(mixed.replace(dataset="digits")) == (0.05, 16, 2)
    assert RunConfig.from_mapping({"lr": 0.3}).replace(dataset="mnist").lr == 0.3
    # The resolved values are what a run records (config.json) and a resume reads back.
    again = RunConfig.from_mapping(mixed.to_mapping())
    assert again == mixed
    with pytest.raises(ConfigError, match="'lr'.*0 \\(the dataset's default\\)"):
        RunConfig.from_mapping({"lr": -1})
    assert all(d.training.lr > 0 for d in DATASETS.values())


def test_a_diverging_run_warns_and_names_lr(tmp_path, caplog):
    base = {"num-rounds": 2, "output-dir": str(tmp_path), "save-model": False}
    with caplog.at_level(logging.WARNING, logger="fedmerge"):
        run(RunConfig.from_mapping({**base, "run-name": "ok"}), "local")
    assert not any("diverging" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedmerge"):
        run(RunConfig.from_mapping({**base, "lr": 3.0, "run-name": "hot"}), "local")
    warnings = [r.getMessage() for r in caplog.records if "diverging" in r.getMessage()]
    assert len(warnings) == 1  # once per run
    assert "lower lr (now 3" in warnings[0] and warnings[0].startswith("round 1:")


@pytest.mark.slow
def test_fashion_mnist_learns_with_the_defaults(tmp_path, shared_data_root):
    # With digits' settings (lr 0.05, batch 16) this run diverges (10% after 3 rounds);
    # with NIID-Bench's, Fashion-MNIST's defaults, it learns.
    cfg = RunConfig.from_mapping(
        {
            "dataset": "fashion-mnist",
            "data-root": str(shared_data_root),
            "max-train-samples": 12000,
            "num-rounds": 3,
            "output-dir": str(tmp_path),
            "run-name": "fm",
            "save-model": False,
        }
    )
    rows = read_metrics(run(cfg, "local"))
    assert rows[-1]["test-accuracy"] >= 0.45
