"""Merge functions: plain and neuron-matched averages, BatchNorm repair (pure, no Flower)."""

from __future__ import annotations

import copy

import pytest
import torch

from fedmerge.errors import ConfigError
from fedmerge.merging import (
    MatchReport,
    average,
    matched_average,
    normalise_weights,
    repair_batchnorm,
)
from fedmerge.models import build_model, model_spec
from fedmerge.options import REFERENCES, MatchOptions
from fedmerge.permutations import apply_permutations, random_permutations


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a, b, atol=1e-6):
    return all(torch.allclose(a[k].double(), b[k].double(), atol=atol) for k in a)


def test_average_is_the_weighted_mean_and_takes_integer_buffers_from_the_reference():
    a = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 0.0]), "n": torch.tensor(7)}
    ref = {"w": torch.zeros(2), "n": torch.tensor(11)}
    out = average([a, b], [1, 3], reference=ref)
    assert torch.allclose(out["w"], torch.tensor([3.0, 1.0]))
    assert int(out["n"]) == 11 and out["n"].dtype == a["n"].dtype
    assert int(average([a, b])["n"]) == 3  # without a reference: model 0's buffer
    assert torch.equal(a["w"], torch.tensor([0.0, 4.0]))  # inputs untouched


def test_average_of_identical_models_is_the_model():
    m = _state(build_model("resnet20", (3, 8, 8), 10, seed=0))
    out = average([m, m, m], [1, 2, 3])
    assert _equal(out, m)
    assert all(out[k] is not m[k] for k in m)


@pytest.mark.parametrize("weights", [[1, -1], [0, 0], [1], [float("nan"), 1]])
def test_bad_weights_are_refused(weights):
    with pytest.raises(ValueError, match="weights"):
        normalise_weights(weights, 2)


@pytest.mark.parametrize("mode", REFERENCES)
def test_matched_average_of_permuted_copies_returns_the_model(mode):
    model = build_model("mlp", (1, 8, 8), 10, hidden=(32, 16), seed=0)
    spec, state = model_spec(model), _state(model)
    g = torch.Generator().manual_seed(1)
    copies = [apply_permutations(spec, random_permutations(spec, g), state) for _ in range(3)]
    assert not _equal(copies[0], state)
    report = MatchReport()
    reference = state if mode == "global" else None
    out = matched_average(
        [state, *copies],
        [1, 2, 3, 4],
        reference=reference,
        spec=spec,
        options=MatchOptions(reference=mode),
        report=report,
    )
    # global: the result is the reference itself; largest/barycenter: the same function in the
    # unit order of the largest client, so compare outputs.
    if mode == "global":
        assert _equal(out, state, atol=1e-5)
    x = torch.randn(16, 1, 8, 8, generator=g)
    merged = copy.deepcopy(model)
    merged.load_state_dict(out)
    assert torch.allclose(merged(x), model(x), atol=1e-5)
    assert report.matches == (12 if mode == "barycenter" else 4) and report.units_moved > 0.5
    # The plain average of the same models is far from the model: the test can fail.
    assert not _equal(average([state, *copies]), state, atol=1e-2)


def test_matching_is_linear_in_the_number_of_models_and_iterations():
    model = build_model("mlp", (1, 8, 8), 10, hidden=(16,), seed=0)
    spec = model_spec(model)
    states = [_state(build_model("mlp", (1, 8, 8), 10, hidden=(16,), seed=s)) for s in range(5)]
    report = MatchReport()
    options = MatchOptions(reference="barycenter", iterations=3)
    matched_average(states, spec=spec, options=options, report=report)
    assert report.matches == 15


def test_matched_average_does_not_mutate_and_checks_its_options():
    model = build_model("cnn", (1, 28, 28), 10, seed=0)
    spec = model_spec(model)
    a, b = _state(model), _state(build_model("cnn", (1, 28, 28), 10, seed=1))
    a0, b0 = copy.deepcopy(a), copy.deepcopy(b)
    matched_average([a, b], reference=a, spec=spec)
    assert _equal(a, a0, 0) and _equal(b, b0, 0)
    with pytest.raises(ValueError, match="global model"):
        matched_average([a, b], spec=spec, options=MatchOptions(reference="global"))
    with pytest.raises(ConfigError, match="match-beta.*select_beta"):
        auto = MatchOptions(method="dual", beta="auto")
        matched_average([a, b], reference=a, spec=spec, options=auto)


