"""A bench spec's declared headline and its ``[tune]`` table: trials on a validation split,
the choice, the cells run with it, and the report leading with the headline."""

from __future__ import annotations

import json
import statistics

import pytest

from fedmerge.bench.grid import run_bench, split_cells
from fedmerge.bench.grid_report import write_report
from fedmerge.bench.grid_spec import Cell, parse_spec
from fedmerge.bench.tuning import TUNING_FILE, choose
from fedmerge.errors import FedmergeError
from fedmerge.results import read_metrics

SPEC = """
seeds = [0, 1]
headline = "last-rounds"
last-rounds = 2
strategies = ["fedavg", "fedprox"]
[base]
dataset = "digits"
num-clients = 3
num-rounds = 2
model = "mlp"
mlp-hidden = "16"
lr = 0.05
save-model = false
[partitions.c2]
partition = "label-quantity"
partition-k = 2
[strategy-keys.fedprox]
proximal-mu = 0.1
[tune]
validation-size = 150
seeds = [0, 1]
[tune.fedprox]
proximal-mu = [0.001, 3.0]
"""


def test_tuned_variant_runs_with_the_trial_best_on_validation(tmp_path) -> None:
    spec = parse_spec(SPEC)
    assert spec.headline == "last-rounds"
    assert run_bench(spec, tmp_path, jobs=1) == []

    # Trials: one folder per value and tuning seed, scored on 150 held-out training samples.
    scores = {}
    for mu in ("0.001", "3.0"):
        values = []
        for seed in (0, 1):
            folder = tmp_path / "tune" / "c2" / "fedprox" / f"proximal-mu={mu}" / f"s{seed}"
            config = json.loads((folder / "config.json").read_text())["config"]
            assert config["validation-size"] == 150 and config["proximal-mu"] == float(mu)
            rows = read_metrics(folder)
            values.append(statistics.fmean(r["test-accuracy"] for r in rows[-2:]))
        scores[mu] = statistics.fmean(values)
    best = max(scores, key=lambda mu: scores[mu])
    assert scores["0.001"] != scores["3.0"]

    # The choice is the best mean of the headline (last 2 rounds) on validation ...
    record = json.loads((tmp_path / TUNING_FILE).read_text())
    assert [r["chosen"] for r in record] == [f"proximal-mu={best}"]
    assert record[0]["trials"][0]["mean"] == pytest.approx(scores["0.001"])
    # ... and fedprox's cells ran with it, scored on the test split.
    for seed in (0, 1):
        folder = tmp_path / "c2" / "fedprox" / f"s{seed}"
        config = json.loads((folder / "config.json").read_text())["config"]
        assert config["proximal-mu"] == float(best) and config["validation-size"] == 0
    fedavg = json.loads((tmp_path / "c2/fedavg/s0/config.json").read_text())["config"]
    assert fedavg["validation-size"] == 0

    # A second run finds everything done; the report leads with the declared headline and
    # prints the trials.
    chosen = spec.with_choices(choose(spec, tmp_path))
    assert split_cells(chosen, tmp_path)[1] == []
    report = write_report(spec, tmp_path).read_text()
    lead = report.index("**Headline: accuracy averaged over each seed's last 2 rounds**")
    assert lead < report.index("Final-round accuracy (%)")
    assert f"**proximal-mu={best}: {100 * scores[best]:.2f}**" in report
    summary = json.loads((tmp_path / "summary.json").read_text())
    (row,) = [r for r in summary["rows"] if r["variant"] == "fedprox"]
    assert row["tuned"] == {"proximal-mu": float(best)}
    assert row["keys"]["proximal-mu"] == float(best)


def test_cells_of_a_tuned_row_wait_for_its_trials(tmp_path) -> None:
    spec = parse_spec(SPEC)
    waiting = [c for c in spec.cells() if not spec.ready(c)]
    assert {c.variant for c in waiting} == {"fedprox"}
    done, todo = split_cells(spec, tmp_path)
    assert {c.variant for c in todo} == {"fedavg"} and not done
    # Trials are the tuned rows at the tuning seeds, one per value.
    assert sorted(spec.trial_cells()) == sorted(
        (Cell("", "c2", "fedprox", "", s), f"proximal-mu={mu}")
        for s in (0, 1)
        for mu in ("0.001", "3.0")
    )
    # Until every trial of the row finished, nothing is chosen.
    assert choose(spec, tmp_path, write=False) == {}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (('headline = "last-rounds"', 'headline = "mean"'), "[headline]: got 'mean'"),
        (("validation-size = 150\n", ""), "key 'validation-size'"),
        (("[tune.fedprox]", "[tune.fedprx]"), "fedprx"),
        (("proximal-mu = [0.001, 3.0]", "proximal-mu = 0.1"), "[tune.fedprox]"),
        (("proximal-mu = [0.001, 3.0]", "validation-size = [1, 2]"), "set by the bench"),
        (("proximal-mu = [0.001, 3.0]", "proximal-mu = [-1.0, 3.0]"), "proximal-mu"),
        (("seeds = [0, 1]\n[tune.", "seeds = [-1]\n[tune."), "seeds"),
    ],
)
def test_tune_and_headline_errors_name_the_table_and_the_key(change, expected) -> None:
    old, new = change
    assert old in SPEC
    with pytest.raises(FedmergeError) as err:
        parse_spec(SPEC.replace(old, new, 1))
    assert expected in str(err.value)
