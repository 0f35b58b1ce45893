"""``python -m fedmerge.bench.mudsc_changes``: MuDSC's matching as run before and as its code
runs it, on the same trained pairs in one run."""

from __future__ import annotations

import json

import torch

from fedmerge.bench import mudsc_changes
from fedmerge.experiments import one_shot
from fedmerge.experiments.one_shot import MergeSite
from fedmerge.merging import BETA_GRID

BN_MODEL = """
import torch
import torch.nn.functional as F
from torch import nn


class SmallBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))
"""


def run_small_bn_experiment(main, tmp_path) -> list[dict]:
    """A before/after script's ``main`` on one pair of SmallBN models (one epoch, beta 0.5):
    checks it exits 0 and returns the summary rows of its table."""
    path = tmp_path / "bn_model.py"
    path.write_text(BN_MODEL)
    out = tmp_path / "out"
    args = ["dataset=digits", "--model-class", f"{path}:SmallBN", "--pairs", "0"]
    args += ["--epochs", "1", "--betas", "0.5", "--merge-samples", "200", "--out", str(out)]
    assert main(args) == 0
    return json.loads((out / "merge-experiment.json").read_text())["summary"]


def _site(tmp_path) -> MergeSite:
    import importlib.util

    path = tmp_path / "bn_model.py"
    path.write_text(BN_MODEL)
    spec = importlib.util.spec_from_file_location("bn_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    a, b = module.SmallBN(), module.SmallBN()
    g = torch.Generator().manual_seed(0)
    for m in (a, b):  # statistics of their own (different) data
        m.train()
        with torch.no_grad():
            m(torch.randn(64, 1, 8, 8, generator=g) * (2.0 if m is b else 0.5) + 1.0)
    x, y = torch.randn(40, 1, 8, 8, generator=g), torch.arange(40) % 10
    return MergeSite(a, a.state_dict(), b.state_dict(), x, y, seed=0)


def test_the_earlier_rows_read_own_statistics_and_the_default_rows_recompute_them(tmp_path):
    site = _site(tmp_path)
    rows = mudsc_changes.earlier_rows([0.5])
    assert sorted(rows) == sorted(
        [
            "activation matching (own BN stats)",
            "dual (MuDSC) beta=0.5 (own BN stats)",
            "dual (MuDSC) beta=auto (5 betas, loss, own BN stats)",
            "dual (MuDSC) beta=auto (9 betas, loss)",
        ]
    )
    now = one_shot.merge_methods([0.5])["activation matching"](site)
    before = rows["activation matching (own BN stats)"](site)
    assert any(not torch.equal(now[k], before[k]) for k in now)  # the statistics matter
    # The default row is the recomputing one (deterministic: the same merge again).
    again = one_shot._aligned_average(site, "activation", reset_batchnorm=True)
    assert all(torch.equal(now[k], again[k]) for k in now)
    assert mudsc_changes.EARLIER_GRID != BETA_GRID


def test_the_run_adds_the_rows_to_the_table_and_leaves_no_extra_method(tmp_path):
    summary = run_small_bn_experiment(mudsc_changes.main, tmp_path)
    methods = [r["method"] for r in summary]
    assert "activation matching" in methods and "activation matching (own BN stats)" in methods
    assert "dual (MuDSC) beta=auto (5 betas, loss, own BN stats)" in methods
    assert all(0 <= r["accuracy-mean"] <= 1 for r in summary)
    assert one_shot.EXTRA_METHODS == {}
