"""The run-config's components: each checks its own keys alone, RunConfig composes them, and
the rules between components live with the component that needs them."""

from __future__ import annotations

import dataclasses

import pytest

from fedmerge.components import (
    COMPONENTS,
    DataOptions,
    ExperimentOptions,
    ModelOptions,
    PartitionOptions,
    ResultsOptions,
    ServerOptions,
    TrainingOptions,
)
from fedmerge.config import MethodKeys, RunConfig, config_keys, field_to_key
from fedmerge.errors import ConfigError
from fedmerge.options import FedMAOptions, FineTuneOptions, MatchOptions, NPOptions, WSAOptions
from fedmerge.partitions import PARTITIONS

METHOD_OPTIONS = (WSAOptions, MatchOptions, NPOptions, FineTuneOptions, FedMAOptions)


def _keys(cls) -> list[str]:
    return [field_to_key(f.name) for f in dataclasses.fields(cls)]


def test_run_config_keys_are_the_components_keys_once_each_in_order():
    composed = [k for c in COMPONENTS[:-1] for k in _keys(c)]
    composed += _keys(MethodKeys) + _keys(COMPONENTS[-1])
    assert config_keys() == composed
    assert len(set(composed)) == len(composed)
    # the method keys are exactly the options classes' keys, with their prefixes
    assert _keys(MethodKeys) == [k for o in METHOD_OPTIONS for k in o.keys()]


def test_method_key_defaults_are_the_options_defaults():
    cfg = RunConfig()
    for options in METHOD_OPTIONS:
        assert options.from_config(cfg) == options()


@pytest.mark.parametrize(
    ("component", "changes", "key"),
    [
        (ExperimentOptions, {"num_rounds": 0}, "num-rounds"),
        (DataOptions, {"dataset": "nope"}, "dataset"),
        (DataOptions, {"proxy_size": -1}, "proxy-size"),
        (PartitionOptions, {"partition": "nope"}, "partition"),
        (PartitionOptions, {"partition_beta": 0.0}, "partition-beta"),
        (ModelOptions, {"model_norm": "nope"}, "model-norm"),
        (ModelOptions, {"mlp_hidden": "a,b"}, "mlp-hidden"),
        (TrainingOptions, {"momentum": 1.0}, "momentum"),
        (TrainingOptions, {"workers": 2, "client_threads": 2}, "client-threads"),
        (ServerOptions, {"trimmed_beta": 0.5}, "trimmed-beta"),
        (ServerOptions, {"fedopt_beta_2": 1.0}, "fedopt-beta-2"),
        (ResultsOptions, {"run_name": "a b"}, "run-name"),
    ],
)
def test_each_component_names_its_own_bad_key_alone_and_in_a_run_config(component, changes, key):
    with pytest.raises(ConfigError) as alone:
        component(**changes)
    assert alone.value.key == key
    with pytest.raises(ConfigError) as composed:
        RunConfig(**changes)
    assert composed.value.key == key


def test_a_component_reads_its_keys_out_of_a_config():
    cfg = RunConfig(dataset="mnist", lr=0.1, partition="iid", model="mlp")
    assert TrainingOptions.of(cfg).lr == 0.1
    assert PartitionOptions.of(cfg) == PartitionOptions(partition="iid")
    assert ModelOptions.of(cfg).model == "mlp"
    assert DataOptions.of(cfg).dataset == "mnist"


def test_partition_names_come_from_the_partition_registry():
    for name in PARTITIONS:
        assert PartitionOptions(partition=name).partition == name
    with pytest.raises(ConfigError) as err:
        PartitionOptions(partition="nope")
    for name in PARTITIONS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("changes", "key", "words"),
    [
        ({"min_train_clients": 5, "num_clients": 4}, "min-train-clients", "num-clients (4)"),
        ({"strategy": "fedavg-bn"}, "proxy-size", "fedavg-bn"),
        ({"strategy": "fedavg-ft"}, "proxy-size", "fedavg-ft"),
        ({"strategy": "fednpmerge"}, "proxy-size", "fednpmerge"),
        ({"strategy": "fedmatch", "match_method": "activation"}, "proxy-size", "activation"),
        (
            {"strategy": "fedwsa", "wsa_merge": "matched", "match_method": "dual"},
            "proxy-size",
            "dual",
        ),
    ],
)
def test_rules_between_components_name_the_key(changes, key, words):
    with pytest.raises(ConfigError) as err:
        RunConfig(**changes)
    assert err.value.key == key
    assert words in str(err.value)


def test_cross_rules_pass_when_satisfied():
    RunConfig(strategy="fedmatch", match_method="weight")  # data-free: no proxy needed
    RunConfig(strategy="fedavg", match_method="activation")  # match-* unused by fedavg
    RunConfig(strategy="fedmatch", match_method="activation", proxy_size=10)
    RunConfig(min_train_clients=4, num_clients=4)


def test_training_keys_at_zero_take_the_dataset_default_only_in_a_run_config():
    assert TrainingOptions().lr == 0.0  # alone: 0 means "the dataset's"
    mnist, digits = RunConfig(dataset="mnist"), RunConfig(dataset="digits")
    assert mnist.lr > 0 and digits.lr > 0
    assert (mnist.lr, mnist.batch_size) != (digits.lr, digits.batch_size)
    with pytest.raises(ConfigError) as err:
        TrainingOptions(lr=-1.0)
    assert err.value.key == "lr"
