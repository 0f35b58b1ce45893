"""The throughput benchmark runs end to end on tiny settings (its figures, not its speed)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedmerge.bench.throughput import (
    BenchSettings,
    estimate_total_train_seconds,
    main,
    run_benchmark,
    steps_per_epoch,
)
from fedmerge.errors import FedmergeError
from fedmerge.training import batches


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_benchmark_local_on_digits(tmp_path):
    threads = torch.get_num_threads()
    settings = BenchSettings(
        dataset="digits",
        clients=3,
        rounds=1,
        engines=("local",),
        threads=1,  # robust on shared cores; restored afterwards
        output_dir=str(tmp_path),
    )
    report = run_benchmark(settings)
    assert torch.get_num_threads() == threads
    assert report["machine"]["torch_threads"] == 1

    assert set(report["results"]) == {"bare", "local"}
    assert set(report["ratios"]) == {"bare", "local"}
    # Each engine's throughput relative to the bare loop's; the verdict compares it to 0.95.
    bare_rate = report["results"]["bare"]["samples_per_s"]
    for name in ("bare", "local"):
        expected = report["results"][name]["samples_per_s"] / bare_rate
        assert report["ratios"][name] == pytest.approx(expected)
    assert report["target_ratio"] == 0.95
    assert report["local_meets_target"] is (report["ratios"]["local"] >= 0.95)
    assert len(report["shard_sizes"]) == 3
    assert report["samples_per_round"] == sum(report["shard_sizes"])
    for name in ("bare", "local"):
        res = report["results"][name]
        assert res["engine"] == name
        assert res["rounds"] == 1
        assert res["samples"] == report["samples_per_round"]
        for key in ("samples_per_s", "seconds_per_round", "train_seconds_per_round"):
            assert _positive(res[key]), (name, key, res[key])
        assert _positive(res["loop_samples_per_s"])
        assert math.isfinite(res["overhead_seconds_per_round"])
        assert len(res["repeats"]) == 1
        assert _positive(report["ratios"][name])
    assert _positive(report["results"]["bare"]["averaging_seconds_per_round"])
    assert _positive(report["results"]["local"]["estimated_train_seconds_per_round"])
    assert report["machine"]["torch"] == torch.__version__
    json.dumps(report)  # the --json report is plain JSON


def test_main_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--dataset", "digits", "--clients", "2", "--rounds", "1", "--threads", "1"]
    assert main([*args, "--output-dir", str(tmp_path / "runs"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["clients"] == 2
    assert _positive(report["ratios"]["local"])
    printed = capsys.readouterr().out
    assert "samples/s" in printed and "local" in printed


def test_unknown_engine_is_refused():
    with pytest.raises(FedmergeError, match="engines"):
        BenchSettings(engines=("local", "ray"))
    assert main(["--engines", "nope"]) == 2


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 128, 129, 200])
def test_steps_per_epoch_matches_training_batches(n):
    assert steps_per_epoch(n, 64) == len(batches(n, 64, torch.Generator().manual_seed(0)))


def test_train_seconds_estimate_is_exact_for_step_proportional_times():
    sizes, bs, epochs = [10, 130, 65, 1000], 64, 2
    per_step = 0.003
    times = [per_step * steps_per_epoch(n, bs) * epochs for n in sizes]
    weighted_mean = sum(n * t for n, t in zip(sizes, times, strict=True)) / sum(sizes)
    estimate = estimate_total_train_seconds(weighted_mean, sizes, bs, epochs)
    assert estimate == pytest.approx(sum(times))
