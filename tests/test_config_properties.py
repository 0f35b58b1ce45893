"""Property tests over the run-config: any value either parses or fails with the key named."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedmerge.config import RunConfig, config_keys
from fedmerge.errors import ConfigError

KEYS = config_keys()
VALUES = st.one_of(
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", "0", "-1", "1e400", "nan", "inf", "true", "mnist", "cnn", "200,x"]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, min_size=1, max_size=4))
def test_any_values_parse_or_fail_naming_a_given_key(values):
    try:
        cfg = RunConfig.from_mapping(values)
    except ConfigError as exc:
        assert exc.key in values, (exc.key, values)
        assert f"config key '{exc.key}'" in str(exc) and "allowed:" in str(exc)
    else:  # whatever parses round-trips exactly
        assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


@settings(max_examples=200, deadline=None)
@given(
    st.text(min_size=1, max_size=15).filter(
        lambda k: k not in KEYS and k.replace("-", "_") not in {k2.replace("-", "_") for k2 in KEYS}
    ),
    VALUES,
)
def test_unknown_keys_are_named(key, value):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping({key: value})
    assert info.value.key == key


FLOAT_KEYS = [k for k, v in RunConfig().to_mapping().items() if isinstance(v, float)]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_numbers_are_refused(key, value):
    # nan and inf pass every range check (nan > 0 is False, inf > 0 is True): refused first
    with pytest.raises(ConfigError, match="a finite number") as info:
        RunConfig.from_mapping({key: value})
    assert info.value.key == key


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.fixed_dictionaries(
        {
            "partition": st.sampled_from(
                ["iid", "dirichlet", "label-quantity", "quantity-skew", "noise", "natural"]
            ),
            "num-clients": st.integers(1, 2000),
            "partition-beta": st.floats(1e-3, 100),
            "partition-k": st.integers(1, 12),
            "partition-min-size": st.integers(0, 300),
            "max-train-samples": st.integers(0, 3000),
            "proxy-size": st.integers(0, 2000),
            "model": st.sampled_from(["mlp", "cnn", "vgg9", "resnet20", "vit"]),
            "min-train-clients": st.integers(1, 3),
            "strategy": st.sampled_from(
                ["fedavg", "fedwsa", "fedmatch", "fednpmerge", "fedavg-ft", "fedx"]
            ),
            "match-method": st.sampled_from(["weight", "activation", "dual"]),
            "match-beta": st.floats(0, 1),
            "wsa-merge": st.sampled_from(["average", "matched"]),
        }
    ),
    st.sampled_from(["digits", "synthetic"]),
)
def test_preflight_never_raises_anything_but_a_config_error(tmp_path_factory, values, dataset):
    """Everything `fedmerge run` checks before starting ends in a FedmergeError (one clear
    line naming the key), never another exception, whatever the combination."""
    from fedmerge.errors import FedmergeError
    from fedmerge.runner import prepare

    if dataset == "synthetic":
        values = {**values, "num-clients": min(values["num-clients"], 40)}
    values = {**values, "dataset": dataset, "output-dir": str(tmp_path_factory.mktemp("o"))}
    try:
        prepare(RunConfig.from_mapping(values))
        event("prepared")
    except FedmergeError as exc:
        event(f"refused: {getattr(exc, 'key', 'dataset')}")
        assert "config key '" in str(exc) or "dataset" in str(exc)