def test_aligned_average_of_independent_models_beats_the_plain_one_in_weight_space():
    # Alignment increases the inner product between the models (Git Re-Basin's objective),
    # so the aligned average keeps more of each model's norm than the plain one.
    model = build_model("mlp", (1, 8, 8), 10, hidden=(64,), seed=0)
    spec = model_spec(model)
    a, b = _state(model), _state(build_model("mlp", (1, 8, 8), 10, hidden=(64,), seed=1))
    plain = average([a, b])
    matched = matched_average([a, b], reference=a, spec=spec)
    norm = lambda s: sum(float(v.pow(2).sum()) for k, v in s.items() if "weight" in k)  # noqa: E731
    assert norm(matched) > norm(plain) * 1.05


def test_repair_batchnorm_recomputes_the_statistics_of_the_merged_network():
    model = build_model("resnet20", (3, 8, 8), 10, seed=0)
    state = _state(model)
    for k in state:
        if k.endswith("running_mean"):
            state[k] = torch.full_like(state[k], 5.0)  # stale, wrong statistics
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    repaired = repair_batchnorm(model, state, x, batch_size=64)
    # One batch: the first BatchNorm's running mean is the batch mean of conv1's output.
    expected = torch.nn.functional.conv2d(x, state["conv1.weight"], padding=1).mean((0, 2, 3))
    assert torch.allclose(repaired["norm1.running_mean"], expected, atol=1e-5)
    means = [k for k in state if k.endswith("running_mean")]
    assert all(not torch.allclose(repaired[k], state[k]) for k in means)
    assert torch.equal(repaired["conv1.weight"], state["conv1.weight"])
    assert state["norm1.running_mean"][0] == 5.0  # input untouched
    with pytest.raises(ValueError, match="proxy-size"):
        repair_batchnorm(model, state, x[:0])


def test_repair_is_a_copy_for_models_without_batchnorm():
    model = build_model("resnet20", (3, 8, 8), 10, norm="group", seed=0)
    state = _state(model)
    out = repair_batchnorm(model, state, torch.empty(0, 3, 8, 8))
    assert _equal(out, state, 0) and all(out[k] is not state[k] for k in state)


@pytest.mark.parametrize(("matcher", "repairs"), [("activation", 9), ("weight", 0)])
@pytest.mark.parametrize("way", ["one-pass", "streamed"])
def test_every_model_is_batchnorm_repaired_before_its_activations_are_read(
    monkeypatch, matcher, repairs, way
):
    # The data-based matchers read activations through BatchNorm statistics of the data they
    # read them on, as MuDSC's code does: each client, the first target, and each averaged
    # barycenter (whose averaged running statistics are no model's). In one pass, the
    # statistics are taken inside the reading pass (reset=True); streamed (a proxy past the
    # one-pass budget), each model is repaired before it is read.
    from fedmerge import merging
    from fedmerge.matching import reading

    model = build_model("resnet20", (1, 8, 8), 10, seed=0)
    states = [build_model("resnet20", (1, 8, 8), 10, seed=s).state_dict() for s in (1, 2)]
    inputs = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    calls, seen = [], []
    real_repair, real_read = merging.repair_batchnorm, reading._read

    def repairing(m, state, x):
        calls.append(x)
        seen.append(state)
        return real_repair(m, state, x)

    def reading_resets(m, state, x, sites, reset):
        if reset:
            calls.append(x)
            seen.append(state)
        return real_read(m, state, x, sites, reset)

    monkeypatch.setattr(merging, "repair_batchnorm", repairing)
    monkeypatch.setattr(reading, "_read", reading_resets)
    if way == "streamed":
        monkeypatch.setattr(reading, "ONE_PASS_BYTES", -1)
    options = MatchOptions(method=matcher, reference="barycenter")
    merging.align_models(
        states, spec=model_spec(model), options=options, model=model, inputs=inputs
    )
    # every pass reads (and resets) the 2 clients and its target: the first, then the
    # barycenters of passes 2 and 3
    assert len(calls) == repairs
    assert all(x is inputs for x in calls)
    if repairs:  # the first pass reads both clients as they are
        assert any(s is states[0] for s in seen[:3]) and any(s is states[1] for s in seen[:3])
