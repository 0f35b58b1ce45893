"""``python -m fedmerge.bench.gpu_check``: the GPU check a lent machine runs."""

from __future__ import annotations

import torch

from fedmerge.bench import gpu_check
from fedmerge.config import RunConfig
from fedmerge.config_values import parse_overrides


def test_on_a_machine_without_cuda_it_says_so_and_exits_0(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 0
    assert gpu_check.NO_GPU in capsys.readouterr().out
    assert not (tmp_path / "out").exists()  # nothing run, nothing written


def test_every_planned_run_is_a_valid_cuda_run_config(tmp_path):
    # The runs the check makes on a GPU machine: their keys must pass the config checks here,
    # or the lent minutes go to a config error.
    steps = gpu_check.plan(tmp_path, tmp_path / "no-data")
    runs = [s for s in steps if "run" in s.command]
    assert len(runs) == 3 and sum(s.limit_s for s in steps) <= 480
    for step in runs:
        cfg = RunConfig.from_mapping(parse_overrides(step.command[step.command.index("run") + 1 :]))
        assert cfg.device == "cuda" and cfg.num_rounds <= 5
    assert "digits" in steps[-1].name  # no Fashion-MNIST under that root: said so
