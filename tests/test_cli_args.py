"""The command-line helpers ``fedmerge`` and ``fedmerge analyse`` share (fedmerge.cli_args):
one parser of comma-separated numbers, one reordering of ``key=value`` overrides."""

from __future__ import annotations

import argparse
import math

import pytest

from fedmerge import cli
from fedmerge.cli_args import floats, overrides_last, value_options
from fedmerge.commands import analyse as analyses
from fedmerge.errors import ConfigError, FedmergeError


def test_floats_parses_and_names_the_flag_in_both_error_forms():
    assert floats("0,1,100", "--lambdas") == [0.0, 1.0, 100.0]
    assert floats("-1", "--lambdas") == [-1.0]  # no sign check unless asked
    with pytest.raises(FedmergeError) as info:
        floats("1,x", "--lambdas")
    assert str(info.value) == "--lambdas: got '1,x'; allowed: comma-separated numbers"
    assert not isinstance(info.value, ConfigError)
    with pytest.raises(ConfigError) as info:
        floats("ten", "--factors", positive=True, example="10,100", error=ConfigError)
    assert str(info.value) == (
        "config key '--factors': got 'ten'; allowed: comma-separated numbers, e.g. 10,100"
    )
    for bad in ("0", "10,-1", "nan", "inf"):
        with pytest.raises(ConfigError, match="comma-separated numbers > 0"):
            floats(bad, "--factors", positive=True, error=ConfigError)
    assert math.isnan(floats("nan", "--lambdas")[0])


def test_every_command_uses_the_shared_helpers():
    from fedmerge.commands import experiments

    assert not hasattr(cli, "_floats") and not hasattr(cli, "_overrides_last")
    assert not hasattr(analyses, "_floats") and not hasattr(analyses, "_OVERRIDE")
    assert cli.overrides_last is overrides_last and experiments.floats is floats
    assert analyses.floats is floats and analyses.overrides_last is overrides_last
    # --factors keeps its messages: the analyses' form (config key ...), positive numbers only
    with pytest.raises(ConfigError, match=r"'--factors': got '0'; allowed: .* > 0"):
        analyses._factors("0")
    assert analyses._factors("10,100") == [10.0, 100.0]


def test_overrides_move_after_the_options_but_option_values_stay():
    parser = cli.build_parser()
    argv = ["run", "num-rounds=1", "-q", "dataset=mnist", "--config", "a=b.toml", "x=1"]
    assert overrides_last(parser, argv) == [
        "run", "-q", "--config", "a=b.toml", "num-rounds=1", "dataset=mnist", "x=1"
    ]  # fmt: skip
    argv = ["simulate", "app", "--run-config", "num-rounds=1", "--num-supernodes", "2"]
    assert overrides_last(parser, argv) == argv
    # Options of nested sub-commands (fedmerge analyse PROBE) count too.
    assert "--settings" in value_options(parser) and "-q" not in value_options(parser)
    argv = ["analyse", "soups", "m=1", "--settings", "k=v", "n=2"]
    assert overrides_last(parser, argv) == ["analyse", "soups", "--settings", "k=v", "m=1", "n=2"]


def test_fedmerge_analyse_mixes_overrides_and_options(tmp_path):
    parser = argparse.ArgumentParser(prog="fedmerge analyse")
    analyses._add_probes(parser.add_subparsers(dest="probe", required=True))
    argv = ["dataset=digits", "scaling", "--factors", "10", "model=mlp", "--out", "o=1", "-q"]
    args = parser.parse_args(overrides_last(parser, argv))
    assert (args.probe, args.factors, args.out, args.quiet) == ("scaling", "10", "o=1", True)
    assert args.overrides == ["dataset=digits", "model=mlp"]
