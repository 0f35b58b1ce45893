"""Neuron matchers: weight, activation and dual-space matching, grouped and tied permutations."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmerge.errors import ConfigError
from fedmerge.matching import (
    MATCHERS,
    activation_matching,
    dual_matching,
    match,
    pearson_correlation,
    weight_matching,
    weight_objective,
)
from fedmerge.matching.assignment import _solve_family
from fedmerge.matching.correlation import _PearsonMany, _PearsonSums
from fedmerge.models import MODELS, NORMS, build_model
from fedmerge.options import MatchOptions
from fedmerge.permutations import (
    Axis,
    PermGroup,
    PermutationSpec,
    Site,
    apply_permutations,
    block_order,
    check_permutations,
    identity_permutations,
    random_permutations,
    spec_from_axes,
)

# ---------------------------------------------------------------------------------------------
# Hand-written toy models and specs
# ---------------------------------------------------------------------------------------------


class ToyMLP(nn.Module):
    """3-layer MLP: 10 -> 12 -> 8 -> 3."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(10, 12), nn.Linear(12, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def mlp_spec() -> PermutationSpec:
    axes = {
        "fc1.weight": ("h1", None),
        "fc1.bias": ("h1",),
        "fc2.weight": ("h2", "h1"),
        "fc2.bias": ("h2",),
        "fc3.weight": (None, "h2"),
        "fc3.bias": (None,),
    }
    perms = {
        "h1": PermGroup(12, sites=(Site("fc1", relu=True),)),
        "h2": PermGroup(8, sites=(Site("fc2", relu=True),)),
    }
    return spec_from_axes(axes, perms)


