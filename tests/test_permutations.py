"""Permutation specs of every registered model, and the helpers of fedmerge.permutations.

The model tests are parametrized over :data:`fedmerge.models.MODELS`, so a new model is tested
(and fails until it declares a spec) automatically. Function invariance runs in float64 so that
any wrong axis shows as a difference far above rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmerge.models import MODELS, NORMS, ViT, build_model, model_spec
from fedmerge.permutations import (
    Axis,
    PermGroup,
    PermutationSpec,
    Site,
    apply_permutations,
    block_order,
    check_permutations,
    check_spec,
    compose,
    identity_permutations,
    invert,
    is_valid_permutation,
    layer_axes,
    random_permutations,
    spec_from_axes,
)

NUM_CLASSES = 7
# Small inputs that still exercise a flatten repeat (cnn: 16 channels x 2x2, vgg9: 256 x 2x2).
SHAPES = {"mlp": (1, 8, 8), "cnn": (1, 8, 8), "resnet20": (3, 8, 8), "vit": (1, 8, 8)}
DEFAULT_SHAPE = (3, 16, 16)
OPTIONS: dict[str, list[dict]] = {
    "mlp": [{"hidden": (24, 16, 12)}],
    "resnet20": [{"norm": norm, "norm_groups": 4} for norm in NORMS],
}
CASES = [
    pytest.param(
        name,
        SHAPES.get(name, DEFAULT_SHAPE),
        options,
        id=f"{name}-{options['norm']}" if "norm" in options else name,
    )
    for name in MODELS
    for options in OPTIONS.get(name, [{}])
]
# The cases whose specs have grouped permutations (GroupNorm groups, attention heads).
GROUPED = [
    pytest.param("resnet20", (3, 8, 8), {"norm": "group", "norm_groups": 4}, id="resnet20-group"),
    pytest.param("vit", (1, 8, 8), {}, id="vit"),
]


def _model(name: str, shape: tuple[int, ...], options: dict, seed: int = 0) -> nn.Module:
    """A float64 model in eval mode whose 1-D entries (biases, norms, BN statistics) are random.

    Norm layers start at weight 1, bias 0 and BN statistics at 0 / 1: permuting constant
    vectors changes nothing, so a wrong axis on them would go unnoticed without this.
    """
    model = build_model(name, shape, NUM_CLASSES, seed=seed, **options).double().eval()
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed + 1000)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point() and value.ndim == 1:
            noise = torch.rand if key.endswith("running_var") else torch.randn
            drawn = noise(value.shape, generator=generator, dtype=value.dtype)
            value = 0.5 + drawn if key.endswith("running_var") else value + 0.3 * drawn
        state[key] = value
    model.load_state_dict(state)
    return model


def _inputs(shape: tuple[int, ...], n: int = 6) -> Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _run(model: nn.Module, state: dict[str, Tensor], x: Tensor) -> Tensor:
    """The model's output with every parameter and buffer taken from ``state``."""
    return torch.func.functional_call(model, state, (x,))


def _differs(a: Tensor, b: Tensor) -> bool:
    """Far beyond float64 rounding, relative to the output scale."""
    return bool((a - b).abs().max() > 1e-6 * b.abs().max())


def _perms(spec: PermutationSpec, seed: int = 0) -> dict[str, Tensor]:
    perms = random_permutations(spec, torch.Generator().manual_seed(seed))
    for name, perm in perms.items():  # an identity would make the checks below vacuous
        assert not torch.equal(perm, torch.arange(len(perm))), name
    return perms


def _without_axis(spec: PermutationSpec, tensor: str, dim: int) -> PermutationSpec:
    axes = dict(spec.axes)
    axes[tensor] = tuple(None if d == dim else a for d, a in enumerate(axes[tensor]))
    return PermutationSpec(spec.perms, axes)


# ---------------------------------------------------------------------------------------------
# Every registered model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "shape", "options"), CASES)
def test_spec_covers_every_state_entry(name: str, shape: tuple[int, ...], options: dict) -> None:
    model = build_model(name, shape, NUM_CLASSES, seed=0, **options)
    spec = model_spec(model)
    state = model.state_dict()
    check_spec(spec, state)
    assert set(spec.axes) == set(state)
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            assert spec.axes[key] == ()
        assert len(spec.axes[key]) == value.ndim, key
    for perm, group in spec.perms.items():
        assert group.sites, f"{perm} declares no activation site"
        assert perm.startswith("P_")


