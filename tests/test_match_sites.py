"""``match-sites``: the activation sites the data-based matchers read.

``all`` stacks every site of a unit space as extra samples of one correlation (fedmerge's
behaviour before the option); ``last`` reads one site per space, the last declared one, which
is the last in forward order (MuDSC's choice: its code reads one site per space, the input of
the space's last consumer).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from fedmerge.strategies.fedmatch import FedMatch
from strategy_harness import train_reply, train_requests
from torch import nn

from fedmerge.config import RunConfig
from fedmerge.errors import ConfigError
from fedmerge.matching import activations, match, pearson_correlation, reading, selected_sites
from fedmerge.matching.activations import _activation_correlations
from fedmerge.merging import average, matched_average
from fedmerge.models import MODELS, build_model, model_spec
from fedmerge.options import MatchOptions
from fedmerge.permutations import (
    PermGroup,
    Site,
    apply_permutations,
    invert,
    random_permutations,
    spec_from_axes,
)
from fedmerge.spec_inference import infer_spec

# ---------------------------------------------------------------------------------------------
# A unit space with two sites: only the last carries the planted permutation
# ---------------------------------------------------------------------------------------------


class TwoSites(nn.Module):
    """Units ``h`` written by two layers (as a residual stream is) and read by ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.head = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.first(x)) + F.relu(self.second(x)))

    def permutation_spec(self):
        axes = {
            "first.weight": ("h", None),
            "first.bias": ("h",),
            "second.weight": ("h", None),
            "second.bias": ("h",),
            "head.weight": (None, "h"),
            "head.bias": (None,),
        }
        sites = (Site("first", relu=True), Site("second", relu=True))
        return spec_from_axes(axes, {"h": PermGroup(8, sites=sites)})


def planted_pair(seed: int = 0):
    """``(reference, other, planted, inputs)``: ``other`` is ``reference`` with its units put in
    the ``planted`` order, except that ``first`` (the first site) is replaced by unrelated,
    10x larger weights: at ``second`` (the last site) ``other``'s units are exactly
    ``reference``'s, at ``first`` they are noise that dominates a stacked correlation."""
    torch.manual_seed(seed)
    reference = TwoSites()
    spec = reference.permutation_spec()
    g = torch.Generator().manual_seed(seed)
    planted = random_permutations(spec, g)
    state = apply_permutations(spec, planted, reference.state_dict())
    state["first.weight"] = 10 * torch.randn(8, 6, generator=g)
    state["first.bias"] = 10 * torch.randn(8, generator=g)
    other = TwoSites()
    other.load_state_dict(state)
    return reference, other, planted, torch.randn(200, 6, generator=g)


def recovered(perms, planted) -> float:
    """Share of units that ``perms`` (aligning other to reference) puts back in place."""
    return float((perms["h"] == invert(planted["h"])).float().mean())


@pytest.fixture
def sites_read(monkeypatch):
    """The module names of every ``_record`` call of the activation matchers, per call (the
    streamed reading's and the one-pass reading's; not the one-input probe that sizes the
    one-pass reading)."""
    calls: list[list[str]] = []
    record = activations._record

    def spy(model, batch, sites):
        if len(batch) > 1:
            calls.append([s.module for s in sites])
        return record(model, batch, sites)

    monkeypatch.setattr(activations, "_record", spy)
    monkeypatch.setattr(reading, "_record", spy)
    return calls


# ---------------------------------------------------------------------------------------------
# The definition
# ---------------------------------------------------------------------------------------------


def test_all_keeps_every_site_last_only_the_last_declared_and_other_values_are_refused():
    group = TwoSites().permutation_spec().perms["h"]
    assert selected_sites(group) == selected_sites(group, "all") == group.sites
    assert selected_sites(group, "last") == (Site("second", relu=True),)
    assert selected_sites(PermGroup(4), "last") == ()
    reference, other, _, x = planted_pair()
    spec = reference.permutation_spec()
    for value in ("first", "LAST", None):
        with pytest.raises(ConfigError, match="match-sites"):
            selected_sites(group, value)
        with pytest.raises(ConfigError, match="match-sites"):
            activations.activation_matching(spec, reference, other, x, sites=value)
        with pytest.raises(ConfigError, match="match-sites"):  # whatever the matcher
            MatchOptions(method="weight", sites=value)


