"""The local engine's vectorised path gives the per-client path's runs."""

from __future__ import annotations

import pytest

from fedmerge.config import RunConfig
from fedmerge.results import read_metrics
from fedmerge.runner import run


def _rows(tmp_path, name, **over):
    base = {
        "num-rounds": 2,
        "num-clients": 5,
        "partition": "dirichlet",
        "partition-beta": 0.3,  # clients of very different sizes
        "batch-size": 16,
        "output-dir": str(tmp_path),
        "run-name": name,
    }
    return read_metrics(run(RunConfig.from_mapping({**base, **over}), "local"))


@pytest.mark.parametrize(
    "over",
    [
        {"model": "cnn"},
        {"model": "mlp", "strategy": "fedprox", "proximal-mu": 0.1},
        {"model": "cnn", "strategy": "fedwsa", "wsa-lambda": 10.0},
    ],
    ids=["cnn", "mlp-fedprox", "cnn-fedwsa"],
)
# resnet20 (group/layer norm) is exact only in float64 (tests/test_vectorised.py checks it
# there): its ~1e6 pre-ReLU values per step put some within float32 rounding of the kink.
def test_vectorised_run_matches_the_per_client_run(tmp_path, over):
    plain = _rows(tmp_path, "plain", **over)
    vec = _rows(tmp_path, "vec", vectorise=True, **over)
    assert len(plain) == len(vec)
    # Round 1 exercises every semantic (seeds, ragged sizes, momentum, regularizers): the two
    # paths agree to float32 rounding. From round 2 on, the float32 differences (summation
    # order in batched kernels) are amplified by training, as any 1e-7 perturbation of the
    # weights is (a ReLU input near 0 flips sides): later rounds agree to a looser tolerance.
    for i, (a, b) in enumerate(zip(plain, vec, strict=True)):
        tight = i <= 1
        assert a["test-loss"] == pytest.approx(b["test-loss"], rel=1e-5 if tight else 2e-2)
        assert a["test-accuracy"] == pytest.approx(b["test-accuracy"], abs=1e-9 if tight else 0.03)
        if "train-loss" in a:
            assert a["train-loss"] == pytest.approx(b["train-loss"], rel=1e-5 if tight else 2e-2)
            assert a["num-examples"] == b["num-examples"] and a["num-clients"] == b["num-clients"]
            assert a["train-steps"] == pytest.approx(b["train-steps"])
            assert a["scope-sigma"] == pytest.approx(b["scope-sigma"], rel=1e-5 if tight else 1e-2)


def test_models_that_cannot_be_vectorised_fall_back_exactly(tmp_path, caplog):
    # One worker: the fallback's warning is logged in the process that trains (caplog sees
    # this one only); tests/test_workers.py covers vectorised training in workers.
    over = {"model": "vgg9", "num-rounds": 1, "num-clients": 3, "workers": 1}
    plain = _rows(tmp_path, "plain", **over)
    with caplog.at_level("WARNING"):
        vec = _rows(tmp_path, "vec", vectorise=True, **over)
    assert [r["test-accuracy"] for r in plain] == [r["test-accuracy"] for r in vec]
    assert any("dropout" in r.getMessage().lower() for r in caplog.records)