@pytest.mark.parametrize(("name", "shape", "options"), CASES)
def test_random_permutation_keeps_the_function(
    name: str, shape: tuple[int, ...], options: dict
) -> None:
    model = _model(name, shape, options)
    spec, state, x = model_spec(model), model.state_dict(), _inputs(shape)
    perms = _perms(spec)
    check_permutations(spec, perms)
    permuted = apply_permutations(spec, perms, state)
    moved = [k for k in state if not torch.equal(state[k], permuted[k])]
    assert len(moved) >= len(spec.perms)  # the weights really moved
    out = model(x)
    torch.testing.assert_close(
        _run(model, permuted, x), out, rtol=0, atol=1e-10 * float(out.abs().max())
    )


@pytest.mark.parametrize(("name", "shape", "options"), CASES)
def test_permuting_one_axis_alone_changes_the_function(
    name: str, shape: tuple[int, ...], options: dict
) -> None:
    # Permute everything but one tensor axis: every declared axis must matter, which shows
    # that the invariance test can fail.
    model = _model(name, shape, options)
    spec, state, x = model_spec(model), model.state_dict(), _inputs(shape)
    perms, out = _perms(spec), model(x)
    for perm in spec.perms:
        for tensor, dim in spec.touching(perm):
            if tensor.endswith("attn.k.bias"):
                # The key bias adds q . b_k to every score of a query alike, which softmax
                # cancels: it has no effect at all, so neither has its permutation.
                continue
            wrong = apply_permutations(_without_axis(spec, tensor, dim), perms, state)
            assert _differs(_run(model, wrong, x), out), f"{perm} on {tensor} axis {dim}"


@pytest.mark.parametrize(("name", "shape", "options"), GROUPED)
def test_groups_and_ties_are_needed(name: str, shape: tuple[int, ...], options: dict) -> None:
    model = _model(name, shape, options)
    spec, state, x = model_spec(model), model.state_dict(), _inputs(shape)
    perms, out = _perms(spec), model(x)
    generator = torch.Generator().manual_seed(3)
    grouped = [n for n, g in spec.perms.items() if g.num_groups > 1]
    assert grouped
    for perm in grouped:
        free = torch.randperm(spec.perms[perm].size, generator=generator)
        assert not is_valid_permutation(spec, perm, free)
        wrong = apply_permutations(spec, perms | {perm: free}, state)
        assert _differs(_run(model, wrong, x), out), f"{perm} across blocks"
    for perm, group in spec.perms.items():
        if group.tied_to is None:
            continue
        untied = _with_block_order(perms[perm], group, block_order(spec, perm, perms[perm]).roll(1))
        assert is_valid_permutation(spec, perm, untied)
        with pytest.raises(ValueError, match=perm):
            check_permutations(spec, perms | {perm: untied})
        wrong = apply_permutations(spec, perms | {perm: untied}, state)
        assert _differs(_run(model, wrong, x), out), f"{perm} untied from {group.tied_to}"
    if name == "vit":
        assert [n for n, g in spec.perms.items() if g.tied_to] == ["P_block0_vo", "P_block1_vo"]


def _with_block_order(perm: Tensor, group: PermGroup, blocks: Tensor) -> Tensor:
    """``perm`` with its within-block orders kept and its blocks moved to ``blocks``."""
    size = group.group_size
    within = perm.view(group.num_groups, size) % size
    return (blocks[:, None] * size + within).reshape(-1)


@pytest.mark.parametrize(("name", "shape", "options"), CASES)
def test_sites_hold_the_units_of_their_permutation(
    name: str, shape: tuple[int, ...], options: dict
) -> None:
    model = _model(name, shape, options)
    spec, x = model_spec(model), _inputs(shape)
    perms = _perms(spec)
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(apply_permutations(spec, perms, model.state_dict()))
    sites = [(perm, site) for perm, group in spec.perms.items() for site in group.sites]
    before, after = _activations(model, sites, x), _activations(permuted, sites, x)
    for perm, site in sites:
        size = spec.perms[perm].size
        assert before[site].shape[site.axis] == size, (perm, site)
        # The permuted model's unit i is the original's unit perm[i].
        expected = before[site].index_select(site.axis % before[site].ndim, perms[perm])
        torch.testing.assert_close(after[site], expected, msg=f"{perm} at {site}")


def _activations(model: nn.Module, sites: list[tuple[str, Site]], x: Tensor) -> dict:
    modules = dict(model.named_modules())
    found: dict[Site, Tensor] = {}
    handles = []
    for _, site in sites:
        assert site.module in modules, f"no module {site.module}"

        def hook(_m: nn.Module, _i: object, output: Tensor, site: Site = site) -> None:
            found[site] = F.relu(output) if site.relu else output

        handles.append(modules[site.module].register_forward_hook(hook))
    model(x)
    for handle in handles:
        handle.remove()
    return found