def _outputs(model: nn.Module, modules: set[str], x: torch.Tensor):
    """The output of each of ``modules`` on ``x`` and the position of its (last) call."""
    outputs: dict[str, torch.Tensor] = {}
    order: dict[str, int] = {}
    named, calls = dict(model.named_modules()), itertools.count()

    def hook(name: str):
        def record(_module, _inputs, output):
            outputs[name], order[name] = output.detach(), next(calls)

        return record

    handles = [named[name].register_forward_hook(hook(name)) for name in modules]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return outputs, order


@pytest.mark.parametrize(
    ("name", "norm"),
    [(n, "batch") for n in MODELS] + [("resnet20", "group"), ("resnet20", "layer")],
)
@pytest.mark.parametrize("inferred", [False, True], ids=["hand-written", "inferred"])
def test_specs_declare_their_sites_in_forward_order(name, norm, inferred):
    """So ``last`` (the last declared site) is the last site the forward pass computes."""
    model = build_model(name, (1, 8, 8), 10, norm=norm, seed=0).eval()
    x = torch.randn(2, 1, 8, 8)
    spec = infer_spec(model, x) if inferred else model_spec(model)
    _, order = _outputs(model, {s.module for g in spec.perms.values() for s in g.sites}, x)
    for group in spec.perms.values():
        positions = [order[s.module] for s in group.sites]
        assert positions == sorted(positions) and len(set(positions)) == len(positions)
        assert order[selected_sites(group, "last")[0].module] == max(positions)


def test_last_is_mudscs_site_on_resnet20_and_the_documented_one_on_vit():
    """resnet20: each residual stream's last site is its stage's output (MuDSC: the input of
    the next stage's shortcut, or of the pooling before ``fc``), the inner channels their only
    site. vit: the stream's last site is the last block's output (MuDSC: the head's input),
    q/k the keys (MuDSC: ``k_norm``'s output), values ``attn.v`` (MuDSC: ``attn.proj``'s
    input), the MLP its GELU (MuDSC: ``fc2``'s input)."""
    resnet = model_spec(build_model("resnet20", (1, 8, 8), 10, seed=0))
    last = {name: selected_sites(g, "last")[0] for name, g in resnet.perms.items()}
    assert {n: last[n].module for n in last if n.endswith("_res")} == {
        "P_layer1_res": "layer1.2",
        "P_layer2_res": "layer2.2",
        "P_layer3_res": "layer3.2",
    }
    inner = [n for n in last if n.endswith("_inner")]
    assert len(inner) == 9 and all(last[n] == Site(f"{n[2:-6]}.norm1", relu=True) for n in inner)
    vit = model_spec(build_model("vit", (1, 8, 8), 10, seed=0))
    depth = sum(name.endswith("_mlp") for name in vit.perms)
    last = {name: selected_sites(g, "last")[0].module for name, g in vit.perms.items()}
    assert last["P_res"] == f"blocks.{depth - 1}"
    for i in range(depth):
        assert last[f"P_block{i}_qk"] == f"blocks.{i}.attn.k"
        assert last[f"P_block{i}_vo"] == f"blocks.{i}.attn.v"
        assert last[f"P_block{i}_mlp"] == f"blocks.{i}.mlp.act"


# ---------------------------------------------------------------------------------------------
# What the matchers read
# ---------------------------------------------------------------------------------------------


def _oracle(spec, reference, other, x, sites):
    """Each permutation's correlation recomputed from hooked outputs: the chosen sites'
    samples concatenated, ReLU where the site says, plus 1e-6 x the pre-ReLU correlation."""
    chosen = {n: g.sites if sites == "all" else g.sites[-1:] for n, g in spec.perms.items()}
    modules = {s.module for ss in chosen.values() for s in ss}
    outputs = [_outputs(model, modules, x)[0] for model in (reference, other)]
    scores = {}
    for name, group in spec.perms.items():

        def units(recorded, site, relu, size=group.size):
            out = recorded[site.module].movedim(site.axis, 0).reshape(size, -1)
            return F.relu(out) if relu and site.relu else out

        post, pre = [
            [torch.cat([units(rec, s, relu) for s in chosen[name]], 1) for rec in outputs]
            for relu in (True, False)
        ]
        scores[name] = pearson_correlation(post[0].T, post[1].T)
        if any(s.relu for s in chosen[name]):
            scores[name] = scores[name] + 1e-6 * pearson_correlation(pre[0].T, pre[1].T)
    return scores


