"""``fedmerge bench``: spec expansion and validation, presets, resume, crash safety, report."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from fedmerge.strategies.registry import STRATEGIES
from test_resume import _sigint_at_default

from fedmerge.bench import grid
from fedmerge.bench.grid_spec import Cell, load_spec, parse_spec, preset_names
from fedmerge.config import RunConfig
from fedmerge.errors import FedmergeError

ROOT = Path(__file__).resolve().parents[1]

# 2 strategies x 2 partitions x 2 seeds of 2 rounds: 8 cells of about a second each.
TINY = """
seeds = [0, 1]
target-accuracy = 0.5
strategies = ["fedavg", "fedprox"]
[base]
dataset = "digits"
num-clients = 3
num-rounds = 2
model = "mlp"
mlp-hidden = "16"
save-model = false
[partitions.iid]
partition = "iid"
[partitions.c2]
partition = "label-quantity"
partition-k = 2
[strategy-keys.fedprox]
proximal-mu = 0.1
"""
#: summary keys that measure time: they differ between two runs of the same cells
TIMES = ("seconds-per-round", "eval-seconds-per-round", "cell-seconds")


def _numbers(summary: dict) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMES} for row in summary["rows"]]


def _spec_file(tmp_path: Path, text: str = TINY) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


# -- spec ------------------------------------------------------------------------------------------
def test_spec_expands_every_axis():
    spec = parse_spec(
        """
        seeds = [3, 4]
        datasets = ["digits"]
        strategies = ["fedavg", "fedprox", "fedwsa"]
        [base]
        num-rounds = 1
        [partitions.iid]
        partition = "iid"
        [strategy-keys.fedprox]
        proximal-mu = 0.5
        [variants."wsa-l1"]
        strategy = "fedwsa"
        wsa-lambda = 1.0
        [grid]
        local-epochs = [1, 2]
        lr = [0.1, 0.01]
        """
    )
    variants = ["fedavg", "fedprox", "fedwsa", "wsa-l1"]  # `strategies`, then the spec's own
    assert list(spec.variants) == variants
    assert list(spec.combos) == [
        "local-epochs=1,lr=0.1",
        "local-epochs=1,lr=0.01",
        "local-epochs=2,lr=0.1",
        "local-epochs=2,lr=0.01",
    ]
    cells = spec.cells()
    assert len(cells) == 1 * 1 * len(variants) * 4 * 2
    assert len(set(cells)) == len(cells) and len({c.path for c in cells}) == len(cells)
    cell = Cell("digits", "iid", "fedprox", "local-epochs=2,lr=0.01", 4)
    assert cell in cells
    assert cell.path == Path("digits/iid/fedprox/local-epochs=2,lr=0.01/s4")
    cfg = spec.config(cell, Path("/r"))
    assert (cfg.strategy, cfg.proximal_mu, cfg.local_epochs, cfg.lr) == ("fedprox", 0.5, 2, 0.01)
    assert (cfg.seed, cfg.num_rounds, cfg.dataset) == (4, 1, "digits")
    assert Path(cfg.output_dir) / cfg.run_name == Path("/r") / cell.path
    other = spec.config(Cell("digits", "iid", "fedavg", "local-epochs=1,lr=0.1", 3), Path("/r"))
    assert (other.strategy, other.proximal_mu) == ("fedavg", 0.01)  # the default key


@pytest.mark.parametrize(
    "name", ["wsa-fashion", "fedmatch-fashion", "niid-bench-fidelity", "niid-bench-fidelity-unit"]
)
def test_the_benchmark_tables_specs_are_bench_specs_in_the_sweep_layout(name):
    """docs/benchmarks.md's tables were made from these specs into folders
    partition/variant/s<seed> (no dataset or grid level); the bench runs them into the same
    folders, so it resumes and reports on them."""
    spec = load_spec(ROOT / f"fedmerge/bench/specs/{name}.toml")
    assert not spec.datasets and list(spec.combos) == [""]
    for cell in spec.cells():
        assert cell.path == Path(cell.partition, cell.variant, f"s{cell.seed}")
    if name == "wsa-fashion":
        assert spec.cells()[0].path == Path("c2/fedavg/s0")
        assert len(spec.cells()) == 2 * 11 * 3


def test_every_table_spec_has_its_fedmerge_bench_command_in_the_docs():
    """Every published grid table names the command that reruns it: `fedmerge bench`, never
    the removed sweep runner."""
    text = (ROOT / "docs/benchmarks.md").read_text()
    for spec in sorted((ROOT / "fedmerge/bench/specs").glob("*.toml")):
        assert f"fedmerge bench fedmerge/bench/specs/{spec.name} --out " in text, spec.name
    assert not re.search(r"python -m fedmerge\.bench\.sweep \S", text)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (('strategies = ["fedavg", "fedprox"]', 'strategies = ["fedx"]'), "[strategies]"),
        (("proximal-mu = 0.1", "proximal-mu = -1.0"), "[strategy-keys.fedprox]"),
        (("[strategy-keys.fedprox]", "[strategy-keys.fedavgm]"), "[strategy-keys.fedavgm]"),
        (("num-rounds = 2", "num-rounds = 0"), "[base]: config key 'num-rounds'"),
        (("partition-k = 2", "partition-k = 0"), "[partitions.c2]: config key 'partition-k'"),
        (('partition = "iid"', 'partition = "iid"\nseed = 3'), "set by the bench"),
        (("seeds = [0, 1]", "seeds = [0, 0]"), "[seeds]"),
        (("seeds = [0, 1]", "seed = [0, 1]"), "did you mean seeds"),
        (("target-accuracy = 0.5", "target-accuracy = 50"), "[target-accuracy]"),
        (("target-accuracy = 0.5", "last-rounds = 0"), "[last-rounds]"),
        (("target-accuracy = 0.5", 'last-rounds = "5"'), "[last-rounds]"),
        (("target-accuracy = 0.5", "report-rounds = [0]"), "[report-rounds]"),
        (("target-accuracy = 0.5", "report-rounds = 1"), "[report-rounds]"),
        (("[partitions.c2]", "[partitions.'c 2']"), "folder name"),
        (("[strategy-keys.fedprox]", "[grid]\nlr = 0.1\n[strategy-keys.fedprox]"), "[grid]"),
        (("[strategy-keys.fedprox]", "[grid]\nnum-clients = [3, 4]\n[x]"), "top-level key"),
    ],
)
def test_spec_errors_name_the_file_the_table_and_the_key(change, expected):
    with pytest.raises(FedmergeError) as info:
        parse_spec(TINY.replace(*change), "tiny.toml")
    message = str(info.value)
    assert message.startswith("tiny.toml") and expected in message, message


def test_unknown_strategy_lists_the_valid_ones(tmp_path, capsys):
    bad = _spec_file(tmp_path, TINY + '[variants.mine]\nstrategy = "fedx"\n')
    assert grid.main([str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{bad} [variants.mine]: config key 'strategy': got 'fedx'" in err
    assert all(name in err for name in STRATEGIES)


def test_all_strategies_skip_keys_of_strategies_not_registered(caplog):
    text = TINY.replace('strategies = ["fedavg", "fedprox"]', 'strategies = "all"')
    text = text.replace(
        "[strategy-keys.fedprox]", "[strategy-keys.fedfuture]\nlr = 0.1\n[strategy-keys.fedprox]"
    )
    text = text.replace("save-model = false", "save-model = false\nproxy-size = 50")
    with caplog.at_level("WARNING"):
        spec = parse_spec(text, "tiny.toml")
    assert list(spec.variants) == list(STRATEGIES)
    assert "[strategy-keys.fedfuture] skipped" in caplog.text
    with pytest.raises(FedmergeError, match=r"\[strategy-keys.fedfuture\]: 'fedfuture' is not in"):
        parse_spec(text.replace('strategies = "all"', 'strategies = ["fedavg", "fedprox"]'))


def test_a_default_that_does_not_suit_a_cell_names_the_cell_and_where_to_set_it():
    text = TINY.replace('strategies = ["fedavg", "fedprox"]', 'strategies = ["fedavg", "fedmatch"]')
    text = text.replace(
        "[strategy-keys.fedprox]\nproximal-mu = 0.1",
        '[strategy-keys.fedmatch]\nmatch-method = "activation"',
    )
    with pytest.raises(FedmergeError) as info:
        parse_spec(text, "tiny.toml")
    message = str(info.value)
    assert message.startswith("tiny.toml cell iid/fedmatch/s0: config key 'proxy-size'")
    assert "[strategy-keys.fedmatch]" in message


def test_a_key_of_two_axes_is_refused():
    text = TINY + '[variants.slow]\nstrategy = "fedavg"\npartition-k = 3\n'
    with pytest.raises(FedmergeError, match=r"'partition-k' is set by both \[partitions\]"):
        parse_spec(text)


# -- presets ---------------------------------------------------------------------------------------
NIID_PARTITIONS = {
    "iid": {"partition": "iid"},
    "dir05": {"partition": "dirichlet", "partition-beta": 0.5},
    "c1": {"partition": "label-quantity", "partition-k": 1},
    "c2": {"partition": "label-quantity", "partition-k": 2},
    "c3": {"partition": "label-quantity", "partition-k": 3},
}


def test_presets_hold_niid_bench_settings():
    assert {"niid-bench", "quick"} <= set(preset_names())
    niid, quick = load_spec("niid-bench"), load_spec("quick")
    assert niid.partitions == NIID_PARTITIONS
    assert set(niid.datasets) == {"fashion-mnist", "mnist"}
    # quick: Fashion-MNIST where FedAvg learns (IID and Dir(0.5), the partitions its accuracy
    # targets are stated for); the skewed ones are the regimes-* presets'.
    assert {k: quick.partitions[k] for k in quick.partitions} == {
        k: NIID_PARTITIONS[k] for k in ("iid", "dir05")
    }
    assert set(quick.datasets) == {"fashion-mnist"}
    for spec in (niid, quick):
        # Every strategy there is: a new strategy whose defaults do not run alone (it needs
        # e.g. a proxy slice) fails load_spec above until the presets give it its keys.
        assert list(spec.variants) == list(STRATEGIES)
        assert len(spec.seeds) == 3
        assert "data-root" not in spec.base  # machine-specific: --data-root / env
    cfg = niid.config(niid.cells()[0], Path("."))
    settings = (cfg.model, cfg.num_clients, cfg.num_rounds, cfg.local_epochs, cfg.batch_size)
    assert settings == ("cnn", 10, 50, 10, 64)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.fraction_train) == (0.01, 0.9, 1e-5, 1.0)
    assert (cfg.max_train_samples, cfg.proxy_size) == (0, 0)  # the whole training split
    quick_cfg = quick.config(quick.cells()[0], Path("."))
    assert quick_cfg.num_rounds < cfg.num_rounds and quick_cfg.local_epochs < cfg.local_epochs
    assert (quick_cfg.model, quick_cfg.momentum, quick_cfg.weight_decay) == ("cnn", 0.9, 1e-5)
    assert (quick_cfg.lr, quick_cfg.batch_size) == (0.02, 32)  # tuned: see the preset's comment


def test_the_fidelity_spec_runs_the_niid_bench_presets_fedavg_cells():
    """docs/benchmarks.md's fidelity table comes from specs/niid-bench-fidelity.toml: its cells
    must be exactly the niid-bench preset's Fashion-MNIST FedAvg cells (same run-config)."""
    fidelity = load_spec(ROOT / "fedmerge/bench/specs/niid-bench-fidelity.toml")
    niid = load_spec("niid-bench")
    assert fidelity.seeds == niid.seeds
    for cell in fidelity.cells():
        twin = Cell("fashion-mnist", cell.partition, "fedavg", "", cell.seed)
        ours = fidelity.config(cell, Path(".")).to_mapping()
        theirs = niid.config(twin, Path(".")).to_mapping()
        # Paths are per machine; the fidelity spec pins device=cpu (deterministic figures).
        for key in ("output-dir", "run-name", "data-root", "device"):
            ours.pop(key), theirs.pop(key)
        assert ours == theirs, cell.label