class ToyCNN(nn.Module):
    """conv 3->5, conv 5->6 (stride 2), flatten of 6x4x4, linear -> 4: a flatten repeat of 16."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(torch.flatten(x, 1))


def cnn_spec() -> PermutationSpec:
    axes = {
        "conv1.weight": ("c1", None, None, None),
        "conv1.bias": ("c1",),
        "conv2.weight": ("c2", "c1", None, None),
        "conv2.bias": ("c2",),
        "fc.weight": (None, Axis("c2", 16)),
        "fc.bias": (None,),
    }
    perms = {
        "c1": PermGroup(5, sites=(Site("conv1", relu=True),)),
        "c2": PermGroup(6, sites=(Site("conv2", relu=True),)),
    }
    return spec_from_axes(axes, perms)


HEADS, DQ, DV, EMBED, NORM_GROUPS = 3, 2, 4, 8, 2


class ToyAttention(nn.Module):
    """One multi-head attention (head sizes 2 for q/k, 4 for v) + GroupNorm(2, 8) + head.

    Input tokens ``(N, T, 5)``. The attention output (8 channels) goes through a GroupNorm
    over channels, ReLU, mean over tokens and a linear classifier.
    """

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(5, HEADS * DQ), nn.Linear(5, HEADS * DQ)
        self.v = nn.Linear(5, HEADS * DV)
        self.out = nn.Linear(HEADS * DV, EMBED)
        self.norm = nn.GroupNorm(NORM_GROUPS, EMBED)
        self.head = nn.Linear(EMBED, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape

        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.view(n, t, HEADS, -1).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        attn = torch.softmax(q @ k.transpose(-1, -2) / DQ**0.5, dim=-1)
        h = self.out((attn @ v).transpose(1, 2).reshape(n, t, HEADS * DV))
        h = F.relu(self.norm(h.transpose(1, 2)))  # (N, EMBED, T)
        return self.head(h.mean(dim=2))


def attention_spec() -> PermutationSpec:
    axes = {
        "q.weight": ("qk", None),
        "q.bias": ("qk",),
        "k.weight": ("qk", None),
        "k.bias": ("qk",),
        "v.weight": ("vo", None),
        "v.bias": ("vo",),
        "out.weight": ("e", "vo"),
        "out.bias": ("e",),
        "norm.weight": ("e",),
        "norm.bias": ("e",),
        "head.weight": (None, "e"),
        "head.bias": (None,),
    }
    perms = {
        "qk": PermGroup(HEADS * DQ, HEADS, sites=(Site("q", -1), Site("k", -1))),
        "vo": PermGroup(HEADS * DV, HEADS, tied_to="qk", sites=(Site("v", -1),)),
        "e": PermGroup(EMBED, NORM_GROUPS, sites=(Site("norm", 1, relu=True),)),
    }
    return spec_from_axes(axes, perms)


TOYS = {
    "mlp": (ToyMLP, mlp_spec, (10,)),
    "cnn": (ToyCNN, cnn_spec, (3, 8, 8)),
    "attention": (ToyAttention, attention_spec, (7, 5)),
}


def _toy(name: str, seed: int = 0) -> tuple[nn.Module, PermutationSpec, torch.Tensor]:
    cls, make_spec, shape = TOYS[name]
    with torch.random.fork_rng(devices=[]):  # leave the global RNG to the other tests
        torch.manual_seed(seed)
        model = cls().eval()
    inputs = torch.randn(64, *shape, generator=torch.Generator().manual_seed(seed + 100))
    return model, make_spec(), inputs


def _permuted_copy(model: nn.Module, spec: PermutationSpec, seed: int):
    """A deep copy of ``model`` whose units are randomly permuted, and its state."""
    perms = random_permutations(spec, torch.Generator().manual_seed(seed))
    state = apply_permutations(spec, perms, model.state_dict())
    other = copy.deepcopy(model)
    other.load_state_dict(state)
    return other, state


def _assert_same_state(a, b) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------
# Pearson correlation
# ---------------------------------------------------------------------------------------------


def test_pearson_matches_numpy_corrcoef():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)) * [1, 10, 0.1, 3, 1] + [0, 5, -100, 0, 1e3]
    y = x[:, [2, 0, 1]] + rng.normal(size=(200, 3)) * 0.5
    got = pearson_correlation(torch.tensor(x), torch.tensor(y)).numpy()
    want = np.corrcoef(x, y, rowvar=False)[:5, 5:]
    np.testing.assert_allclose(got, want, atol=1e-9)
    # streaming over uneven chunks gives the same matrix
    sums = _PearsonSums()
    for lo, hi in [(0, 7), (7, 150), (150, 200)]:
        sums.update(torch.tensor(x[lo:hi]).T, torch.tensor(y[lo:hi]).T)  # rows are units
    np.testing.assert_allclose(sums.correlation().numpy(), want, atol=1e-9)


def test_pearson_dead_and_constant_units_give_zero_not_nan():
    x = torch.randn(50, 3)
    x[:, 1] = 0.0  # a dead ReLU unit
    x[:, 2] = 7.25  # a constant unit
    y = torch.cat([x[:, :1] * 2, torch.zeros(50, 1)], dim=1)
    corr = pearson_correlation(x, y)
    assert torch.isfinite(corr).all()
    assert corr[0, 0].item() == pytest.approx(1.0, abs=1e-9)
    assert torch.equal(corr[1:], torch.zeros(2, 2, dtype=torch.float64))
    assert torch.equal(corr[:, 1], torch.zeros(3, dtype=torch.float64))
    every = pearson_correlation(torch.zeros(10, 2), torch.zeros(10, 2))  # all dead
    assert torch.equal(every, torch.zeros(2, 2, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Recovering a planted permutation (toy specs)
# ---------------------------------------------------------------------------------------------


def _run(matcher: str, model, spec, ref_state, other_state, inputs, seed=0, **kw):
    options = MatchOptions(method=matcher, **kw)
    return match(spec, ref_state, other_state, options, model=model, inputs=inputs, seed=seed)


@pytest.mark.parametrize("toy", sorted(TOYS))
@pytest.mark.parametrize(
    ("matcher", "beta"), [("weight", 0.5), ("activation", 0.5), ("dual", 0.5), ("dual", 1.0)]
)
def test_matchers_undo_a_planted_permutation(toy, matcher, beta):
    model, spec, inputs = _toy(toy)
    ref_state = model.state_dict()
    for seed in range(3):
        _, other_state = _permuted_copy(model, spec, seed)
        before = {k: v.clone() for k, v in other_state.items()}
        perms = _run(matcher, model, spec, ref_state, other_state, inputs, beta=beta, seed=seed)
        check_permutations(spec, perms)
        _assert_same_state(apply_permutations(spec, perms, other_state), ref_state)
        _assert_same_state(other_state, before)  # inputs untouched
    _assert_same_state(model.state_dict(), ref_state)


@pytest.mark.parametrize("matcher", ["activation", "dual"])
def test_dead_units_are_still_matched_exactly(matcher):
    """Units dead on every input correlate 0 after the ReLU; pre-activations separate them."""
    model, spec, inputs = _toy("mlp")
    with torch.no_grad():
        model.fc1.bias[[1, 4, 7, 9]] = -100.0  # dead whatever the input
        model.fc2.bias[[0, 5]] = -100.0
    assert (F.relu(model.fc1(inputs))[:, [1, 4, 7, 9]] == 0).all()
    ref_state = model.state_dict()
    _, other_state = _permuted_copy(model, spec, seed=3)
    perms = _run(matcher, model, spec, ref_state, other_state, inputs, beta=0.0)
    _assert_same_state(apply_permutations(spec, perms, other_state), ref_state)


def test_toy_specs_are_function_invariant():
    """Guards the test fixtures: a permuted toy computes the same function."""
    for toy in TOYS:
        model, spec, inputs = _toy(toy)
        other, _ = _permuted_copy(model, spec, seed=1)
        assert torch.allclose(other(inputs), model(inputs), atol=1e-5, rtol=1e-5), toy


# ---------------------------------------------------------------------------------------------
# Grouped and tied permutations
# ---------------------------------------------------------------------------------------------


def test_grouped_solution_respects_blocks_and_ties_on_random_scores():
    spec = attention_spec()
    rng = np.random.default_rng(0)
    for _ in range(5):
        scores = {n: rng.normal(size=(spec.perms[n].size,) * 2) for n in ("qk", "vo")}
        perms = _solve_family(spec, scores)
        perms["e"] = _solve_family(spec, {"e": rng.normal(size=(EMBED, EMBED))})["e"]
        check_permutations(spec, perms)  # valid, blocks kept, qk and vo share block order
        assert torch.equal(
            block_order(spec, "qk", perms["qk"]), block_order(spec, "vo", perms["vo"])
        )


def test_tied_block_order_follows_the_summed_block_scores():
    """qk weakly prefers swapping heads 0 and 1; vo strongly prefers no swap: the tie wins."""
    spec = attention_spec()
    eye = np.eye(HEADS * DQ)
    swap = np.zeros((HEADS * DQ, HEADS * DQ))
    for a, b in [(0, 1), (1, 0), (2, 2)]:
        swap[a * DQ : (a + 1) * DQ, b * DQ : (b + 1) * DQ] = np.eye(DQ)
    qk = swap + 0.9 * eye  # alone: swap wins (total 6 vs 5.4)
    vo = 2.0 * np.eye(HEADS * DV)
    alone = _solve_family(spec, {"qk": qk})["qk"]
    assert block_order(spec, "qk", alone).tolist() == [1, 0, 2]
    tied = _solve_family(spec, {"qk": qk, "vo": vo})
    assert block_order(spec, "qk", tied["qk"]).tolist() == [0, 1, 2]
    assert torch.equal(tied["qk"], torch.arange(HEADS * DQ))
    assert torch.equal(tied["vo"], torch.arange(HEADS * DV))


def test_grouped_matching_recovers_planted_head_and_group_permutation():
    model, spec, inputs = _toy("attention")
    perms = random_permutations(spec, torch.Generator().manual_seed(5))
    assert block_order(spec, "qk", perms["qk"]).tolist() != list(range(HEADS))  # non-trivial
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutations(spec, perms, model.state_dict()))
    for found in (
        weight_matching(spec, model.state_dict(), other.state_dict()),
        activation_matching(spec, model, other, inputs),
        dual_matching(spec, model, other, inputs),
    ):
        # aligning other to model inverts the planted permutation
        for name, perm in perms.items():
            assert torch.equal(perm[found[name]], torch.arange(spec.perms[name].size)), name


# ---------------------------------------------------------------------------------------------
# Weight matching: objective, determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("toy", sorted(TOYS))
def test_weight_matching_objective_never_decreases_and_beats_identity(toy):
    model_a, spec, _ = _toy(toy, seed=0)
    model_b, _, _ = _toy(toy, seed=1)
    a, b = model_a.state_dict(), model_b.state_dict()
    identity = weight_objective(spec, a, b, identity_permutations(spec))
    values = [
        weight_objective(spec, a, b, weight_matching(spec, a, b, max_sweeps=k, seed=3))
        for k in range(6)
    ]
    assert values[0] == pytest.approx(identity)
    assert all(later >= earlier - 1e-9 for earlier, later in itertools.pairwise(values))
    assert values[-1] > identity + 1e-6
    full = weight_matching(spec, a, b, seed=3)
    assert weight_objective(spec, a, b, full) >= values[-1] - 1e-9


def test_weight_matching_is_deterministic_for_a_seed_and_starts_from_init():
    model_a, spec, _ = _toy("cnn", seed=0)
    model_b, _, _ = _toy("cnn", seed=1)
    a, b = model_a.state_dict(), model_b.state_dict()
    first, second = weight_matching(spec, a, b, seed=7), weight_matching(spec, a, b, seed=7)
    assert first.keys() == spec.perms.keys()
    for name in first:
        assert torch.equal(first[name], second[name])
    # starting at a fixed point changes nothing
    again = weight_matching(spec, a, b, seed=11, init=first)
    for name in first:
        assert torch.equal(again[name], first[name])
    with pytest.raises(ValueError, match="init"):
        weight_matching(spec, a, b, init={"c1": torch.zeros(5, dtype=torch.long)})


def test_weight_matching_with_zero_sweeps_returns_the_identity():
    model_a, spec, _ = _toy("mlp", seed=0)
    model_b, _, _ = _toy("mlp", seed=1)
    a, b = model_a.state_dict(), model_b.state_dict()
    zero = weight_matching(spec, a, b, max_sweeps=0)
    for name, perm in zero.items():
        assert torch.equal(perm, torch.arange(spec.perms[name].size))


# ---------------------------------------------------------------------------------------------
# Dual-space matching
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("toy", sorted(TOYS))
def test_dual_with_beta_zero_equals_activation_matching(toy):
    model_a, spec, inputs = _toy(toy, seed=0)
    model_b, _, _ = _toy(toy, seed=1)
    act = activation_matching(spec, model_a, model_b, inputs)
    dual = dual_matching(spec, model_a, model_b, inputs, beta=0.0)
    for name in spec.perms:
        assert torch.equal(act[name], dual[name])


def test_dual_with_beta_one_needs_no_data_and_is_deterministic():
    model_a, spec, _ = _toy("cnn", seed=0)
    model_b, _, _ = _toy("cnn", seed=1)
    a, b = model_a.state_dict(), model_b.state_dict()
    first = match(spec, a, b, MatchOptions(method="dual", beta=1.0), seed=2)
    check_permutations(spec, first)
    same = dual_matching(spec, model_a, model_b, None, beta=1.0, seed=2)
    for name in first:
        assert torch.equal(first[name], same[name])


def test_dual_blends_the_two_spaces():
    """On independent models beta = 0.5 gives a matching of its own: neither the activation
    (beta = 0) nor the weight (beta = 1) solution, so both spaces shape it (observed on the
    toy MLP; differing from one end point only would hold even if beta were ignored)."""
    model_a, spec, inputs = _toy("mlp", seed=0)
    model_b, _, _ = _toy("mlp", seed=1)
    results = [dual_matching(spec, model_a, model_b, inputs, beta=b) for b in (0.0, 0.5, 1.0)]
    for perms in results:
        check_permutations(spec, perms)
    differ = [any(not torch.equal(r[n], results[1][n]) for n in spec.perms) for r in results]
    assert differ[0] and differ[2]


def test_data_based_matchers_restore_train_mode():
    model_a, spec, inputs = _toy("mlp", seed=0)
    model_b, _, _ = _toy("mlp", seed=1)
    model_a.train()
    model_b.fc2.train()  # a mixed state must come back as it was
    activation_matching(spec, model_a, model_b, inputs)
    assert model_a.training and all(m.training for m in model_a.modules())
    assert not model_b.training and model_b.fc2.training


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_match_errors_name_the_problem():
    model, spec, inputs = _toy("mlp")
    state = model.state_dict()
    with pytest.raises(ConfigError, match="'match-method'.*activation, dual, weight"):
        MatchOptions(method="hungarian")
    for beta in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ConfigError, match="'match-beta'"):
            MatchOptions(method="weight", beta=beta)
        with pytest.raises(ConfigError, match="'match-beta'"):
            dual_matching(spec, model, model, inputs, beta=beta)
    with pytest.raises(ConfigError, match="'match-beta'.*select_beta"):
        match(spec, state, state, MatchOptions(method="dual", beta="auto"))
    activation = MatchOptions(method="activation")
    with pytest.raises(ValueError, match="needs inputs"):
        match(spec, state, state, activation, model=model)
    with pytest.raises(ValueError, match="needs model and inputs"):
        match(spec, state, state, MatchOptions(method="dual", beta=0.3))
    with pytest.raises(ValueError, match="needs model"):
        match(spec, state, state, activation, inputs=inputs)
    with pytest.raises(ValueError, match="without activation sites"):
        bare = PermutationSpec(
            perms={name: PermGroup(g.size) for name, g in spec.perms.items()}, axes=spec.axes
        )
        activation_matching(bare, model, model, inputs)
    assert set(MATCHERS) == {"weight", "activation", "dual"}


# ---------------------------------------------------------------------------------------------
# Every registered model (needs fedmerge.models.model_spec)
# ---------------------------------------------------------------------------------------------


def _model_cases() -> list:
    cases = []
    for name in sorted(MODELS):
        norms = NORMS if name == "resnet20" else ("batch",)
        # vgg9's 256x256x3x3 convolutions make its data-free dual matching take ~3-5 s
        marks = [pytest.mark.slow] if name == "vgg9" else []
        cases += [pytest.param(name, norm, marks=marks) for norm in norms]
    return cases


def _input_shape(name: str) -> tuple[int, ...]:
    return {"mlp": (20,), "vgg9": (3, 8, 8)}.get(name, (3, 12, 12))


def _registered(name: str, norm: str, seed: int) -> nn.Module:
    kwargs = {"hidden": (16, 12)} if name == "mlp" else {}
    if name == "resnet20":
        kwargs["norm_groups"] = 4
    model = build_model(name, _input_shape(name), 5, norm=norm, seed=seed, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1000)
    for module in model.modules():  # non-trivial norm parameters and running statistics
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
    return model.eval()


@pytest.mark.parametrize(("name", "norm"), _model_cases())
@pytest.mark.parametrize(
    ("matcher", "beta"), [("weight", 0.5), ("activation", 0.5), ("dual", 0.5), ("dual", 1.0)]
)
def test_registered_models_recover_a_planted_permutation(name, norm, matcher, beta):
    from fedmerge.models import model_spec  # added with the models' permutation specs

    model = _registered(name, norm, seed=0)
    spec = model_spec(model)
    ref_state = model.state_dict()
    inputs = torch.randn(32, *_input_shape(name), generator=torch.Generator().manual_seed(2))
    data = {} if beta == 1.0 else {"model": model, "inputs": inputs}  # beta = 1 is data-free
    for seed in (1, 2):
        _, other_state = _permuted_copy(model, spec, seed=seed)
        options = MatchOptions(method=matcher, beta=beta)
        perms = match(spec, ref_state, other_state, options, seed=seed, **data)
        check_permutations(spec, perms)
        _assert_same_state(apply_permutations(spec, perms, other_state), ref_state)


@pytest.mark.parametrize(("name", "norm"), _model_cases())
def test_registered_models_weight_matching_beats_identity(name, norm):
    from fedmerge.models import model_spec

    a = _registered(name, norm, seed=0).state_dict()
    b = _registered(name, norm, seed=1).state_dict()
    spec = model_spec(_registered(name, norm, seed=0))
    perms = weight_matching(spec, a, b)
    check_permutations(spec, perms)
    identity = weight_objective(spec, a, b, identity_permutations(spec))
    assert weight_objective(spec, a, b, perms) > identity + 1e-6


@pytest.mark.parametrize("matcher", ["weight", "dual"])
def test_running_statistics_are_permuted_but_never_scored(matcher):
    # BatchNorm running statistics describe data, not computation: the reference codes of
    # Git Re-Basin and MuDSC keep them out of the cost and S_w, and so must we.
    from fedmerge.models import model_spec

    model = _registered("resnet20", "batch", seed=0)
    spec = model_spec(model)
    a = model.state_dict()
    b = _registered("resnet20", "batch", seed=1).state_dict()
    scrambled = {k: v.clone() for k, v in b.items()}
    gen = torch.Generator().manual_seed(7)
    for key, value in scrambled.items():  # statistics far from anything the weights say
        if key.endswith(("running_mean", "running_var")):
            value.copy_(torch.rand(value.shape, generator=gen) * 100)
    options = MatchOptions(method=matcher, beta=1.0)  # dual at beta 1: S_w alone, data-free
    perms = match(spec, a, b, options)
    assert all(torch.equal(perms[k], v) for k, v in match(spec, a, scrambled, options).items())
    assert weight_objective(spec, a, b, perms) == weight_objective(spec, a, scrambled, perms)
    # ... and still permuted with the units they describe.
    moved = apply_permutations(spec, perms, scrambled)
    bn = next(k for k in spec.axes if k.endswith("running_mean"))
    (axis,) = spec.axes[bn]
    assert torch.equal(moved[bn], scrambled[bn][perms[axis.perm]])
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20"])
@pytest.mark.parametrize(("matcher", "beta"), [("activation", 0.5), ("dual", 0.5)])
def test_a_shared_reference_pass_gives_each_clients_own_assignment(name, matcher, beta):
    # align_models reads the reference's activations once for all clients; the assignments
    # must be those of reading and matching each client alone (to the bit: same products,
    # same solver).
    from fedmerge.merging import activation_similarities_of, align_models
    from fedmerge.models import model_spec

    shape = (1, 8, 8)
    model = build_model(name, shape, 10, seed=0)
    spec = model_spec(model)
    states = [build_model(name, shape, 10, seed=s).state_dict() for s in (1, 2, 3)]
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(300, *shape, generator=g)
    reference = model.state_dict()
    options = MatchOptions(method=matcher, reference="global", beta=beta)
    together = align_models(
        states, spec=spec, options=options, reference=reference, model=model, inputs=inputs
    )
    for state, aligned in zip(states, together, strict=True):
        # BatchNorm statistics taken from the inputs (resnet20), as align_models reads them
        (sims,) = activation_similarities_of(
            spec, model, reference, [state], inputs, reset_target=True, reset_states=True
        )
        alone = match(spec, reference, state, options, similarities=sims)
        expected = apply_permutations(spec, alone, state)
        assert all(torch.equal(aligned[k], expected[k]) for k in expected)


def test_many_pairs_sharing_one_side_are_each_pairs_own_sums_to_the_bit():
    # The reference's side is converted and summed once for every model; each correlation must
    # be what a _PearsonSums of that pair alone gives (two sites a batch, three batches).
    g = torch.Generator().manual_seed(0)
    batches = [
        [(torch.randn(6, 40, generator=g), [torch.randn(6, 40, generator=g) for _ in range(3)])
         for _site in range(2)]
        for _batch in range(3)
    ]  # fmt: skip
    many = _PearsonMany(3)
    alone = [_PearsonSums() for _ in range(3)]
    for batch in batches:
        many.next_batch()
        for k in range(3):
            for site, (x, ys) in enumerate(batch):
                many.update(k, site, x, ys[k])
                alone[k].update(x, ys[k])
    for k in range(3):
        assert torch.equal(many.correlation(k), alone[k].correlation())
