"""Mode connectivity (interpolation, barriers, BN repair), and specs without a dataset axis or
grid (folders partition/variant/s<seed>) under ``fedmerge bench``."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest
import torch

from fedmerge.bench import grid, wsa_overhead
from fedmerge.config import RunConfig
from fedmerge.errors import ConfigError
from fedmerge.experiments.connectivity import (
    barrier,
    connectivity_experiment,
    evaluate_path,
    interpolate,
)
from fedmerge.merging import reset_batchnorm_stats
from fedmerge.models import build_model


def test_interpolate_end_points_and_integer_buffers():
    a = build_model("resnet20", (1, 8, 8), 10, seed=0).state_dict()
    b = build_model("resnet20", (1, 8, 8), 10, seed=1).state_dict()
    b["norm1.num_batches_tracked"] = torch.tensor(7)
    at0, at1, mid = interpolate(a, b, 0.0), interpolate(a, b, 1.0), interpolate(a, b, 0.5)
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(at0[k], a[k])
            torch.testing.assert_close(at1[k], b[k])
            torch.testing.assert_close(mid[k], (a[k] + b[k]) / 2)
        else:
            assert torch.equal(mid[k], a[k])  # integer buffers come from A


def test_barrier():
    ts = [0.0, 0.5, 1.0]
    assert barrier([1.0, 3.0, 2.0], ts, higher_is_better=False) == pytest.approx(1.5)
    assert barrier([0.9, 0.5, 0.7], ts, higher_is_better=True) == pytest.approx(0.3)
    assert barrier([1.0, 1.5, 2.0], ts, higher_is_better=False) == pytest.approx(0.0)


def test_path_of_a_model_to_itself_is_flat():
    model = build_model("cnn", (1, 8, 8), 10, seed=0)
    state = model.state_dict()
    x, y = torch.randn(50, 1, 8, 8), torch.randint(0, 10, (50,))
    path = evaluate_path(model, state, state, x, y, points=5)
    assert path.loss_barrier == pytest.approx(0.0, abs=1e-6)
    assert path.accuracy_barrier == pytest.approx(0.0, abs=1e-9)
    assert len(path.ts) == 5 and path.ts[0] == 0.0 and path.ts[-1] == 1.0


def test_bn_repair_recomputes_running_stats():
    model = build_model("resnet20", (1, 8, 8), 10, seed=0)
    x = torch.randn(300, 1, 8, 8) * 3 + 1
    reset_batchnorm_stats(model, x, batch_size=100)
    # the stem's BatchNorm now holds the mean of its inputs' conv outputs over all of x
    with torch.no_grad():
        feats = model.conv1(x)
    torch.testing.assert_close(
        model.norm1.running_mean, feats.mean((0, 2, 3)), rtol=1e-4, atol=1e-5
    )
    assert not model.training


def test_connectivity_experiment_on_digits():
    cfg = RunConfig(model="mlp", mlp_hidden="32", batch_size=32)
    res = connectivity_experiment(cfg, lambdas=[0.0, 1.0], epochs=1, points=3)
    assert [r["wsa-lambda"] for r in res] == [0.0, 1.0]
    for r in res:
        assert r["accuracy-a"] > 0.5 and r["accuracy-b"] > 0.5
        assert r["accuracy"][0] == r["accuracy-a"] and r["accuracy"][-1] == r["accuracy-b"]
        assert r["t"] == [0.0, 0.5, 1.0] and r["accuracy-mid"] == r["accuracy"][1]
        # The barriers are those of the reported path: the midpoint's gap to the chord.
        (l0, lm, l1), (a0, am, a1) = r["loss"], r["accuracy"]
        assert r["loss-barrier"] == pytest.approx(max(lm - (l0 + l1) / 2, 0.0))
        assert r["accuracy-barrier"] == pytest.approx(max((a0 + a1) / 2 - am, 0.0))
        assert r["scope-gap"] > 0  # two seeds: the scopes differ
    # Both models trained toward one target scope (WSA) end with closer scopes (observed:
    # 0.015 without, 0.004 with lambda 1).
    assert res[1]["scope-gap"] < 0.5 * res[0]["scope-gap"]
    part = connectivity_experiment(cfg, lambdas=[0.0], epochs=1, points=3, split="partition")
    assert len(part) == 1


@pytest.mark.parametrize("method", ["weight", "activation", "dual"])
def test_matching_before_interpolation_removes_most_of_the_barrier(method):
    """Two digits MLPs from different seeds: the straight path has a loss barrier; after B's
    units are aligned to A's the path shares its end points (same function) and the barrier
    falls to at most a quarter (observed: 0.21 -> 0.00 / 0.005 / 0.00)."""
    cfg = RunConfig(model="mlp", mlp_hidden="64", batch_size=32)
    (r,) = connectivity_experiment(cfg, lambdas=[0.0], epochs=3, points=5, match_method=method)
    assert r["matched-accuracy"][0] == r["accuracy"][0]
    assert r["matched-accuracy"][-1] == r["accuracy"][-1]
    assert r["matched-loss"][-1] == pytest.approx(r["loss"][-1], rel=1e-5)
    assert r["loss-barrier"] > 0.1
    assert r["matched-loss-barrier"] < r["loss-barrier"] / 4
    assert r["matched-accuracy-mid"] > r["accuracy-mid"]


def test_connectivity_refuses_an_unknown_matcher():
    cfg = RunConfig(model="mlp", mlp_hidden="8")
    with pytest.raises(ConfigError, match="--match.*weight, activation, dual"):
        connectivity_experiment(cfg, lambdas=[0.0], epochs=1, match_method="sinkhorn")


TINY = """
seeds = [0, 1]
[base]
num-clients = 3
num-rounds = 1
model = "mlp"
mlp-hidden = "16"
save-model = false
[partitions.dir]
partition = "dirichlet"
[variants.fedavg]
strategy = "fedavg"
[variants."fedwsa-l1.0"]
strategy = "fedwsa"
wsa-lambda = 1.0
"""


def test_a_sweep_spec_runs_resumes_and_reports_under_fedmerge_bench(tmp_path, capsys):
    """A spec with no dataset axis and no [grid] under `fedmerge bench`: its layout
    partition/variant/s<seed>, a resume that runs only the lost and cut-off cells."""
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(TINY)
    out = tmp_path / "out"
    argv = [str(spec_file), "--out", str(out), "--jobs", "1", "--threads", "1"]
    assert grid.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = {(r["partition"], r["variant"]): r for r in summary["rows"]}
    assert set(rows) == {("dir", "fedavg"), ("dir", "fedwsa-l1.0")}
    assert rows[("dir", "fedavg")]["seeds"] == 2
    report = (out / "report.md").read_text()
    assert "| fedavg |" in report and "fedwsa-l1.0" in report
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/*/s*")) == [
        "dir/fedavg/s0", "dir/fedavg/s1", "dir/fedwsa-l1.0/s0", "dir/fedwsa-l1.0/s1"
    ]  # fmt: skip

    # Interrupted: one cell lost, one cut off mid-run in place (as the sweep left them).
    keep = out / "dir" / "fedavg" / "s0" / "metrics.json"
    before = keep.read_bytes()
    shutil.rmtree(out / "dir" / "fedavg" / "s1")
    cut = out / "dir" / "fedwsa-l1.0" / "s0" / "metrics.json"
    cut.write_text(json.dumps(json.loads(cut.read_text())[:1]))
    capsys.readouterr()
    assert grid.main(argv) == 0
    assert "2 of 4 cells done; running 2" in capsys.readouterr().out
    assert keep.read_bytes() == before
    again = {
        (r["partition"], r["variant"]): r
        for r in json.loads((out / "summary.json").read_text())["rows"]
    }
    for key in rows:  # deterministic: the cells run again give the same accuracies
        assert again[key]["final-accuracy"] == rows[key]["final-accuracy"]


def _sweep_folder(out, metrics: dict[str, list[dict]]) -> None:
    """A results folder with spec.toml and, per cell, only the run's files (metrics.json; no
    done.json or partition.json): a cell whose run finished but whose bench records are
    missing."""
    out.mkdir()
    spec = TINY.replace("num-rounds = 1", "num-rounds = 2").replace("[0, 1]", "[0, 1, 2]")
    (out / "spec.toml").write_text(spec)
    for cell, rows in metrics.items():
        (out / cell).mkdir(parents=True)
        (out / cell / "metrics.json").write_text(json.dumps(rows))


def _rows(accuracies, spreads, loss=0.5):
    """Rounds 0-2 of a run: test accuracy per round, scope spread of rounds 1-2 (None: absent)."""
    rows = []
    for r, acc in enumerate(accuracies):
        row = {"round": r, "test-accuracy": acc, "test-loss": 2.3 if r == 0 else loss}
        if r and spreads[r - 1] is not None:
            row["scope-spread"] = spreads[r - 1]
        rows.append(row)
    return rows


def test_report_rebuilds_a_sweep_folder_as_the_sweep_computed_it(tmp_path):
    """`fedmerge bench --report --out DIR` (the sweep's --report-only) on a folder of the former
    sweep runner: final and best accuracy, scope spread and diverged runs, mean and sample std
    over the seeds as the sweep computed them; a cut-off or missing cell is left out."""
    out = tmp_path / "sweep-out"
    nan = float("nan")
    _sweep_folder(
        out,
        {
            "dir/fedavg/s0": _rows([0.1, 0.6, 0.5], [0.02, 0.01]),
            "dir/fedavg/s1": _rows([0.1, 0.4, 0.7], [0.03, 0.03]),
            "dir/fedavg/s2": _rows([0.1, 0.9], [0.01]),  # cut off after round 1
            "dir/fedwsa-l1.0/s0": _rows([0.1, 0.8, 0.6], [0.01, 0.004]),
            "dir/fedwsa-l1.0/s1": _rows([0.1, 0.3, 0.1], [0.05, nan], loss=nan),  # diverged
        },
    )
    assert grid.main(["--report", "--out", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    avg, wsa = rows["fedavg"], rows["fedwsa-l1.0"]
    assert avg["final-accuracy"] == pytest.approx([0.6, statistics.stdev([0.5, 0.7])])
    assert avg["best-accuracy"] == pytest.approx([0.65, statistics.stdev([0.6, 0.7])])
    assert avg["scope-spread"] == pytest.approx([0.02, statistics.stdev([0.01, 0.03])])
    assert (avg["seeds"], avg["diverged"]) == (2, 0)
    assert wsa["final-accuracy"] == pytest.approx([0.35, statistics.stdev([0.6, 0.1])])
    assert wsa["best-accuracy"] == pytest.approx([0.55, statistics.stdev([0.8, 0.3])])
    assert wsa["scope-spread"] == pytest.approx([0.004, 0.0])  # the diverged run's NaN left out
    assert (wsa["seeds"], wsa["diverged"]) == (2, 1)
    report = (out / "report.md").read_text()
    assert "Cells: 4 of 6 finished; **2 missing**" in report
    assert "| fedwsa-l1.0 | " in report and "35.00 ± 35.36" in report


def test_a_bad_sweep_spec_stops_fedmerge_bench_before_anything_runs(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    out = tmp_path / "o"
    bad.write_text(TINY.replace('strategy = "fedavg"', 'strategy = "fedx"'))
    assert grid.main([str(bad), "--out", str(out)]) == 2
    assert "[variants.fedavg]: config key 'strategy'" in capsys.readouterr().err
    bad.write_text(TINY.replace("num-rounds = 1", "num-rounds = 0"))
    assert grid.main([str(bad), "--out", str(out)]) == 2
    assert "[base]: config key 'num-rounds'" in capsys.readouterr().err
    assert not out.exists()


def test_wsa_overhead_bench_runs(capsys):
    assert wsa_overhead.main(["--models", "mlp", "--steps", "5", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "mlp" in out and "wsa +%" in out
    assert wsa_overhead.main(["--models", "gpt"]) == 2


def test_connectivity_command_writes_matched_paths(tmp_path, capsys):
    from fedmerge.cli import main

    out = tmp_path / "conn"
    argv = ["connectivity", "model=mlp", "mlp-hidden=16", "--epochs", "1", "--lambdas", "0,1"]
    assert main([*argv, "--points", "3", "--match", "weight", "--out", str(out)]) == 0
    saved = json.loads((out / "connectivity.json").read_text())
    assert [len(r["matched-loss"]) for r in saved["results"]] == [3, 3]
    assert (out / "connectivity.png").stat().st_size > 0
    assert "after weight matching" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse lists the choices
        main([*argv, "--match", "sinkhorn", "--out", str(out)])
    assert "invalid choice: 'sinkhorn'" in capsys.readouterr().err