def test_model_spec_needs_a_declared_spec() -> None:
    with pytest.raises(TypeError, match="Sequential"):
        model_spec(nn.Sequential(nn.Linear(2, 2)))


def test_permutation_names() -> None:
    shape = (3, 16, 16)
    expected = {
        "mlp": ["P_fc1", "P_fc2"],
        "cnn": ["P_conv1", "P_conv2", "P_fc1", "P_fc2"],
        "vgg9": [f"P_conv{i}" for i in range(1, 7)] + ["P_fc1", "P_fc2"],
        "vit": ["P_res"] + [f"P_block{i}_{s}" for i in range(2) for s in ("qk", "vo", "mlp")],
    }
    for name, names in expected.items():
        assert list(model_spec(build_model(name, shape, 10)).perms) == names
    resnet = model_spec(build_model("resnet20", shape, 10)).perms
    streams = [f"P_layer{s}_res" for s in (1, 2, 3)]
    inner = [f"P_layer{s}.{b}_inner" for s in (1, 2, 3) for b in range(3)]
    assert sorted(resnet) == sorted(streams + inner)
    assert resnet["P_layer2_res"].sites == tuple(Site(f"layer2.{b}") for b in range(3))
    assert resnet["P_layer1_res"].sites[0] == Site("norm1", relu=True)


def test_resnet_streams_feed_the_next_stage() -> None:
    spec = model_spec(build_model("resnet20", (3, 8, 8), 10, norm="group", norm_groups=4))
    assert spec.axes["layer2.0.conv1.weight"][1] == Axis("P_layer1_res")
    assert spec.axes["layer2.0.shortcut.conv.weight"][:2] == (
        Axis("P_layer2_res"),
        Axis("P_layer1_res"),
    )
    assert spec.axes["layer3.2.conv1.weight"][:2] == (
        Axis("P_layer3.2_inner"),
        Axis("P_layer3_res"),
    )
    assert spec.axes["fc.weight"] == (None, Axis("P_layer3_res"))
    assert all(g.num_groups == 4 for g in spec.perms.values())
    layer = model_spec(build_model("resnet20", (3, 8, 8), 10, norm="layer"))
    assert all(g.num_groups == 1 for g in layer.perms.values())


# ---------------------------------------------------------------------------------------------
# Helpers of fedmerge.permutations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "shape", "options"), GROUPED)
def test_random_permutations_respect_blocks_and_ties(
    name: str, shape: tuple[int, ...], options: dict
) -> None:
    spec = model_spec(build_model(name, shape, 10, **options))
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        perms = random_permutations(spec, generator)
        assert set(perms) == set(spec.perms)
        for perm, value in perms.items():
            assert is_valid_permutation(spec, perm, value), perm
            root = spec.block_order_root(perm)
            assert torch.equal(block_order(spec, perm, value), block_order(spec, root, perms[root]))
        check_permutations(spec, perms)
    again = random_permutations(spec, torch.Generator().manual_seed(5))
    same = random_permutations(spec, torch.Generator().manual_seed(5))
    assert all(torch.equal(again[k], same[k]) for k in spec.perms)


def test_check_permutations_names_the_culprit() -> None:
    spec = model_spec(build_model("vit", (1, 8, 8), 10))
    perms = random_permutations(spec, torch.Generator().manual_seed(0))
    check_permutations(spec, perms)
    bad = {
        "P_res": perms["P_res"][:-1],  # wrong size
        "P_block0_mlp": perms["P_block0_mlp"].to(torch.int32),
        "P_block1_qk": perms["P_block1_qk"].roll(1),  # moves a unit to another head
    }
    for perm, value in bad.items():
        with pytest.raises(ValueError, match=perm):
            check_permutations(spec, perms | {perm: value})
    with pytest.raises(ValueError, match="P_block1_vo"):
        check_permutations(spec, {k: v for k, v in perms.items() if k != "P_block1_vo"})
    check_permutations(spec, {"P_res": perms["P_res"]}, complete=False)
    with pytest.raises(ValueError, match="P_nope"):
        check_permutations(spec, perms | {"P_nope": perms["P_res"]})


def _cnn_state() -> tuple[PermutationSpec, dict[str, Tensor]]:
    model = build_model("cnn", (1, 8, 8), 10, seed=0)
    return model_spec(model), model.state_dict()


def test_apply_permutations_does_not_touch_its_input() -> None:
    spec, state = _cnn_state()
    before = {k: v.clone() for k, v in state.items()}
    out = apply_permutations(spec, _perms(spec), state)
    assert all(torch.equal(state[k], before[k]) for k in state)
    for value in out.values():
        value.add_(1.0)  # the copy owns its memory
    assert all(torch.equal(state[k], before[k]) for k in state)
    identity = apply_permutations(spec, identity_permutations(spec), state)
    assert all(torch.equal(identity[k], state[k]) for k in state)


