"""Weight-averaging analyses (arXiv 2411.09263): invariants of the probes and the commands."""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys

import pytest
import torch

from fedmerge.commands import analyse as analyses
from fedmerge.config import RunConfig
from fedmerge.errors import ConfigError
from fedmerge.experiments import analysis
from fedmerge.experiments.analysis import ModelSet
from fedmerge.federation import DataSpec, load_data, make_model, partition_indices
from fedmerge.merging import average
from fedmerge.training import SGDSettings, evaluate, train

# Digits (embedded), a one-hidden-layer MLP: every test here trains in well under a second.
CFG = RunConfig(
    model="mlp", mlp_hidden="32", batch_size=32, proxy_size=200, num_clients=4, device="cpu"
)


@pytest.fixture(scope="module")
def data():
    return load_data(DataSpec.of(CFG))


@pytest.fixture(scope="module")
def shared():
    return analysis.train_model_set(CFG, "shared", epochs=2)


def _set(states, template=None, setting="test") -> ModelSet:
    template = template if template is not None else make_model(CFG, load_data(DataSpec.of(CFG)))
    return ModelSet(setting, template, tuple(states), tuple(100 + k for k in range(len(states))))


def _by_method(rows):
    return {r["method"]: r for r in rows}


# -- weight patterns -------------------------------------------------------------------------
def test_template_correlation_of_means_with_themselves_is_identity_on_the_diagonal(data):
    means = analysis.class_means(data.x_train, data.y_train, data.num_classes)
    assert means.shape == (10, *data.input_shape)
    torch.testing.assert_close(means[3], data.x_train[data.y_train == 3].mean(0))
    r = analysis.template_correlation(means, means)
    torch.testing.assert_close(torch.diagonal(r), torch.ones(10, dtype=torch.float64))
    diag, off = analysis.diagonal_contrast(r)
    assert diag == pytest.approx(1.0) and off < 0.5


def test_linear_classifier_rows_are_class_templates_on_digits():
    patterns = analysis.weight_patterns(CFG, epochs=3, clients=2)
    assert list(patterns.templates) == ["all data", "client 0", "client 1"]
    assert [r["data"] for r in patterns.rows] == ["all data", "client 0", "client 1"]
    whole = patterns.rows[0]
    assert whole["linear-accuracy"] > 0.85 and whole["classes-seen"] == 10
    # the headline number: each class's row matches its own class mean far better than others
    assert whole["corr-diag"] > 0.5 > whole["corr-off"] + 0.3
    assert patterns.templates["all data"].shape == (10, 1, 8, 8)
    assert patterns.correlations["client 0"].shape == (10, 10)
    first = make_model(CFG, load_data(DataSpec.of(CFG)))
    assert list(patterns.filters) == ["initial", "all data", "client 0", "client 1"]
    assert patterns.filters["client 1"].shape == (8, 1, 8, 8)  # mlp: fc1 rows as images
    assert first.fc1.weight.shape[1] == 64
    assert all(r["first-layer-change"] > 0 for r in patterns.rows)
    for row in patterns.rows[1:]:
        assert 0 < row["samples"] < whole["samples"]
        if row["classes-absent"]:  # rows of classes a client never saw hold no template
            assert row["corr-diag-seen"] > row["corr-diag-absent"] + 0.2


def test_linear_classifier_starts_at_zero_or_seeded():
    zero = analysis.linear_classifier((1, 8, 8), 10, seed=0)
    assert not zero.fc.weight.any() and not zero.fc.bias.any()
    a = analysis.linear_classifier((1, 8, 8), 10, seed=3, zero=False)
    b = analysis.linear_classifier((1, 8, 8), 10, seed=3, zero=False)
    assert a.fc.weight.any() and torch.equal(a.fc.weight, b.fc.weight)


def test_first_layer_units_of_a_cnn_are_its_conv1_kernels():
    model = make_model(CFG.replace(model="cnn"), load_data(DataSpec.of(CFG)), seed=0)
    units = analysis.first_layer_units(model, (1, 8, 8))
    assert torch.equal(units, model.conv1.weight.detach())
    assert units.shape == (6, 1, 5, 5)


# -- soups and ensembles ---------------------------------------------------------------------
def test_identical_models_soups_and_ensembles_equal_the_model(data, shared):
    state = shared.states[0]
    models = _set([state] * 3, shared.template)
    rows = _by_method(analysis.soup_rows(models, data))
    model = shared.template
    model.load_state_dict(state)
    _, acc = evaluate(model, data.x_test, data.y_test)
    for method in (
        "individual (mean)",
        "best individual (held-out)",
        "uniform soup",
        "size-weighted soup (FedAvg)",
        "greedy soup",
        "logit ensemble",
        "feature ensemble (soup head)",
    ):
        assert rows[method]["test-accuracy"] == pytest.approx(acc, abs=1e-9), method
    assert rows["greedy soup"]["models"] == 1  # a copy never strictly improves the soup
    torch.testing.assert_close(average(models.states)["fc1.weight"], state["fc1.weight"])