@pytest.mark.parametrize("name", ["resnet20", "vit"])
@pytest.mark.parametrize("sites", ["all", "last"])
def test_correlations_stack_every_site_or_read_only_the_last(name, sites, sites_read):
    """``all`` is the old behaviour (every site stacked), ``last`` one site per space."""
    reference = build_model(name, (1, 8, 8), 10, seed=1).eval()
    other = build_model(name, (1, 8, 8), 10, seed=2).eval()
    spec, x = model_spec(reference), torch.randn(12, 1, 8, 8)
    got = _activation_correlations(spec, reference, other, x, 5, sites)
    want = _oracle(spec, reference, other, x, sites)
    for perm in spec.perms:
        torch.testing.assert_close(got[perm], want[perm], rtol=0, atol=1e-9)
    # 3 batches x 2 models, each recording exactly the chosen sites.
    every = [s.module for g in spec.perms.values() for s in g.sites]
    lasts = [g.sites[-1].module for g in spec.perms.values()]
    assert sites_read == [every if sites == "all" else lasts] * 6
    assert len(lasts) == len(spec.perms) < len(every)


def test_default_is_all_and_gives_the_assignment_of_all(sites_read):
    """The default options and ``sites="all"`` agree exactly, for both data-based matchers,
    and read every site."""
    reference = build_model("resnet20", (1, 8, 8), 10, seed=1).eval()
    other = build_model("resnet20", (1, 8, 8), 10, seed=2).eval()
    spec, x = model_spec(reference), torch.randn(16, 1, 8, 8)
    a, b = reference.state_dict(), other.state_dict()
    kw = {"model": reference, "inputs": x}
    for name in ("activation", "dual"):
        options = MatchOptions(method=name, beta=0.5, max_sweeps=3)
        old = match(spec, a, b, options, **kw)
        new = match(spec, a, b, replace(options, sites="all"), **kw)
        assert all(torch.equal(old[p], new[p]) for p in spec.perms)
        last = match(spec, a, b, replace(options, sites="last"), **kw)
        assert any(not torch.equal(old[p], last[p]) for p in spec.perms)
    every = sum(len(g.sites) for g in spec.perms.values())
    assert [len(c) for c in sites_read] == [every] * 4 + [len(spec.perms)] * 2 + [every] * 4 + [
        len(spec.perms)
    ] * 2


@pytest.mark.parametrize("seed", range(5))
def test_last_recovers_a_permutation_planted_only_at_the_last_site(seed):
    reference, other, planted, x = planted_pair(seed)
    spec = reference.permutation_spec()
    for name, kw in (("activation", {}), ("dual", {"beta": 0.2})):
        a, b = reference.state_dict(), other.state_dict()
        last, stacked = (
            match(spec, a, b, MatchOptions(method=name, sites=s, **kw), model=reference, inputs=x)
            for s in ("last", "all")
        )
        assert recovered(last, planted) == 1.0
        assert recovered(stacked, planted) < 1.0  # the noisy first site spoils it


def test_weight_matching_and_data_free_dual_ignore_the_sites():
    reference, other, _, _ = planted_pair()
    spec, a, b = reference.permutation_spec(), reference.state_dict(), other.state_dict()
    for name, kw in (("weight", {}), ("dual", {"beta": 1.0})):
        all_, last = (
            match(spec, a, b, MatchOptions(method=name, sites=s, **kw)) for s in ("all", "last")
        )
        assert torch.equal(all_["h"], last["h"])


# ---------------------------------------------------------------------------------------------
# The option reaches the matcher: run-config, strategies, merge functions, one-shot experiment
# ---------------------------------------------------------------------------------------------


def _options(method: str, sites: str, **more) -> MatchOptions:
    cfg = RunConfig.from_mapping(
        {"strategy": "fedmatch", "match-method": method, "match-sites": sites, "proxy-size": 50}
        | more
    )
    return MatchOptions.from_config(cfg)


@pytest.mark.parametrize("method", ["activation", "dual"])
def test_fedmatch_with_match_sites_last_merges_differently_from_all(method, sites_read):
    """FedMatch built from a run-config: ``last`` aligns the client exactly (the merge is the
    average with the planted permutation undone), ``all`` does not."""
    reference, other, planted, x = planted_pair()
    spec = reference.permutation_spec()
    merged = {}
    for sites in ("all", "last"):
        options = _options(method, sites, **{"match-beta": 0.2})
        assert options.sites == sites
        strategy = FedMatch(model=reference, proxy=x, options=options, fraction_evaluate=0.0)
        requests = train_requests(strategy, reference.state_dict(), 2)
        replies = [
            train_reply(requests[0], reference.state_dict(), 10),
            train_reply(requests[1], other.state_dict(), 10),
        ]
        sites_read.clear()
        arrays, _ = strategy.aggregate_train(1, replies)
        merged[sites] = arrays.to_torch_state_dict()
        assert sites_read and all(c == ["first", "second"][-len(c) :] for c in sites_read)
        assert {len(c) for c in sites_read} == {2 if sites == "all" else 1}
    undone = apply_permutations(spec, {"h": invert(planted["h"])}, other.state_dict())
    expected = average([reference.state_dict(), undone])
    assert all(torch.allclose(merged["last"][k], expected[k], atol=1e-6) for k in expected)
    assert not all(torch.allclose(merged["all"][k], expected[k], atol=1e-3) for k in expected)