def test_the_unit_scaling_control_differs_from_the_fidelity_run_only_in_scaling():
    fidelity = load_spec(ROOT / "fedmerge/bench/specs/niid-bench-fidelity.toml")
    unit = load_spec(ROOT / "fedmerge/bench/specs/niid-bench-fidelity-unit.toml")
    (cell,) = unit.cells()
    twin = Cell("", cell.partition, "fedavg", "", cell.seed)
    ours = unit.config(cell, Path(".")).to_mapping()
    theirs = fidelity.config(twin, Path(".")).to_mapping()
    differing = {k for k in ours if ours[k] != theirs[k]} - {"output-dir", "run-name"}
    assert differing == {"input-scaling"} and ours["input-scaling"] == "unit"


def test_presets_ship_in_the_wheel():
    """Presets are read with importlib.resources: setuptools must package them."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"].get("package-data", {})
    assert "presets/*.toml" in data.get("fedmerge.bench", []), (
        "pyproject.toml needs [tool.setuptools.package-data] "
        '"fedmerge.bench" = ["presets/*.toml", "specs/*.toml"]'
    )


def test_data_root_override(tmp_path, monkeypatch, capsys):
    spec = load_spec("quick", {"data-root": str(tmp_path)})
    assert {spec.config(c, tmp_path).data_root for c in spec.cells()} == {str(tmp_path)}
    # The environment variable reaches every cell; a missing folder stops before any cell.
    monkeypatch.setenv(grid.DATA_ROOT_ENV, str(tmp_path / "nowhere"))
    assert grid.main(["quick", "--out", str(tmp_path / "o"), "--jobs", "1"]) == 2
    err = capsys.readouterr().err
    # (the tuning trials run first: the first one named is a trial's cell)
    assert "nowhere" in err and "preset quick, cell fashion-mnist/iid/" in err
    assert not list((tmp_path / "o").glob("*/*/*/s0"))


# -- the results folder ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path, dict]:
    """The tiny grid run once, without interruption (in this process)."""
    tmp = tmp_path_factory.mktemp("bench")
    spec_file, out = _spec_file(tmp), tmp / "out"
    assert grid.main([str(spec_file), "--out", str(out), "--jobs", "1", "--threads", "1"]) == 0
    return spec_file, out, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_bench_writes_cells_table_and_plots(finished):
    spec_file, out, summary = finished
    assert summary["cells"] == summary["finished"] == 8 and summary["missing"] == []
    rows = {(r["partition"], r["variant"]): r for r in summary["rows"]}
    assert set(rows) == {(p, v) for p in ("iid", "c2") for v in ("fedavg", "fedprox")}
    for (partition, variant), row in rows.items():
        runs = [json.loads((out / partition / variant / f"s{s}" / "metrics.json").read_text())
                for s in (0, 1)]  # fmt: skip
        finals = [r[-1]["test-accuracy"] for r in runs]
        assert row["final-accuracy"][0] == pytest.approx(sum(finals) / 2)
        assert row["best-accuracy"][0] >= row["final-accuracy"][0]
        assert len(row["accuracy-curve"]) == 3 and row["seeds"] == 2
        first = [next((x["round"] for x in r if x["test-accuracy"] >= 0.5), None) for r in runs]
        assert row["reached-target"] == sum(f is not None for f in first)
        assert row["seconds-per-round"][0] > 0
    assert rows[("iid", "fedprox")]["keys"] == {"strategy": "fedprox", "proximal-mu": 0.1}
    for partition in ("iid", "c2"):  # paired by seed against fedavg
        final = {
            (v, s): json.loads((out / partition / v / f"s{s}" / "metrics.json").read_text())[-1][
                "test-accuracy"
            ]
            for v in ("fedavg", "fedprox")
            for s in (0, 1)
        }
        diffs = [final[("fedprox", s)] - final[("fedavg", s)] for s in (0, 1)]
        row = rows[(partition, "fedprox")]
        assert row["reference"] == "fedavg" and row["paired-seeds"] == 2
        assert row["final-minus-reference"][0] == pytest.approx(sum(diffs) / 2)
        assert row["final-minus-reference"][1] == pytest.approx(abs(diffs[0] - diffs[1]) / 2**0.5)
        assert row["ahead-of-reference"] == sum(d > 0 for d in diffs)
        assert rows[(partition, "fedavg")]["paired-seeds"] == 0  # not compared with itself
    cell = out / "c2" / "fedprox" / "s1"
    config = json.loads((cell / "config.json").read_text())["config"]
    assert (config["run-name"], config["proximal-mu"], config["seed"]) == ("s1", 0.1, 1)
    counts = json.loads((cell / "partition.json").read_text())["counts"]
    assert len(counts) == 3 and all(sum(c > 0 for c in row) <= 2 for row in counts)
    assert not list(out.rglob("*.partial")) and not (out / grid.LOCK_FILE).exists()
    report = (out / "report.md").read_text()
    assert "Cells: 8 of 8 finished." in report and "rounds to 50%" in report
    assert "minus fedavg's on the same seed" in report
    paired = (
        r"\| fedprox \| -?\d+\.\d+ ± \d+\.\d+ \([0-2]/2\) \| -?\d+\.\d+ ± \d+\.\d+ \([0-2]/2\) \|"
    )
    assert re.search(paired, report), report
    for name in ("accuracy-digits.png", "partitions-digits.png", "results.csv", "spec.toml"):
        assert (out / name).stat().st_size > 0
    assert (out / "spec.toml").read_text() == spec_file.read_text()


@pytest.mark.slow
def test_resume_runs_only_what_is_missing(finished, tmp_path, capsys):
    spec_file, done, summary = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    kept = out / "iid" / "fedavg" / "s0" / "done.json"
    before = kept.read_text()
    shutil.rmtree(out / "c2" / "fedprox" / "s0")  # lost
    cut = out / "iid" / "fedprox" / "s1" / "metrics.json"  # cut off (a sweep-made folder)
    cut.write_text(json.dumps(json.loads(cut.read_text())[:2]))
    stale = out / "c2" / "fedprox" / ".s0.partial"  # a bench killed mid-cell
    stale.mkdir()
    (stale / "metrics.json").write_text("[]")
    (out / grid.LOCK_FILE).write_text("999999999")  # ... which left its lock behind

    assert grid.main([str(spec_file), "--out", str(out), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "8 cells (2 partitions x 2 variants x 2 seeds); 6 done, 2 to run" in listing
    assert "estimated time" in listing

    assert grid.main([str(spec_file), "--out", str(out), "--jobs", "1", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "6 of 8 cells done; running 2" in printed
    assert "c2/fedprox/s0" in printed and "iid/fedprox/s1" in printed
    assert kept.read_text() == before  # finished cells are not run again
    assert not stale.exists()
    again = json.loads((out / "summary.json").read_text())
    assert _numbers(again) == _numbers(summary)  # deterministic: the same table


@pytest.mark.slow
def test_report_counts_missing_cells_and_changed_specs_are_refused(finished, tmp_path, capsys):
    _, done, _ = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    shutil.rmtree(out / "c2" / "fedavg" / "s1")
    assert grid.main(["--report", "--out", str(out)]) == 0  # the spec copied into the folder
    report = (out / "report.md").read_text()
    assert "Cells: 7 of 8 finished; **1 missing**" in report and "`c2/fedavg/s1`" in report
    rows = json.loads((out / "summary.json").read_text())["rows"]
    row = next(r for r in rows if (r["partition"], r["variant"]) == ("c2", "fedavg"))
    metrics = json.loads((out / "c2" / "fedavg" / "s0" / "metrics.json").read_text())
    assert row["seeds"] == 1 and row["final-accuracy"] == [metrics[-1]["test-accuracy"], 0.0]

    assert grid.main(["--report", "--out", str(out), "--target-accuracy", "0.99"]) == 0
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert {r["target-accuracy"] for r in rows} == {0.99}

    changed = _spec_file(tmp_path, TINY.replace("proximal-mu = 0.1", "proximal-mu = 0.2"))
    capsys.readouterr()
    assert grid.main([str(changed), "--out", str(out), "--jobs", "1"]) == 2
    assert "proximal-mu=0.1" in capsys.readouterr().err
    assert not (out / "c2" / "fedavg" / "s1").exists()  # refused before running anything


@pytest.mark.slow
def test_a_failing_cell_does_not_stop_the_grid(finished, tmp_path, monkeypatch, capsys):
    spec_file, done, _ = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    for cell in ("iid/fedavg/s1", "c2/fedprox/s0"):
        shutil.rmtree(out / cell)
    real = grid.run_cell

    def flaky(folder: str, cfg_map: dict, threads: int, label: str = "") -> float:
        if folder.endswith("iid/fedavg/s1"):
            raise RuntimeError("boom")
        return real(folder, cfg_map, threads, label)

    monkeypatch.setattr(grid, "run_cell", flaky)
    assert grid.main([str(spec_file), "--out", str(out), "--jobs", "1", "--threads", "1"]) == 1
    captured = capsys.readouterr()
    assert "iid/fedavg/s1: FAILED: RuntimeError: boom" in captured.out
    assert (out / "c2" / "fedprox" / "s0" / "done.json").exists()  # the next cell ran
    assert "1 missing" in (out / "report.md").read_text()


def test_lock_refuses_a_second_bench(tmp_path):
    (tmp_path / grid.LOCK_FILE).write_text(str(os.getppid()))  # a live process
    with pytest.raises(FedmergeError, match="another fedmerge bench"), grid.exclusive(tmp_path):
        pass
    (tmp_path / grid.LOCK_FILE).write_text("999999999")  # stale
    with grid.exclusive(tmp_path):
        assert (tmp_path / grid.LOCK_FILE).read_text() == str(os.getpid())
    assert not (tmp_path / grid.LOCK_FILE).exists()


def test_add_parser_wires_the_bench_subcommand():
    parser = argparse.ArgumentParser(prog="fedmerge")
    grid.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "quick", "--jobs", "2", "--dry-run"])
    assert (args.func, args.spec, args.jobs, args.dry_run) == (grid.cmd, "quick", 2, True)


def test_the_subcommand_imports_no_torch():
    """`fedmerge`'s parser imports the module for every command: it must stay light."""
    code = "import sys, fedmerge.bench.grid; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    spec_file = _spec_file(tmp_path)
    assert grid.main([str(spec_file), "--jobs", "0"]) == 2
    assert grid.main([str(spec_file), "--target-accuracy", "80"]) == 2
    assert grid.main(["no-such-preset"]) == 2
    assert grid.main(["--report"]) == 2
    assert grid.main([str(spec_file), "--report", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "--jobs" in err and "--target-accuracy" in err and "niid-bench, quick" in err
    assert "not a results folder" in err


# -- acceptance: SIGKILL mid-cell, then resume -----------------------------------------------------
def _bench(spec_file: Path, out: Path, jobs: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fedmerge.bench.grid", str(spec_file), "--out", str(out)]
    cmd += ["--jobs", str(jobs), "--threads", "1"]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, preexec_fn=_sigint_at_default
    )


def _partials(out: Path) -> list[Path]:
    return list(out.glob("*/*/.s*.partial"))


def _finished(out: Path) -> list[Path]:
    return [p.parent for p in out.glob("*/*/s*/done.json")]


def _wait(condition, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the bench ended before it could be interrupted"
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def _snapshot(out: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_sigkill_mid_cell_then_resume_gives_the_same_table(finished, tmp_path):
    """Killed with SIGKILL while 2 worker processes run cells, resumed in this process: the
    table equals the uninterrupted run's (which ran in this process, one cell at a time)."""
    spec_file, _, uninterrupted = finished
    out = tmp_path / "out"
    proc = _bench(spec_file, out, jobs=2)

    def mid_cell() -> bool:
        # A cell is in place and another has evaluated round 0 but is not done.
        partials = [p for p in _partials(out) if (p / "metrics.json").exists()]
        return bool(_finished(out)) and any(not (p / "done.json").exists() for p in partials)

    _wait(mid_cell, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1.5)  # orphaned workers notice their parent is gone within 0.5 s
    assert _partials(out), "killed too late: no cell was in progress"
    before = _snapshot(out)
    time.sleep(1.0)
    assert _snapshot(out) == before, "a worker outlived the bench"
    finished_before = {p: (p / "done.json").read_text() for p in _finished(out)}
    assert 0 < len(finished_before) < 8

    assert grid.main([str(spec_file), "--out", str(out), "--jobs", "1", "--threads", "1"]) == 0
    assert not _partials(out)
    for folder, text in finished_before.items():
        assert (folder / "done.json").read_text() == text  # not run again
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["finished"] == 8
    assert _numbers(resumed) == _numbers(uninterrupted)


@pytest.mark.slow
def test_sigint_to_the_bench_alone_stops_the_cells_in_progress(tmp_path):
    """A SIGINT sent to the bench process only (a scheduler, ``kill -INT``, ``timeout -s
    INT``; a terminal's Ctrl-C reaches the workers too): the bench stops its cells in
    progress instead of waiting minutes for them, keeps what finished, and exits 130."""
    from test_resume import _processes_with

    spec_file, out = tmp_path / "long.toml", tmp_path / "out"
    spec_file.write_text(TINY.replace("num-rounds = 2", "num-rounds = 5000"))
    proc = _bench(spec_file, out, jobs=2)
    try:
        _wait(lambda: any((p / "metrics.json").exists() for p in _partials(out)), proc)
        assert len(_processes_with(str(spec_file))) >= 1
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(20) == 130  # without stopping them: when the 5000-round cells end
        time.sleep(1.0)  # a worker whose bench is gone exits within 0.5 s
        before = _snapshot(out)
        time.sleep(1.0)
        assert _snapshot(out) == before, "a cell went on after the bench stopped"
    finally:
        if proc.poll() is None:
            proc.kill()


# -- round cost ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_round_cost_sweeps_on_digits(tmp_path, capsys):
    from fedmerge.strategies import server_app

    from fedmerge import training
    from fedmerge.bench import round_cost

    png, out = tmp_path / "scaling.png", tmp_path / "scaling.json"
    args = ["--dataset", "digits", "--clients", "2,4", "--models", "mlp,cnn", "--model", "mlp"]
    args += ["--strategies", "fedavg,fedprox", "--strategy-clients", "3", "--per-client", "8"]
    assert round_cost.main([*args, "--rounds", "2", "--png", str(png), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [(r["model"], r["clients"]) for r in data["clients"]] == [("mlp", 2), ("mlp", 4)]
    assert [(r["model"], r["clients"]) for r in data["models"]] == [("mlp", 2), ("cnn", 2)]
    assert [(r["strategy"], r["clients"]) for r in data["strategies"]] == [
        ("fedavg", 3),
        ("fedprox", 3),
    ]
    for row in data["clients"] + data["models"] + data["strategies"]:
        assert row["seconds_per_round"] > 0 and row["train_seconds"] > 0
        assert row["train_seconds"] + row["other_seconds"] == pytest.approx(
            row["seconds_per_round"]
        )
        assert row["ms_per_client"] == pytest.approx(1000 * row["other_seconds"] / row["clients"])
    assert data["models"][0] == data["clients"][0]  # a shared point is measured once
    assert png.stat().st_size > 0
    assert server_app.evaluate is training.evaluate  # the evaluation stub is removed
    printed = capsys.readouterr().out
    assert "== clients (mlp, fedavg) ==" in printed and "ms/client" in printed
    assert round_cost.main(["--strategies", "fedx"]) == 2
    assert "fedx" in capsys.readouterr().err


def test_a_long_cell_prints_its_rounds_and_jobs_share_the_cpus(capsys, monkeypatch):
    progress = grid._CellProgress("fedavg/digits/iid/s0", num_rounds=3, every=0.0)
    for r in range(4):
        progress({"round": r, "test-accuracy": 0.5})
    lines = capsys.readouterr().out.splitlines()
    # Rounds 0..2 as they finish; the last round is the cell's own "finished" line.
    assert lines == [
        f"  ... fedavg/digits/iid/s0: round {r}/3, test-accuracy 0.5000" for r in range(3)
    ]
    quiet = grid._CellProgress("x", num_rounds=3, every=3600.0)
    quiet({"round": 1, "test-accuracy": 0.5})
    assert capsys.readouterr().out == ""  # within the interval: nothing

    monkeypatch.setattr(grid, "available_cpus", lambda: 8)
    cfg = RunConfig()
    assert grid.cell_workers(cfg, jobs=2).workers == 4
    assert grid.cell_workers(cfg, jobs=8).workers == 1
    assert grid.cell_workers(cfg, jobs=16).workers == 1
    assert grid.cell_workers(cfg.replace(workers=3), jobs=2).workers == 3  # the spec's own


# -- published results and plots in words ---------------------------------------------------------
PUBLISHED = """
[published]
source = "A. Author (2022), Table 3, FedAvg"
metric = "best-accuracy"
[published.digits]
c2 = { mean = 0.5, std = 0.05 }
"""


@pytest.mark.parametrize(
    ("change", "where", "expected"),
    [
        (('metric = "best-accuracy"', 'metric = "best"'), "[published]", "key 'metric'"),
        (('source = "A. Author (2022), Table 3, FedAvg"', ""), "[published]", "key 'source'"),
        (("mean = 0.5", "mean = 50"), "[published.digits]", "key 'c2': mean 50"),
        (("std = 0.05", "std = -0.05"), "[published.digits]", "key 'c2': std -0.05"),
        (("std = 0.05", "sd = 0.05"), "[published.digits]", "key 'c2'"),
        (("c2 = {", "dir05 = {"), "[published.digits]", "'dir05' is not a partition"),
        (("[published.digits]", "[published.mnist]"), "[published.mnist]", "not a dataset"),
        (("[published.digits]\nc2 = { mean = 0.5, std = 0.05 }", ""), "[published]", "no results"),
    ],
)
def test_published_errors_name_the_table_and_the_key(change, where, expected):
    with pytest.raises(FedmergeError) as info:
        parse_spec(TINY + PUBLISHED.replace(*change), "tiny.toml")
    message = str(info.value)
    assert message.startswith(f"tiny.toml {where}:") and expected in message, message


def test_published_results_are_looked_up_by_dataset_label_or_name():
    spec = parse_spec(TINY + PUBLISHED)
    assert spec.published is not None and spec.published.metric == "best-accuracy"
    assert spec.published_for("", "digits", "c2") == (0.5, 0.05)
    assert spec.published_for("", "digits", "iid") is None
    assert parse_spec(TINY).published is None
    final = parse_spec(TINY + PUBLISHED.replace('metric = "best-accuracy"\n', ""))
    assert final.published.metric == "final-accuracy"  # the default


def test_the_niid_bench_preset_publishes_only_the_numbers_the_docs_quote():
    """Its [published] values are the Flower baseline column of docs/benchmarks.md's fidelity
    table (best round), nothing more."""
    published = load_spec("niid-bench").published
    assert published is not None and published.metric == "best-accuracy"
    assert "niid_bench" in published.source and "FedAvg" in published.source
    docs = (ROOT / "docs/benchmarks.md").read_text()
    section = docs[docs.index("## NIID-Bench fidelity check") :]
    quoted = {}
    for label, name in (("Dir(0.5)", "dir05"), ("#C=2", "c2")):
        row = next(line for line in section.splitlines() if line.startswith(f"| {label} |"))
        mean, std = re.findall(r"(\d+\.\d+) ± (\d+\.\d+)", row.split("|")[4])[0]
        quoted[name] = (float(mean) / 100, float(std) / 100)
    assert set(published.values) == {"fashion-mnist"}
    ours = published.values["fashion-mnist"]
    assert set(ours) == set(quoted)
    for name, pair in quoted.items():
        assert ours[name] == pytest.approx(pair), name


def _fake_results(spec, out: Path) -> dict:
    """Finished cells without training: seeded accuracy curves; returns them per cell."""
    rng = np.random.default_rng(0)
    curves = {}
    for cell in spec.cells():
        rounds = spec.config(cell, out).num_rounds
        acc = np.sort(rng.uniform(0.1, 0.9, rounds + 1))
        rows = [{"round": r, "test-accuracy": float(a), "test-loss": 1.0, "round-time": 0.1}
                for r, a in enumerate(acc)]  # fmt: skip
        (out / cell.path).mkdir(parents=True)
        (out / cell.path / "metrics.json").write_text(json.dumps(rows))
        curves[cell] = acc
    return curves


def test_report_names_partitions_in_words_and_draws_seed_ranges_and_published(
    tmp_path, monkeypatch
):
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba
    from matplotlib.container import ErrorbarContainer

    from fedmerge.bench.grid_report import write_report

    spec = parse_spec(TINY + PUBLISHED)
    curves = _fake_results(spec, tmp_path)
    figures: list = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep them open to read the artists
    report = write_report(spec, tmp_path).read_text()
    monkeypatch.undo()

    # Tables: the declared headline (final, the default) leads; partitions in words; the
    # published row only in the best-round table.
    assert report.index("**Headline: final-round accuracy**") < report.index("Best-round")
    final = report[report.index("Final-round accuracy (%)") : report.index("Best-round accuracy")]
    best = report[report.index("Best-round accuracy (%)") : report.index("Accuracy averaged")]
    assert "| variant | IID | #C=2 |" in final and "| variant | IID | #C=2 |" in best
    published = "| *published: A. Author (2022), Table 3, FedAvg (not run)* |"
    assert published not in final and f"{published} – | 50.00 ± 5.00 |" in best
    assert "### digits, #C=2 (partition `c2`)" in report and '{"partition"' not in report
    assert f"{published} – | – | 50.00 ± 5.00 |" in report  # detail table: best-acc column

    # Plots: titles in words; the bands are the seeds' min..max; the published line at 0.5.
    by_title = {fig.get_suptitle().splitlines()[0]: fig for fig in figures}
    assert set(by_title) == {
        "digits: test accuracy per round",
        "digits: final round test accuracy",
        "digits: best round test accuracy",
    }
    for fig in figures:
        assert all("{" not in ax.get_title() for ax in fig.axes)
    iid, c2 = by_title["digits: test accuracy per round"].axes
    assert (iid.get_title(), c2.get_title()) == ("IID", "#C=2")
    seeds = np.array([curves[Cell("", "c2", "fedprox", "", s)] for s in spec.seeds])
    (line,) = [ln for ln in c2.lines if ln.get_label() == "fedprox"]
    np.testing.assert_allclose(line.get_ydata(), seeds.mean(axis=0))
    color = to_rgba(line.get_color())
    (band,) = [c for c in c2.collections if np.allclose(c.get_facecolor()[0][:3], color[:3])]
    vertices = band.get_paths()[0].vertices
    for x in range(seeds.shape[1]):
        ys = vertices[np.isclose(vertices[:, 0], x), 1]
        assert (ys.min(), ys.max()) == pytest.approx((seeds[:, x].min(), seeds[:, x].max()))
    (ref,) = [ln for ln in c2.lines if ln.get_label().startswith("published (not run)")]
    np.testing.assert_allclose(ref.get_ydata(), [0.5, 0.5])
    assert not [ln for ln in iid.lines if ln.get_label().startswith("published")]
    # The published best round is drawn where best rounds are, not beside final rounds.
    _, best_c2 = by_title["digits: best round test accuracy"].axes
    _, final_c2 = by_title["digits: final round test accuracy"].axes
    assert [ln.get_ydata()[0] for ln in best_c2.lines if ln.get_label().startswith("pub")] == [0.5]
    assert not [ln for ln in final_c2.lines if ln.get_label().startswith("published")]
    bars = {c.get_label(): c for c in best_c2.containers if isinstance(c, ErrorbarContainer)}
    (segment,) = bars["fedprox"].lines[2][0].get_segments()
    top = seeds.max(axis=1)  # the best round of each seed
    std = top.std(ddof=1)
    np.testing.assert_allclose(segment[:, 1], [top.mean() - std, top.mean() + std])
    plt.close("all")


def test_the_regimes_presets_hold_their_regimes():
    """The regimes: (a) independently initialised clients, (b) long local training on
    Dir(0.5) with 16 clients, (c) WSA's lambda grid 0.1..10 over >= 30 rounds on #C=2 and
    Dir(0.1); each with >= 3 seeds and FedAvg as the paired reference."""
    init, local, wsa = (load_spec(f"regimes-{n}") for n in ("init", "local", "wsa"))
    for spec in (init, local, wsa):
        assert len(spec.seeds) >= 3 and "fedavg" in spec.variants
    configs = {c.variant: init.config(c, Path(".")) for c in init.cells()}
    assert configs["fedavg-shared"].client_init == "global"
    assert {v for v, c in configs.items() if c.client_init == "independent"} == set(
        init.variants
    ) - {"fedavg-shared"}
    assert {c.strategy for c in configs.values()} >= {"fedavg", "fedmatch", "fednpmerge"}
    for cell in local.cells():
        cfg = local.config(cell, Path("."))
        assert (cfg.partition, cfg.partition_beta, cfg.num_clients) == ("dirichlet", 0.5, 16)
        assert cfg.local_epochs >= 10
    for cell in wsa.cells():
        assert wsa.config(cell, Path(".")).num_rounds >= 30
    # WSA's lambda is chosen on validation from the grid 0.1..10, and the headline declared.
    assert wsa.tuning is not None and wsa.headline == "last-rounds"
    lambdas = {keys["wsa-lambda"] for keys in wsa.tuning.trials["fedwsa"].values()}
    assert min(lambdas) == 0.1 and max(lambdas) == 10.0 and len(lambdas) >= 4
    for cell, label in wsa.trial_cells():
        cfg = wsa.trial_config(cell, label, Path("."))
        assert cfg.validation_size > 0 and cfg.num_rounds >= 30
    partitions = {
        (p["partition"], p.get("partition-k"), p.get("partition-beta"))
        for p in wsa.partitions.values()
    }
    assert partitions == {("label-quantity", 2, None), ("dirichlet", None, 0.1)}


LABELLED = """
seeds = [0, 1, 2]
report-rounds = [1, 7]
[base]
dataset = "digits"
num-clients = 3
num-rounds = 2
model = "mlp"
mlp-hidden = "16"
proxy-size = 50
save-model = false
[partitions.iid]
partition = "iid"
[variants.fedavg]
strategy = "fedavg"
[variants.ft]
strategy = "fedavg-ft"
[variants.np]
strategy = "fednpmerge"
[variants.mft]
strategy = "fedmatch-ft"
[variants.dual-auto]
strategy = "fedmatch"
match-method = "dual"
match-beta = "auto"
[variants.dual-half]
strategy = "fedmatch"
match-method = "dual"
match-beta = 0.5
[variants.activation]
strategy = "fedmatch"
match-method = "activation"
"""


def test_label_using_variants_are_also_paired_with_fedavg_fine_tuned(tmp_path):
    """The issue's second comparison: variants that learn from the server's labelled slice
    (NP Merge, match-beta = auto) minus FedAvg fine-tuned on it, seed by seed; the others
    (and FedAvg-ft itself) are not compared with it."""
    from fedmerge.bench.grid_report import write_report

    spec = parse_spec(LABELLED)
    curves = _fake_results(spec, tmp_path)
    report = write_report(spec, tmp_path).read_text()
    rows = {r["variant"]: r for r in json.loads((tmp_path / "summary.json").read_text())["rows"]}
    assert {v for v, r in rows.items() if "labelled-reference" in r} == {"np", "dual-auto"}
    # ... and with FedMatch's matched average fine-tuned on it (the controls: with neither)
    assert {v for v, r in rows.items() if "matched-reference" in r} == {"np", "dual-auto"}
    for variant in ("np", "dual-auto"):
        final = {v: [curves[Cell("", "iid", v, "", s)][-1] for s in spec.seeds] for v in rows}
        diffs = [a - b for a, b in zip(final[variant], final["ft"], strict=True)]
        row = rows[variant]
        matched = [a - b for a, b in zip(final[variant], final["mft"], strict=True)]
        assert row["matched-reference"] == "mft" and row["matched-paired-seeds"] == 3
        assert row["matched-final-minus-reference"] == pytest.approx(
            [np.mean(matched), np.std(matched, ddof=1)]
        )
        assert row["labelled-reference"] == "ft" and row["labelled-paired-seeds"] == 3
        assert row["labelled-final-minus-reference"] == pytest.approx(
            [np.mean(diffs), np.std(diffs, ddof=1)]
        )
        assert row["labelled-ahead-of-reference"] == sum(d > 0 for d in diffs)
        # the same over the last rounds: the two trained rounds of this 2-round grid
        last = {v: [curves[Cell("", "iid", v, "", s)][1:].mean() for s in spec.seeds] for v in rows}
        last_diffs = [a - b for a, b in zip(last[variant], last["ft"], strict=True)]
        assert row["labelled-last-rounds-minus-reference"] == pytest.approx(
            [np.mean(last_diffs), np.std(last_diffs, ddof=1)]
        )
        assert row["last-rounds"] == 2
        first = {v: [curves[Cell("", "iid", v, "", s)][1] for s in spec.seeds] for v in rows}
        first_diffs = [a - b for a, b in zip(first[variant], first["fedavg"], strict=True)]
        assert row["round-1-accuracy"] == pytest.approx(
            [np.mean(first[variant]), np.std(first[variant], ddof=1)]
        )
        assert row["round-1-minus-reference"] == pytest.approx(
            [np.mean(first_diffs), np.std(first_diffs, ddof=1)]
        )
        assert row["round-1-ahead-of-reference"] == sum(d > 0 for d in first_diffs)
        assert row["round-7-accuracy"] is None  # a 2-round grid has no round 7
        assert row["last-rounds-accuracy"] == pytest.approx(
            [np.mean(last[variant]), np.std(last[variant], ddof=1)]
        )
    table = report[report.index("minus ft's") :]
    assert "learn from the server's labelled proxy slice" in table
    assert "Accuracy averaged over each seed's last 2 rounds minus ft's" in table
    assert "Accuracy after round 1 minus ft's" in table
    assert "Accuracy after round 1 (%):" in report
    body = [ln for ln in table.splitlines() if ln.startswith("| ") and "variant" not in ln]
    assert [ln.split(" | ")[0][2:] for ln in body[:2]] == ["np", "dual-auto"]
    assert "FedMatch's matched average fine-tuned on the same samples" in report
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert "labelled-final-minus-reference-mean" in header
    assert "matched-final-minus-reference-mean" in header
    assert "round-1-accuracy-mean" in header and "labelled-round-1-minus-reference-std" in header