def test_one_model_ensembles_are_the_model(data, shared):
    rows = _by_method(analysis.soup_rows(_set(shared.states[:1], shared.template), data))
    acc = rows["individual (mean)"]["test-accuracy"]
    assert rows["logit ensemble"]["test-accuracy"] == acc
    assert rows["feature ensemble (soup head)"]["test-accuracy"] == acc
    model = shared.template
    model.load_state_dict(shared.states[0])
    logits, feats = analysis.outputs(model, data.x_test[:50])
    torch.testing.assert_close(logits, model(data.x_test[:50]))
    assert feats.shape == (50, 32)  # the input of the head fc2


def test_greedy_soup_is_never_below_the_best_single_model_on_held_out(data, shared):
    loose = [shared.states[0], *analysis.train_model_set(CFG, "independent", epochs=1).states]
    soup, chosen, held = analysis.greedy_soup(shared.template, loose, data.x_proxy, data.y_proxy)
    singles = []
    for state in loose:
        shared.template.load_state_dict(state)
        singles.append(analysis.accuracy(shared.template(data.x_proxy), data.y_proxy))
    assert held >= max(singles)
    assert chosen[0] == max(range(len(loose)), key=lambda k: (singles[k], -k))
    shared.template.load_state_dict(soup)
    assert analysis.accuracy(shared.template(data.x_proxy), data.y_proxy) == held


def test_feature_ensemble_equals_logit_ensemble_when_heads_are_shared(data, shared):
    head = {k: v for k, v in shared.states[0].items() if k.startswith("fc2.")}
    states = [{**s, **head} for s in shared.states]
    rows = _by_method(analysis.soup_rows(_set(states, shared.template), data, feature_head="first"))
    assert rows["feature ensemble (first head)"]["test-accuracy"] == pytest.approx(
        rows["logit ensemble"]["test-accuracy"], abs=1e-9
    )


def _bn_mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(64, 32),
        torch.nn.BatchNorm1d(32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 10),
    )


def _repaired_accuracy(template, state, data) -> float:
    """Test accuracy of ``state`` with its BatchNorm statistics recomputed on the proxy slice
    (written out here: reset, then one train-mode pass, cumulative average)."""
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(data.x_proxy), 256):
            model(data.x_proxy[i : i + 256])
    model.eval()
    with torch.no_grad():
        return analysis.accuracy(model(data.x_test), data.y_test)


def test_soup_rows_of_a_batchnorm_model_repair_statistics(data):
    # Two trained BatchNorm MLPs whose running statistics are far off: the soups' statistics
    # must be recomputed on the proxy slice, not inherited (averaged) from the models.
    template, states = _bn_mlp(0), []
    for seed in (1, 2):
        model = _bn_mlp(seed)
        train(model, data.x_train, data.y_train, SGDSettings(1, 32, 0.05), seed=seed)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state["2.running_mean"] += 3.0
        state["2.running_var"] *= 50.0
        states.append(state)
    models = _set(states, template)
    rows = _by_method(analysis.soup_rows(models, data))
    assert len(rows) == 7
    for method, soup in (
        ("uniform soup", average(states)),
        ("size-weighted soup (FedAvg)", average(states, models.sizes)),
    ):
        repaired = _repaired_accuracy(template, soup, data)
        assert rows[method]["test-accuracy"] == repaired, method
        # Without the repair the inherited statistics break the soup (observed 0.10 vs 0.89).
        template.load_state_dict(soup)
        template.eval()
        with torch.no_grad():
            inherited = analysis.accuracy(template(data.x_test), data.y_test)
        assert repaired > inherited + 0.3, method
    # The same on the registry's BatchNorm model (ResNet-20, untrained).
    cfg = CFG.replace(model="resnet20")
    template = make_model(cfg, data, seed=0)
    states = [make_model(cfg, data, seed=s).state_dict() for s in (1, 2)]
    rows = _by_method(analysis.soup_rows(_set(states, template), data))
    uniform = _repaired_accuracy(template, average(states), data)
    assert rows["uniform soup"]["test-accuracy"] == uniform


