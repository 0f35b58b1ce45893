"""``python -m fedmerge.bench.old_cost``: before/after rows of the matching cost on one run."""

from __future__ import annotations

import json

from fedmerge.bench import old_cost
from fedmerge.experiments import one_shot
from fedmerge.matching import weights

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


def test_old_cost_rows_score_running_statistics_only_while_they_merge(monkeypatch):
    seen = {}

    def fake_methods(betas):
        def probe(name):
            def run(site):
                seen[name] = weights.scored("bn.running_var")
                return {}

            return run

        names = ["weight matching", "activation matching", "NP Merge (weight-aligned)"]
        names += [f"dual (MuDSC) beta={b:g}" for b in betas] + ["dual (MuDSC) beta=auto"]
        return {name: probe(name) for name in names}

    monkeypatch.setattr(one_shot, "merge_methods", fake_methods)
    rows = old_cost.old_cost_rows([0.5])
    assert sorted(rows) == [
        "dual (MuDSC) beta=0.5 (old cost)",
        "dual (MuDSC) beta=auto (old cost)",
        "weight matching (old cost)",
    ]
    for row in rows.values():
        row(None)
    assert seen == {
        "weight matching": True,
        "dual (MuDSC) beta=0.5": True,
        "dual (MuDSC) beta=auto": True,
    }
    assert not weights.scored("bn.running_var")  # restored after each row
    assert weights.scored("bn.weight")


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


def test_old_cost_run_adds_the_rows_to_the_table_and_leaves_no_extra_method(tmp_path):
    summary = run_small_bn_experiment(old_cost.main, tmp_path)
    methods = [r["method"] for r in summary]
    assert "weight matching" in methods and "weight matching (old cost)" in methods
    assert "dual (MuDSC) beta=auto (old cost)" in methods
    assert all(0 <= r["accuracy-mean"] <= 1 for r in summary)
    assert one_shot.EXTRA_METHODS == {}
    assert not weights.scored("bn.running_mean")