def test_invert_and_compose() -> None:
    spec, state = _cnn_state()
    p, q = _perms(spec, 1), _perms(spec, 2)
    back = apply_permutations(
        spec, {k: invert(v) for k, v in p.items()}, apply_permutations(spec, p, state)
    )
    assert all(torch.equal(back[k], state[k]) for k in state)
    twice = apply_permutations(spec, q, apply_permutations(spec, p, state))
    once = apply_permutations(spec, {k: compose(p[k], q[k]) for k in p}, state)
    assert all(torch.equal(twice[k], once[k]) for k in state)
    assert any(not torch.equal(twice[k], state[k]) for k in state)


def test_check_spec_rejects_wrong_specs_naming_the_tensor() -> None:
    spec, state = _cnn_state()
    axes = dict(spec.axes)

    def rejects(tensor: str, **change: tuple) -> None:
        with pytest.raises(ValueError, match=tensor.replace(".", r"\.")):
            check_spec(spec_from_axes({**axes, **change}, spec.perms), state)

    rejects("fc1.weight", **{"fc1.weight": ("P_fc1", Axis("P_conv2", 3))})  # wrong repeat
    rejects("conv2.weight", **{"conv2.weight": ("P_conv1", "P_conv2", None, None)})  # swapped
    rejects("fc2.bias", **{"fc2.bias": ("P_fc2", None)})  # one axis too many
    rejects("fc3.bias", **{"fc3.bias": ("P_fc2",)})  # 10 classes, not 84 units
    with pytest.raises(ValueError, match="conv1.bias"):
        check_spec(
            spec_from_axes({k: v for k, v in axes.items() if k != "conv1.bias"}, spec.perms), state
        )
    with pytest.raises(ValueError, match="extra.weight"):
        check_spec(spec_from_axes({**axes, "extra.weight": (None,)}, spec.perms), state)


def test_layer_axes() -> None:
    bn = layer_axes("n", nn.BatchNorm2d(4), "P")
    assert bn == {
        "n.weight": (Axis("P"),),
        "n.bias": (Axis("P"),),
        "n.running_mean": (Axis("P"),),
        "n.running_var": (Axis("P"),),
        "n.num_batches_tracked": (),
    }
    assert layer_axes("c", nn.Conv2d(3, 4, 3, bias=False), "P", Axis("Q", 2)) == {
        "c.weight": (Axis("P"), Axis("Q", 2), None, None)
    }
    assert layer_axes("l", nn.Linear(3, 4), None, "Q") == {
        "l.weight": (None, Axis("Q")),
        "l.bias": (None,),
    }
    assert set(layer_axes("g", nn.GroupNorm(2, 4), "P")) == {"g.weight", "g.bias"}
    for module in (nn.Embedding(3, 4), nn.Conv2d(4, 4, 3, groups=2), nn.LayerNorm((2, 3))):
        with pytest.raises(TypeError):
            layer_axes("m", module, "P")
    with pytest.raises(TypeError):
        layer_axes("n", nn.LayerNorm(4), "P", "Q")


# ---------------------------------------------------------------------------------------------
# The ViT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "patch", "tokens"), [((1, 28, 28), 4, 49), ((3, 32, 32), 4, 64), ((1, 8, 8), 2, 16)]
)
def test_vit_shapes(shape: tuple[int, ...], patch: int, tokens: int) -> None:
    model = build_model("vit", shape, NUM_CLASSES, seed=0)
    assert isinstance(model, ViT)
    assert model.patch.kernel_size == (patch, patch) and model.patch.stride == (patch, patch)
    assert model.pos.shape == (1, tokens + 1, 64) and model.cls.shape == (1, 1, 64)
    assert len(model.blocks) == 2 and model.heads == 4
    assert model(torch.randn(3, *shape)).shape == (3, NUM_CLASSES)
    wide = build_model("vit", shape, NUM_CLASSES, width=2)
    assert wide.blocks[0].attn.q.out_features == 128 and wide.blocks[0].mlp.fc1.out_features == 256
    assert 0 < model.pos.abs().max() <= 0.04 and 0 < model.cls.abs().max() <= 0.04


def test_vit_functional_call_and_training_step() -> None:
    model = build_model("vit", (1, 8, 8), NUM_CLASSES, seed=0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 8, 8, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (16,), generator=generator)
    params = {k: v.detach() for k, v in model.named_parameters()}
    torch.testing.assert_close(torch.func.functional_call(model, params, (x,)), model(x))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = F.cross_entropy(model(x), y)
    for _ in range(10):
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
    assert F.cross_entropy(model(x), y) < 0.8 * first