def test_model_sets_are_seeded_and_settings_differ(shared):
    again = analysis.train_model_set(CFG, "shared", epochs=2)
    for a, b in zip(shared.states, again.states, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    spec = DataSpec.of(CFG)
    parts = [len(p) for p in partition_indices(spec)]
    assert list(shared.sizes) == parts
    full = analysis.train_model_set(CFG, "independent", epochs=1, independent_data="full")
    assert set(full.sizes) == {len(load_data(spec).y_train)}
    warm = analysis.train_model_set(CFG, "shared", epochs=2, warmup_rounds=1)
    assert not torch.equal(warm.states[0]["fc1.weight"], shared.states[0]["fc1.weight"])
    with pytest.raises(ConfigError, match="settings"):
        analysis.train_model_set(CFG, "nope")


# -- magnitude scaling -----------------------------------------------------------------------
@pytest.mark.parametrize("factor", [0.1, 10.0, 100.0])
def test_scaling_all_bias_free_models_keeps_every_prediction(data, shared, factor):
    bias_free = [
        {k: torch.zeros_like(v) if k.endswith("bias") else v for k, v in s.items()}
        for s in shared.states
    ]
    rows = analysis.scaling_rows(_set(bias_free, shared.template), data, factors=[factor])
    every = next(r for r in rows if r["case"] == "all")
    assert every["agreement-unscaled"] == 1.0 and every["agreement-subset"] == 1.0
    # a 2-layer ReLU net is homogeneous of degree 2 in its parameters
    assert every["logit-ratio"] == pytest.approx(factor**2, rel=1e-3)
    assert [r["case"] for r in rows] == ["none", "one", "half", "all"]
    assert [r["scaled"] for r in rows] == [0, 1, 2, 4]


def test_scaling_one_model_by_a_large_factor_hands_the_merge_to_that_model(data, shared):
    bias_free = [
        {k: torch.zeros_like(v) if k.endswith("bias") else v for k, v in s.items()}
        for s in shared.states
    ]
    rows = analysis.scaling_rows(_set(bias_free, shared.template), data, factors=[1e4])
    one = next(r for r in rows if r["case"] == "one")
    assert one["agreement-subset"] > 0.99  # the merge is model 0, scaled


def test_scaled_indices_and_parameters():
    assert analysis.scaled_indices("one", 10) == [0]
    assert analysis.scaled_indices("half", 10) == [0, 1, 2, 3, 4]
    assert analysis.scaled_indices("half", 1) == [0]
    assert analysis.scaled_indices("all", 3) == [0, 1, 2]
    state = {"w": torch.ones(2), "running_var": torch.ones(2)}
    scaled = analysis.scale_parameters(state, {"w"}, 3.0)
    assert scaled["w"].tolist() == [3.0, 3.0] and scaled["running_var"].tolist() == [1.0, 1.0]
    assert state["w"].tolist() == [1.0, 1.0]  # inputs untouched


# -- commands --------------------------------------------------------------------------------
@pytest.mark.slow  # about 5 s on 2 busy cores, most of it drawing the four PNGs
def test_analyse_all_writes_tables_and_plots(tmp_path):
    argv = ["all", "model=mlp", "mlp-hidden=16", "proxy-size=200", "num-clients=3", "-q"]
    argv += ["--out", str(tmp_path), "--epochs", "1", "--pattern-epochs", "1", "--clients", "1"]
    assert analyses.main([*argv, "--factors", "10"]) == 0
    for name in ("weight-patterns", "soups", "scaling"):
        payload = json.loads((tmp_path / f"{name}.json").read_text())
        assert payload["config"]["model"] == "mlp" and payload["rows"]
        assert (tmp_path / f"{name}.md").read_text().count("\n|") >= len(payload["rows"])
    for png in ("weight-patterns-linear", "weight-patterns-filters", "soups", "scaling"):
        assert (tmp_path / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    soups = json.loads((tmp_path / "soups.json").read_text())["rows"]
    assert {r["setting"] for r in soups} == {"shared", "independent"} and len(soups) == 14
    assert len(json.loads((tmp_path / "scaling.json").read_text())["rows"]) == 8


def test_analyse_reports_bad_options_in_one_line(tmp_path, capsys):
    argv = ["soups", "--settings", "shared,nope", "--out", str(tmp_path), "-q"]
    assert analyses.main(argv) == 2
    assert "--settings" in capsys.readouterr().err
    assert analyses.main(["scaling", "--factors", "0", "--out", str(tmp_path), "-q"]) == 2
    assert analyses.main(["soups", "--feature-head", "last", "--out", str(tmp_path), "-q"]) == 2
    assert analyses.main(["all", "--probes", "soups,nope", "--out", str(tmp_path), "-q"]) == 2
    assert "--probes" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before anything was trained or written


def test_adding_the_parsers_imports_no_torch():
    code = "import sys, fedmerge.commands.analyse; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_add_parsers_wires_analyse_into_a_command():
    parser = argparse.ArgumentParser(prog="fedmerge")
    analyses.add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["analyse", "scaling", "--factors", "10", "dataset=digits"])
    assert args.probe == "scaling" and args.overrides == ["dataset=digits"] and callable(args.func)


def test_scaling_a_batchnorm_model_is_cancelled_by_repair_and_kept_without(data):
    # Repairing BatchNorm after scaling recomputes the statistics a scaled conv
    # feeds, which cancels the scaling of every conv before a BatchNorm; the paper's code
    # does not repair.
    cfg = CFG.replace(model="resnet20")
    template = make_model(cfg, data, seed=0)
    states = [make_model(cfg, data, seed=s).state_dict() for s in (1, 2)]
    ratio = {}
    for repair in (True, False):
        got = analysis.scaling_rows(_set(states, template), data, factors=[10.0], repair=repair)
        ratio[repair] = next(r for r in got if r["case"] == "all")["logit-ratio"]
    # Repaired: only the last BatchNorm's affine and the linear head scale the logits (10 x 10).
    assert 10 < ratio[True] < 1e3
    # Not repaired: the factor compounds through the network's 20 weighted layers.
    assert ratio[False] > 1e10
