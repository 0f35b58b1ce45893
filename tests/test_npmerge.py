"""NP Merge: learned per-parameter merging after alignment, its strategy, its one-shot row."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from fedmerge.strategies.npmerge import FedNPMerge
from strategy_harness import train_reply, train_requests

from fedmerge.config import RunConfig
from fedmerge.datasets import load_dataset
from fedmerge.errors import ConfigError
from fedmerge.experiments.one_shot import MergeSite, np_merge_site
from fedmerge.matching import match
from fedmerge.merging import average, repair_batchnorm
from fedmerge.models import build_model, model_spec
from fedmerge.npmerge import (
    NPOptions,
    NPReport,
    fuse,
    learn_coefficients,
    np_merge,
)
from fedmerge.npmerge.fusion import _Adam
from fedmerge.npmerge.learning import _split
from fedmerge.permutations import apply_permutations, random_permutations
from fedmerge.results import read_metrics
from fedmerge.runner import run
from fedmerge.training import SGDSettings, train

SHAPE = (1, 8, 8)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a, b, atol=1e-6):
    return all(torch.allclose(a[k].double(), b[k].double(), atol=atol) for k in a)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def pair(digits):
    """Two mlps trained from different seeds on disjoint halves of the classes, and the
    merge-site data: 300 training samples from both halves."""
    x, y = digits.x_train, digits.y_train
    states = []
    for k, mask in enumerate((y < 5, y >= 5)):
        model = build_model("mlp", SHAPE, 10, hidden=(32,), seed=k)
        train(model, x[mask], y[mask], SGDSettings(4, 32, 0.05, momentum=0.9), seed=k)
        states.append(_state(model))
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:300]
    return build_model("mlp", SHAPE, 10, hidden=(32,), seed=0), states, x[idx], y[idx]


def _aligned(model, a, b):
    spec = model_spec(model)
    return apply_permutations(spec, match(spec, a, b), b)


def _merge(model, states, x, y, weights=None, reference=None, **options):
    report = NPReport()
    out = np_merge(
        states,
        weights,
        reference=reference if reference is not None else states[0],
        model=model,
        x=x,
        y=y,
        spec=model_spec(model),
        options=NPOptions(**options),
        report=report,
    )
    return out, report


# -- the maths -------------------------------------------------------------------------------


def test_fuse_at_zero_logits_is_the_average_and_softmax_at_log_weights_the_weighted_one():
    g = torch.Generator().manual_seed(0)
    states = [
        {"w": torch.randn(3, 4, generator=g), "b": torch.randn(3, generator=g)} for _ in "abc"
    ]
    zeros = {k: torch.zeros_like(v) for k, v in states[0].items()}
    assert _equal(fuse(states[:2], zeros, form="pair"), average(states[:2]))
    w = torch.tensor([1.0, 2.0, 5.0])
    logits = {k: w.log().view(-1, *[1] * v.ndim).expand(3, *v.shape) for k, v in states[0].items()}
    assert _equal(fuse(states, logits, form="softmax"), average(states, w.tolist()))
    with pytest.raises(ValueError, match="two models"):
        fuse(states, zeros, form="pair")


def test_a_zero_start_without_learning_is_the_aligned_average(pair):
    model, (a, b), x, y = pair
    out, report = _merge(model, [a, b], x, y, epochs=0)
    assert _equal(out, average([a, _aligned(model, a, b)]))
    assert not _equal(out, average([a, b]), atol=1e-3)  # alignment did something
    assert report.steps == 0 and report.loss_start == pytest.approx(report.loss_end)
    # The starting logits are 0 for equal weights, logit(share) otherwise.
    _, logits = learn_coefficients(model, [a, b], None, x, y, options=NPOptions(epochs=0))
    assert all(torch.count_nonzero(v) == 0 for v in logits.values())
    weighted, _ = _merge(model, [a, b], x, y, weights=[1, 3], epochs=0)
    assert _equal(weighted, average([a, _aligned(model, a, b)], [1, 3]))


def test_merging_one_model_returns_it(pair):
    model, (a, b), x, y = pair
    assert _equal(_merge(model, [a], x, y)[0], a, 0)
    assert _equal(_merge(model, [a, b], x, y, weights=[2, 0])[0], a, 0)  # weight 0: left out


def test_learning_lowers_the_proxy_loss_and_stays_between_the_endpoints(pair):
    model, (a, b), x, y = pair
    b_aligned = _aligned(model, a, b)
    report = NPReport()
    merged, logits = learn_coefficients(
        model, [a, b_aligned], None, x, y, options=NPOptions(), report=report
    )
    alpha = torch.cat([torch.sigmoid(v).flatten() for v in logits.values()])
    assert bool(((alpha > 0) & (alpha < 1)).all())
    assert float((alpha - 0.5).abs().max()) > 0.05  # the coefficients did move
    for key in logits:  # a convex combination, element by element
        low = torch.minimum(a[key], b_aligned[key]) - 1e-6
        high = torch.maximum(a[key], b_aligned[key]) + 1e-6
        assert bool(((merged[key] >= low) & (merged[key] <= high)).all())
    assert _equal(merged, fuse([a, b_aligned], logits, form="pair"), atol=1e-5)
    assert report.steps > 0 and report.holdout_ends[-1] < report.holdout_starts[-1]
    _, full = _merge(model, [a, b], x, y)
    assert full.loss_end < 0.9 * full.loss_start


def test_without_a_held_out_part_the_learned_coefficients_are_kept(pair):
    # With np-holdout = 0 nothing can choose the best epoch: the last coefficients must stay
    # (not the starting logits, the plain aligned average).
    model, (a, b), x, y = pair
    b_aligned = _aligned(model, a, b)
    report = NPReport()
    merged, logits = learn_coefficients(
        model, [a, b_aligned], None, x, y, options=NPOptions(holdout=0.0), report=report
    )
    assert report.steps > 0 and math.isnan(report.holdout_ends[-1])
    assert float(max(v.abs().max() for v in logits.values())) > 0.1  # they moved from 0
    assert not _equal(merged, average([a, b_aligned]), atol=1e-4)
    assert _equal(merged, fuse([a, b_aligned], logits, form="pair"), atol=1e-5)
    _, full = _merge(model, [a, b], x, y, holdout=0.0)
    assert full.loss_end < 0.9 * full.loss_start  # and the merge keeps what they learned


def test_uniform_init_starts_at_equal_shares_and_weights_init_at_the_data_shares(pair):
    model, (a, b), x, y = pair
    b_aligned = _aligned(model, a, b)
    starts = {}
    for init in ("weights", "uniform"):
        merged, logits = learn_coefficients(
            model, [a, b_aligned], [1, 3], x, y, options=NPOptions(epochs=0, init=init)
        )
        starts[init] = merged
        start = 0.0 if init == "uniform" else math.log(1 / 3)  # sigmoid(a) = share of model 0
        assert all(torch.allclose(v, torch.full_like(v, start)) for v in logits.values())
    assert _equal(starts["uniform"], average([a, b_aligned]))
    assert _equal(starts["weights"], average([a, b_aligned], [1, 3]))
    assert not _equal(starts["uniform"], starts["weights"], atol=1e-3)
    # The softmax form (three models) too, and through np_merge (alignment included).
    c = _aligned(model, a, b_aligned)
    for init, expected in (("uniform", [1, 1, 1]), ("weights", [1, 2, 5])):
        merged, _ = learn_coefficients(
            model, [a, b_aligned, c], [1, 2, 5], x, y, options=NPOptions(epochs=0, init=init)
        )
        assert _equal(merged, average([a, b_aligned, c], expected), atol=1e-5), init
    out, _ = _merge(model, [a, b], x, y, weights=[1, 3], epochs=0, init="uniform")
    assert _equal(out, average([a, b_aligned]))


def test_early_stopping_stops_after_patience_epochs_without_held_out_gain(pair):
    model, (a, b), x, y = pair
    # Two identical models: every coefficient gives the same network, so the held-out loss
    # never improves and learning stops after exactly `patience` epochs.
    for patience in (1, 2, 4):
        report = NPReport()
        options = NPOptions(epochs=10, patience=patience)
        learn_coefficients(model, [a, a], None, x, y, options=options, report=report)
        assert report.epochs == patience and report.steps == 4 * patience  # 240 fit / 64
    # Without a held-out part there is nothing to stop on: every epoch runs.
    report = NPReport()
    options = NPOptions(epochs=10, patience=1, holdout=0.0)
    learn_coefficients(model, [a, a], None, x, y, options=options, report=report)
    assert report.epochs == 10
    # A real pair with a large step: the held-out loss bottoms out early; each extra epoch of
    # patience runs one more epoch (observed: 4, 5, 6 of 100), and the coefficients kept are
    # the best held-out ones.
    b_aligned = _aligned(model, a, b)
    _, val = _split(len(y), 0.2, 0, "cpu")  # the held-out part learn_coefficients uses
    epochs = []
    for patience in (1, 2, 3):
        report = NPReport()
        options = NPOptions(epochs=100, patience=patience, lr=0.5)
        merged, _ = learn_coefficients(
            model, [a, b_aligned], None, x, y, options=options, report=report
        )
        epochs.append(report.epochs)
        m = copy.deepcopy(model)
        m.load_state_dict(merged)
        with torch.no_grad():
            held_out = float(torch.nn.functional.cross_entropy(m(x[val]), y[val]))
        assert held_out == pytest.approx(report.holdout_ends[-1], rel=1e-5)
        assert report.holdout_ends[-1] < report.holdout_starts[-1]
    assert epochs[0] < 100 and epochs == [epochs[0], epochs[0] + 1, epochs[0] + 2]


def test_held_out_losses_are_reported_per_learning_problem(pair):
    # Three models, pairwise: two learning problems, each with its own held-out losses; the
    # round metrics carry their mean and the last problem's, named so.
    from fedmerge.strategies.merges import NPMerge

    model, (a, b), x, y = pair
    _, report = _merge(model, [a, b, a], x, y)
    assert report.problems == 2
    assert len(report.holdout_starts) == len(report.holdout_ends) == 2
    assert report.holdout_starts[0] != report.holdout_starts[1]
    merge = NPMerge(model, (x, y))
    _, facts = merge([a, b, a], [1.0, 1.0, 1.0], a)
    assert facts["np-problems"] == 2
    mean = sum(report.holdout_ends) / 2
    assert facts["np-holdout-loss-end-mean"] == pytest.approx(mean, rel=1e-6)
    assert facts["np-holdout-loss-end-last"] == pytest.approx(report.holdout_ends[-1], rel=1e-6)
    start = sum(report.holdout_starts) / 2
    assert facts["np-holdout-loss-start-mean"] == pytest.approx(start, rel=1e-6)
    assert facts["np-holdout-loss-start-last"] == pytest.approx(report.holdout_starts[-1])


def test_pairwise_and_softmax_merge_permuted_copies_back_into_the_model(pair):
    model, (a, _), x, y = pair
    spec = model_spec(model)
    g = torch.Generator().manual_seed(3)
    copies = [apply_permutations(spec, random_permutations(spec, g), a) for _ in range(2)]
    for form, align in (
        ("pairwise", "reference"),
        ("pairwise", "running"),
        ("softmax", "reference"),
    ):
        out, report = _merge(model, [a, *copies], x, y, weights=[1, 2, 3], form=form, align=align)
        # reference: the global model's (a's) unit order; running: the largest model's.
        assert _equal(out, a if align == "reference" else copies[1], atol=1e-5), (form, align)
        assert report.problems == (2 if form == "pairwise" else 1) and report.units_moved > 0.5
    assert not _equal(average([a, *copies]), a, atol=1e-2)  # unaligned: far from the model


def test_deterministic_for_a_seed_and_inputs_untouched(pair):
    model, (a, b), x, y = pair
    before = [copy.deepcopy(s) for s in (a, b)], x.clone(), y.clone(), _state(model)
    first, _ = _merge(model, [a, b], x, y)
    second, _ = _merge(model, [a, b], x, y)
    assert _equal(first, second, 0)
    assert _equal(a, before[0][0], 0) and _equal(b, before[0][1], 0)
    assert torch.equal(x, before[1]) and torch.equal(y, before[2])
    assert _equal(_state(model), before[3], 0)


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_batchnorm_models_get_their_own_statistics_and_inputs_stay_untouched(bn_mode):
    model = build_model("resnet20", SHAPE, 10, seed=0)
    a, b = _state(model), _state(build_model("resnet20", SHAPE, 10, seed=1))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, *SHAPE, generator=g), torch.randint(0, 10, (48,), generator=g)
    a0, b0 = copy.deepcopy(a), copy.deepcopy(b)
    reference = {**a, "norm1.num_batches_tracked": torch.tensor(7)}
    out, report = _merge(
        model, [a, b], x, y, reference=reference, bn_mode=bn_mode, epochs=1, batch_size=16
    )
    assert _equal(a, a0, 0) and _equal(b, b0, 0)
    repaired = repair_batchnorm(model, out, x)
    assert all(torch.allclose(out[k], repaired[k], atol=1e-5) for k in out if "running" in k)
    assert int(out["norm1.num_batches_tracked"]) == 7  # integer buffers: the reference's
    assert report.steps == 3 and math.isfinite(report.loss_end)  # 38 fitting samples / 16


def test_params_weights_learns_only_matrices(pair):
    model, (a, b), x, y = pair
    out, _ = _merge(model, [a, b], x, y, params="weights")
    start = average([a, _aligned(model, a, b)])
    assert torch.allclose(out["fc1.bias"], start["fc1.bias"], atol=1e-6)
    assert not torch.allclose(out["fc1.weight"], start["fc1.weight"], atol=1e-4)


def test_memory_report_counts_the_copies_of_the_model(pair):
    model, (a, b), x, y = pair
    param_bytes = sum(v.numel() * v.element_size() for v in a.values())
    _, two = _merge(model, [a, b], x, y, epochs=1)
    # base + difference + logits + gradient + two Adam moments + one merged copy + best logits
    assert two.state_bytes == 8 * param_bytes
    _, three = _merge(model, [a, b, a], x, y, epochs=1, form="softmax")
    # stack of 3 + logits 3 + gradients 3 + Adam 6 + merged 1 + best logits 3
    assert three.state_bytes == 19 * param_bytes
    assert two.peak_cuda_bytes == 0  # CPU: only the counted figure


def test_adam_is_torch_adam_step_by_step():
    p = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    opt = _Adam([p], lr=0.1)
    m = v = torch.zeros(3)
    expected = p.detach().clone()
    for t in range(1, 4):
        g = torch.tensor([0.5, -1.0, 2.0]) * t
        p.grad = g.clone()
        opt.step()
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        mhat, vhat = m / (1 - 0.9**t), v / (1 - 0.999**t)
        expected = expected - 0.1 * mhat / (vhat.sqrt() + 1e-8)
        assert torch.allclose(p.detach(), expected, atol=1e-6)
        assert p.grad is None


@pytest.mark.slow  # constructing torch.optim.Adam imports TorchDynamo (~5 s)
def test_adam_matches_torch_optim_adam():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(5, 4, generator=g).requires_grad_(), None
    q = p.detach().clone().requires_grad_()
    ours, theirs = _Adam([p], lr=0.01), torch.optim.Adam([q], lr=0.01)
    for _ in range(5):
        grad = torch.randn(5, 4, generator=g)
        p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"np-form": "triplets"}, "np-form"),
        ({"np-align": "sideways"}, "np-align"),
        ({"np-init": "random"}, "np-init"),
        ({"np-params": "biases"}, "np-params"),
        ({"np-bn-mode": "frozen"}, "np-bn-mode"),
        ({"np-lr": 0.0}, "np-lr"),
        ({"np-epochs": -1}, "np-epochs"),
        ({"np-batch-size": 0}, "np-batch-size"),
        ({"np-holdout": 1.0}, "np-holdout"),
        ({"np-patience": 0}, "np-patience"),
        ({"np-form": "softmax", "np-align": "running"}, "np-align"),
        ({"strategy": "fednpmerge"}, "proxy-size"),
    ],
)
def test_bad_options_name_their_key(values, key):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping(values)
    assert info.value.key == key
    RunConfig.from_mapping({"strategy": "fednpmerge", "proxy-size": 100, "np-epochs": 0})


def test_the_one_shot_row_beats_the_weight_matched_average_on_the_site_data(pair):
    model, (a, b), x, y = pair
    site = MergeSite(model, a, b, x, y, seed=0)
    out = np_merge_site(site, device="cpu")
    matched = average([a, _aligned(model, a, b)])

    def loss(state):
        m = copy.deepcopy(model)
        m.load_state_dict(state)
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(m(x), y))

    assert set(out) == set(a) and loss(out) < loss(matched)


# -- the strategy --------------------------------------------------------------------------


def test_strategy_merges_mocked_replies_on_the_proxy_slice(pair):
    model, (a, b), x, y = pair
    strategy = FedNPMerge(model=model, proxy=(x, y), fraction_evaluate=0.0)
    requests = train_requests(strategy, a, 2)
    replies = [train_reply(requests[0], a, 30), train_reply(requests[1], b, 30)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    merged = arrays.to_torch_state_dict()
    assert set(merged) == set(a) and not _equal(merged, average([a, _aligned(model, a, b)]))
    assert metrics["proxy-size"] == 300
    assert metrics["np-steps"] > 0 and metrics["np-time"] > 0 and metrics["np-state-mb"] > 0
    assert metrics["np-proxy-loss-end"] < metrics["np-proxy-loss-start"]
    assert 0 <= metrics["units-moved"] <= 1 and "np-peak-cuda-mb" not in metrics
    with pytest.raises(ConfigError, match="proxy-size"):
        FedNPMerge(model=model, proxy=None)


def test_fednpmerge_runs_end_to_end_on_the_local_engine(tmp_path, monkeypatch):
    from fedmerge.strategies import registry
    from fedmerge.strategies.validation import ValidatedReplies

    over = {
        "dataset": "digits",
        "num-clients": 4,
        "num-rounds": 2,
        "local-epochs": 1,
        "model": "mlp",
        "mlp-hidden": "32",
        "strategy": "fednpmerge",
        "proxy-size": 200,
        "np-epochs": 4,
        "np-patience": 2,
        "np-lr": 0.02,
        "output-dir": str(tmp_path),
        "save-model": False,
        "device": "cpu",
    }
    cfg = RunConfig.from_mapping(over)
    # The registry's own entry builds the strategy, with the np-* keys of the config.
    strategy = registry.build_strategy(cfg)
    assert isinstance(strategy, FedNPMerge) and isinstance(strategy, ValidatedReplies)
    assert strategy.options == NPOptions(epochs=4, patience=2, lr=0.02)
    assert len(strategy.np.proxy) == 200
    # The run builds it through that entry too (counted, not replaced).
    entry, description = registry.STRATEGIES["fednpmerge"]
    built = []

    def counting(c):
        built.append(c.strategy)
        return entry(c)

    monkeypatch.setitem(registry.STRATEGIES, "fednpmerge", (counting, description))
    rows = read_metrics(run(cfg, "local"))
    assert built == ["fednpmerge"]
    assert len(rows) == 3 and rows[-1]["test-accuracy"] > 0.5  # 10 classes: chance 0.1
    for row in rows[1:]:
        assert row["proxy-size"] == 200 and row["np-steps"] > 0
        assert row["np-proxy-loss-end"] <= row["np-proxy-loss-start"] + 1e-6


def test_merge_experiment_gives_np_merge_the_np_keys(monkeypatch):
    # `fedmerge merge-experiment np-holdout=0` must reach NP Merge (not NPOptions()' defaults).
    from fedmerge.config import RunConfig
    from fedmerge.experiments import one_shot as merge_experiment

    seen = []

    def recording(site, **kwargs):
        seen.append(kwargs["options"])
        return site.a

    monkeypatch.setattr("fedmerge.experiments.one_shot.np_merge_site", recording)
    cfg = RunConfig.from_mapping(
        {"model": "mlp", "mlp-hidden": "16", "device": "cpu", "np-holdout": 0.0, "np-epochs": 3}
    )
    rows = merge_experiment.one_shot_pair(
        cfg, pair_seed=0, epochs=1, betas=(0.5,), merge_samples=100
    )
    assert seen == [NPOptions(holdout=0.0, epochs=3)]
    assert "NP Merge (weight-aligned)" in {r["method"] for r in rows}
