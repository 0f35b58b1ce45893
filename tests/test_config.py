"""The run-config boundary: defaults, parsing, and one clear error per bad value."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from fedmerge.config import (
    RunConfig,
    config_keys,
    field_to_key,
    load_toml,
    parse_cli_value,
    parse_overrides,
)
from fedmerge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def pyproject_defaults() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_equal_dataclass_defaults():
    # pyproject.toml is the single source of defaults for `flwr run`; the dataclass mirrors it.
    # Field defaults, before lr / batch-size / local-epochs = 0 take the dataset's values.
    declared = {field_to_key(f.name): f.default for f in dataclasses.fields(RunConfig)}
    assert pyproject_defaults() == declared


def test_every_key_has_a_comment_in_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.flwr.app.config]", 1)[1].split("\n[", 1)[0]
    for line in section.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert "#" in line, f"run-config key without a comment: {line}"


def test_from_mapping_coerces_cli_strings_and_typed_values():
    cfg = RunConfig.from_mapping(
        {"num-rounds": "3", "lr": "0.1", "download": "true", "dataset": "digits", "momentum": 0}
    )
    assert (cfg.num_rounds, cfg.lr, cfg.download, cfg.momentum) == (3, 0.1, True, 0.0)
    assert isinstance(cfg.momentum, float)
    assert RunConfig.from_mapping({"num-rounds": 4.0}).num_rounds == 4


def test_numbers_are_accepted_for_string_keys():
    cfg = RunConfig.from_mapping({"run-name": 2024, "mlp-hidden": "100", "model": "mlp"})
    assert cfg.run_name == "2024" and cfg.hidden_sizes == (100,)
    assert RunConfig.from_mapping({"mlp-hidden": 64}).hidden_sizes == (64,)


def test_round_trip_through_mapping():
    cfg = RunConfig(num_rounds=3, dataset="mnist", partition="iid")
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"'nm-rounds'.*did you mean num-rounds"):
        RunConfig.from_mapping({"nm-rounds": 3})


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("num-rounds", "many", "an integer"),
        ("num-rounds", 2.5, "an integer"),
        ("num-rounds", True, "an integer"),
        ("lr", "fast", "a number"),
        ("download", 1, "true or false"),
        ("dataset", True, "a string"),
    ],
)
def test_wrong_types_name_the_key(key, value, allowed):
    with pytest.raises(ConfigError, match=f"'{key}'.*{allowed}"):
        RunConfig.from_mapping({key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("seed", -1),
        ("num-rounds", 0),
        ("num-clients", 0),
        ("dataset", "imagenet"),
        ("max-train-samples", -5),
        ("proxy-size", -1),
        ("synthetic-alpha", -0.5),
        ("synthetic-beta", -1.0),
        ("partition", "pathological"),
        ("partition-beta", 0.0),
        ("partition-beta", -1.0),
        ("partition-k", 0),
        ("partition-sigma", -0.1),
        ("partition-min-size", -1),
        ("model", "gpt"),
        ("model-width", 0),
        ("model-norm", "instance"),
        ("mlp-hidden", "200,x"),
        ("mlp-hidden", "0"),
        ("local-epochs", -1),  # 0: the dataset's default
        ("batch-size", -1),
        ("lr", -0.1),
        ("momentum", 1.0),
        ("weight-decay", -1e-4),
        ("device", "tpu"),
        ("fraction-train", 0.0),
        ("fraction-train", 1.5),
        ("fraction-evaluate", -0.1),
        ("min-train-clients", 0),
        ("min-train-clients", 11),
        ("eval-batch-size", 0),
        ("proximal-mu", -1.0),
        ("server-lr", 0.0),
        ("server-momentum", 1.0),
        ("fedopt-eta", 0.0),
        ("fedopt-beta-2", 1.0),
        ("fedopt-tau", -1.0),
        ("trimmed-beta", 0.5),
        ("output-dir", ""),
        ("run-name", "a/b"),
    ],
)
def test_impossible_values_name_the_key(key, value):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping({key: value})
    assert info.value.key == key
    assert f"config key '{key}'" in str(info.value)
    assert "allowed:" in str(info.value)


def test_unknown_names_list_the_choices():
    with pytest.raises(ConfigError, match="one of: .*digits.*fashion-mnist.*mnist"):
        RunConfig.from_mapping({"dataset": "imagenet"})


@pytest.mark.parametrize(
    ("text", "value"),
    [("3", 3), ("0.5", 0.5), ("true", True), ("mnist", "mnist"), ('"a b"', "a b"), ("1e-3", 1e-3)],
)
def test_parse_cli_value(text, value):
    assert parse_cli_value(text) == value


def test_parse_overrides_rejects_items_without_equals():
    assert parse_overrides(["a=1", "b = x"]) == {"a": 1, "b": "x"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["num-rounds"])


def test_load_toml_flat_file_and_pyproject(tmp_path):
    flat = tmp_path / "exp.toml"
    flat.write_text('num-rounds = 4\ndataset = "mnist"\n')
    assert load_toml(flat) == {"num-rounds": 4, "dataset": "mnist"}
    assert load_toml(ROOT / "pyproject.toml") == pyproject_defaults()
    with pytest.raises(ConfigError, match="--config"):
        load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("num-rounds = = 3")
    with pytest.raises(ConfigError, match="valid TOML"):
        load_toml(bad)


def test_config_keys_are_flower_spelled():
    keys = config_keys()
    assert "num-rounds" in keys and all("_" not in k for k in keys)