def test_auto_beta_and_np_merge_read_one_site_per_space_with_last(sites_read):
    from fedmerge.options import NPOptions
    from strategies.merges import MatchedMerge, NPMerge

    reference, other, _, x = planted_pair()
    y = torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(0))
    states, weights = [reference.state_dict(), other.state_dict()], [1.0, 1.0]
    auto = MatchedMerge(reference, _options("dual", "last", **{"match-beta": "auto"}), (x, y))
    _, report = auto(states, weights, reference.state_dict())
    assert "match-beta" in report
    # Every beta of the grid reuses one reading: one batch through the reference and each of
    # the two models, whatever the number of candidates.
    assert len(sites_read) == 3 and all(c == ["second"] for c in sites_read)
    for align in ("reference", "running"):  # align_to_reference / each next model alone
        sites_read.clear()
        npm = NPMerge(
            reference,
            (x, y),
            MatchOptions(method="activation", sites="last"),
            NPOptions(align=align, epochs=1),
        )
        assert npm.match.sites == "last"
        npm(states, weights, reference.state_dict())
        assert sites_read and all(c == ["second"] for c in sites_read)


def test_matched_average_passes_the_sites_on():
    reference, other, planted, x = planted_pair()
    spec = reference.permutation_spec()
    states = [reference.state_dict(), other.state_dict()]
    merged = {
        sites: matched_average(
            states,
            reference=states[0],
            spec=spec,
            options=MatchOptions(method="activation", sites=sites),
            model=reference,
            inputs=x,
        )
        for sites in ("all", "last")
    }
    undone = apply_permutations(spec, {"h": invert(planted["h"])}, states[1])
    expected = average([states[0], undone])
    assert all(torch.equal(merged["last"][k], expected[k]) for k in expected)
    assert not all(torch.equal(merged["all"][k], expected[k]) for k in expected)


def test_merge_experiment_honours_match_sites(monkeypatch, tmp_path, caplog):
    """``fedmerge merge-experiment match-sites=last``: every data-based row matches with the
    last sites, and the key counts as read (no "does not use" warning)."""
    from fedmerge.cli import main
    from fedmerge.experiments import one_shot

    seen: list[str] = []
    real = one_shot._aligned_average

    def activation_only(betas, np_options=None):
        def row(site):
            seen.append(site.sites)
            return real(site, "activation")

        return {"activation matching": row}

    monkeypatch.setattr(one_shot, "merge_methods", activation_only)
    caplog.set_level(logging.WARNING)
    for sites in ("last", "all"):
        args = ["merge-experiment", "dataset=digits", "model=mlp"]
        args += [f"match-sites={sites}", "device=cpu", "--pairs", "0", "--epochs", "1"]
        args += ["--merge-samples", "40", "--out", str(tmp_path / sites)]
        assert main(args) == 0
    assert seen == ["last", "all"]
    assert not [r for r in caplog.records if "does not use" in r.getMessage()]


def test_connectivity_aligns_with_the_run_configs_sites():
    from fedmerge.experiments.connectivity import _aligned

    reference, other, planted, x = planted_pair()
    spec, a, b = reference.permutation_spec(), reference.state_dict(), other.state_dict()
    undone = apply_permutations(spec, {"h": invert(planted["h"])}, b)
    for sites, exact in (("last", True), ("all", False)):
        cfg = RunConfig.from_mapping({"match-sites": sites})
        aligned = _aligned(cfg, reference, a, b, "activation", x)
        assert all(torch.equal(aligned[k], undone[k]) for k in undone) is exact


def test_fedmatch_summary_names_the_sites(monkeypatch):
    import fedmerge.strategies.fedmatch as module

    lines: list[str] = []
    monkeypatch.setattr(module, "log", lambda level, msg, *args: lines.append(msg % args))
    reference, _, _, x = planted_pair()
    strategy = FedMatch(model=reference, proxy=x, options=_options("activation", "last"))
    strategy.summary()
    assert any("sites last" in line for line in lines), lines
