"""The one-shot merge experiment (``fedmerge merge-experiment``), on a user's own model."""

from __future__ import annotations

import json

import pytest
import torch

from fedmerge.cli import main
from fedmerge.errors import FedmergeError
from fedmerge.experiments.one_shot import user_model_factory

# A model as a user writes it: no permutation_spec(), functional ReLUs, for 1x8x8 digits.
USER_MODEL = """
import torch
import torch.nn.functional as F
from torch import nn


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


NOT_A_MODEL = 3
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text(USER_MODEL)
    return path


def test_user_model_factory_builds_independent_seeded_models(user_file):
    factory = user_model_factory(f"{user_file}:Small")
    a, a2, b = factory(0), factory(0), factory(1)
    assert not hasattr(a, "permutation_spec")
    assert all(torch.equal(a.state_dict()[k], a2.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.conv.weight, b.conv.weight)


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("Small", "FILE.py:Class"),
        ("missing.py:Small", "no file"),
        ("{file}:NOT_A_MODEL", "no nn.Module class NOT_A_MODEL"),
        ("{file}:Absent", "no nn.Module class Absent"),
        ("no_such_module_xyz:Small", "importing no_such_module_xyz failed"),
    ],
)
def test_user_model_references_that_cannot_work_are_refused(user_file, ref, message):
    with pytest.raises(FedmergeError, match=message):
        user_model_factory(ref.format(file=user_file))


def test_one_shot_table_on_a_user_model_without_a_spec(user_file, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    code = main(
        [
            "merge-experiment",
            "dataset=digits",
            "model=mlp",  # ignored: --model-class wins
            "num-rounds=7",  # not read by this command: named in a warning
            "--model-class",
            f"{user_file}:Small",
            "--pairs",
            "0",
            "--epochs",
            "2",
            "--betas",
            "0.5",
            "--merge-samples",
            "200",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads((out / "merge-experiment.json").read_text())
    acc = {r["method"]: r["accuracy-mean"] for r in result["summary"]}
    assert {"plain average", "weight matching", "activation matching", "logit ensemble"} <= set(acc)
    assert all(0 <= v <= 1 for v in acc.values())
    # Each end model knows half of the classes; the ensemble knows both.
    assert acc["model A"] < 0.6 and acc["model B"] < 0.6 and acc["logit ensemble"] > 0.7
    # Per-half accuracies: model A knows the first classes only, model B the others.
    rows = {r["method"]: r for r in result["rows"]}
    a, b = rows["model A"], rows["model B"]
    assert a["accuracy-first-half"] > 0.7 > 0.2 > a["accuracy-second-half"]
    assert b["accuracy-second-half"] > 0.7 > 0.2 > b["accuracy-first-half"]
    mixed = (a["accuracy-first-half"] + a["accuracy-second-half"]) / 2
    assert abs(a["accuracy"] - mixed) < 0.05  # digits' test halves are about equal in size
    assert "user_model.py:Small" in result["title"]
    assert {r["model"] for r in result["rows"]} == {"Small"}  # the user's model was trained
    captured = capsys.readouterr()
    assert "weight matching" in captured.out
    # One progress line per pair on stderr (the run is otherwise silent until its table).
    progress = [line for line in captured.err.splitlines() if line.startswith("[pair ")]
    assert len(progress) == 1 and progress[0].startswith("[pair 1/1, seed 0] ")
    assert "merges, best " in progress[0] and "min left" in progress[0]
    warned = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
    assert warned == [  # model= too: --model-class replaced it
        "merge-experiment does not use model=mlp: the key was ignored",
        "merge-experiment does not use num-rounds=7: the key was ignored",
    ]


# A model of a family the inference covers beyond plain chains: DenseNet-style concatenation
# of channels and a MobileNet-style depthwise convolution, for 1x8x8 digits.
DENSE_DEPTHWISE = """
import torch
import torch.nn.functional as F
from torch import nn


class DenseDepthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.grow = nn.Conv2d(8, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.norm = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = torch.cat([h, F.relu(self.grow(h))], dim=1)
        h = F.relu(self.norm(self.depthwise(h)))
        return self.fc(h.mean(dim=(2, 3)))
"""


def test_one_shot_table_on_a_concatenating_depthwise_model(tmp_path):
    path = tmp_path / "dense_depthwise.py"
    path.write_text(DENSE_DEPTHWISE)
    out = tmp_path / "out"
    args = ["merge-experiment", "dataset=digits", "--model-class", f"{path}:DenseDepthwise"]
    args += ["--pairs", "0", "--epochs", "2", "--betas", "0.5", "--merge-samples", "200"]
    assert main([*args, "--out", str(out)]) == 0
    result = json.loads((out / "merge-experiment.json").read_text())
    acc = {r["method"]: r["accuracy-mean"] for r in result["summary"]}
    assert {"plain average", "weight matching", "activation matching"} <= set(acc)
    # Matching moves units of the inferred spaces (concatenated and depthwise ones included):
    # aligned by activations, the merge is far above the plain average (43% against 18%).
    assert acc["activation matching"] > acc["plain average"] + 0.1
    assert acc["logit ensemble"] > acc["plain average"] + 0.1
