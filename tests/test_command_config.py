"""Command-line keys a command never reads are named in a warning."""

from __future__ import annotations

import argparse
import dataclasses
import logging

from fedmerge.cli import main
from fedmerge.command_config import command_config, warn_unused
from fedmerge.config import RunConfig
from fedmerge.npmerge import NPOptions


def _args(*overrides: str) -> argparse.Namespace:
    return argparse.Namespace(config=None, overrides=list(overrides))


def test_reads_are_recorded_but_not_validation_copies_or_comparisons():
    cfg, read = command_config(_args("num-rounds=50", "np-holdout=0", "dataset=digits"))
    assert read == set()  # validation ran, nothing read yet
    assert cfg == cfg and hash(cfg) and repr(cfg).startswith("RunConfig(")
    copy = cfg.replace(seed=4)
    dataclasses.replace(cfg, seed=5)
    assert read == set() and isinstance(copy, RunConfig) and copy.seed == 4  # now read: seed
    NPOptions.from_config(copy)  # a copy records into the same set
    assert read == {"seed"} | {f"np_{f.name}" for f in dataclasses.fields(NPOptions)}


def test_unused_command_line_keys_are_warned_about(caplog):
    args = _args("num-rounds=50", "np-holdout=0", "dataset=digits")
    cfg, read = command_config(args)
    NPOptions.from_config(cfg)
    _ = cfg.dataset
    with caplog.at_level(logging.WARNING, logger="fedmerge"):
        assert warn_unused("merge-experiment", args, read) == ["num-rounds"]
    assert "merge-experiment does not use num-rounds=50" in caplog.text
    assert "np-holdout" not in caplog.text and "dataset" not in caplog.text


def test_a_key_read_through_a_config_property_counts_as_used(caplog):
    # mlp-hidden is read through RunConfig.hidden_sizes, which lives in fedmerge.config
    args = _args("mlp-hidden=32,16", "num-rounds=5")
    cfg, read = command_config(args)
    assert cfg.hidden_sizes == (32, 16)
    with caplog.at_level(logging.WARNING, logger="fedmerge"):
        assert warn_unused("merge-experiment", args, read) == ["num-rounds"]
    assert "mlp-hidden" not in caplog.text


def test_the_partitions_command_names_a_key_it_ignores(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fedmerge"):
        code = main(
            [
                "partitions",
                "dataset=digits",
                "num-clients=4",
                "lr=0.3",
                "--out",
                str(tmp_path / "p.png"),
            ]
        )
    assert code == 0
    assert "partitions does not use lr=0.3" in caplog.text
    assert "num-clients" not in caplog.text and "dataset=" not in caplog.text
