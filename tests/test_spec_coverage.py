"""Inferred specs on the models users bring, the cases that were once accepted and wrong, and
the check that keeps a wrong spec from being returned (fedmerge.spec_inference).

Every exactness check runs the model in float64 and eval mode, with BatchNorm statistics and
norm affines made non-trivial, under a random permutation drawn with another seed than the
inference's own check.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.func import functional_call

from fedmerge.bench.spec_coverage import MODELS, VOCAB
from fedmerge.permutations import PermutationSpec, apply_permutations, random_permutations
from fedmerge.spec_inference import SpecInferenceError, infer_spec
from fedmerge.spec_inference import walker as spec_walker

M = torchvision.models
#: The coverage table's models (docs/flower-apps.md): all but ShuffleNet are accepted.
ACCEPTED = [name for name in MODELS if not name.startswith("shufflenet")]


def _inputs(shape: tuple[int, ...], n: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    if len(shape) == 1:
        return torch.randint(0, VOCAB, (n, *shape), generator=generator)
    return torch.randn(n, *shape, generator=generator)


def _prepared(factory, shape: tuple[int, ...]) -> tuple[nn.Module, Tensor]:
    """A float64 eval-mode model with moved BatchNorm statistics and perturbed 1-D entries."""
    torch.manual_seed(0)
    model = factory().double()
    x = _inputs(shape, 3, 1)
    x = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        model.train()(x)
    model.eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(2)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point() and value.ndim == 1:
            drawn = torch.rand(value.shape, generator=generator, dtype=value.dtype)
            value = value * (0.5 + drawn) if key.endswith("running_var") else value + drawn - 0.5
        state[key] = value
    model.load_state_dict(state)
    return model, x


def _exact(model: nn.Module, spec: PermutationSpec, inputs: tuple, seed: int = 11) -> float:
    """Largest output change (relative) under a random permutation of every space."""
    state = model.state_dict()
    first: dict[int, str] = {}
    names = {first.setdefault(id(t), k) for k, t in model.state_dict(keep_vars=True).items()}
    perms = random_permutations(spec, torch.Generator().manual_seed(seed))
    permuted = apply_permutations(spec, perms, state)
    assert any(not torch.equal(permuted[k], state[k]) for k in state), "nothing moved"
    with torch.no_grad():
        before = functional_call(model, {k: state[k] for k in names}, inputs)
        after = functional_call(model, {k: permuted[k] for k in names}, inputs)
    return float((after - before).abs().max() / before.abs().max())


# ---------------------------------------------------------------------------------------------
# The models people bring
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ACCEPTED)
def test_models_people_bring_are_accepted_and_exact(name: str) -> None:
    factory, shape = MODELS[name]
    model, x = _prepared(factory, shape)
    spec = infer_spec(model, x[:2])
    assert len(spec.perms) >= 2
    assert _exact(model, spec, (x,)) <= 1e-10


def test_the_inference_check_sees_every_permutation_family() -> None:
    """On the model the check guards, permuting the spec is exact, and a spec with one
    wrong axis is refused by the same check."""
    from fedmerge.spec_inference.check import check_inferred

    small = (lambda: M.DenseNet(4, (2, 2), 8, bn_size=2, num_classes=10), (3, 16, 16))
    model, x = _prepared(*small)
    spec = infer_spec(model, x[:2])
    tensor = "features.denseblock1.denselayer2.conv1.weight"
    entry = spec.axes[tensor]
    broken = dict(spec.axes)
    broken[tensor] = (entry[0], None, None, None)  # the concatenated input left unpermuted
    wrong = PermutationSpec(spec.perms, broken)
    with pytest.raises(SpecInferenceError, match="Permutations at fault") as info:
        check_inferred(wrong, model, (x[:2],))
    assert "P_features.denseblock1.denselayer1.conv2" in str(info.value)


def test_shufflenet_stays_refused_naming_the_channel_shuffle() -> None:
    model = M.shufflenet_v2_x0_5(weights=None, num_classes=10)
    with pytest.raises(SpecInferenceError, match="channel shuffle") as info:
        infer_spec(model, torch.randn(2, 3, 32, 32))
    assert "permutation_spec()" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Cases once accepted with a wrong spec: each must be exact without the check's help
# ---------------------------------------------------------------------------------------------


class TensorBound(nn.Module):
    """``clamp`` with per-unit tensor bounds: a parameter (min) and a buffer (max)."""

    def __init__(self, method: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)
        self.lo = nn.Parameter(torch.linspace(-0.6, 0.2, 8))
        self.register_buffer("hi", torch.linspace(0.1, 0.9, 8))
        self.method = method

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        h = h.clip(min=self.lo, max=self.hi) if self.method else torch.clamp(h, self.lo, self.hi)
        return self.b(h)


class TiedToUnruledLayer(nn.Module):
    """An EmbeddingBag (no rule) sharing its weight with the output Linear (followed)."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(10, 8)
        self.fc, self.mid = nn.Linear(6, 12), nn.Linear(12, 8)
        self.out = nn.Linear(8, 10, bias=False)
        self.out.weight = self.bag.weight
        self.mix = nn.Parameter(torch.randn(8, 10))

    def forward(self, x: Tensor, bag_indices: Tensor) -> Tensor:
        h = self.mid(torch.relu(self.fc(x)))  # fc's units are free; mid's meet the tied weight
        return self.out(torch.relu(h)) + self.bag(bag_indices) @ self.mix


class AcrossHeads(nn.Module):
    """An op across the two head blocks of a space that keeps the within-head axis."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.a, self.b, self.c, self.op = nn.Linear(5, 8), nn.Linear(8, 6), nn.Linear(6, 3), op

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        n = h.shape[0]
        h = h.view(n, 2, 4)
        if self.op == "mean":
            h = h - h.mean(1, keepdim=True)
        elif self.op == "sum":
            h = h * torch.sigmoid(h.sum(1, keepdim=True))
        elif self.op == "amax":
            h = h - h.amax(1, keepdim=True)
        else:
            h = h.softmax(1)
        return self.c(torch.relu(self.b(h.reshape(n, 8))))  # b's units stay free


class EvalOnly(nn.Module):
    """A parameter used only in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)
        self.c = nn.Parameter(torch.linspace(0.5, 1.5, 8))

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        if not self.training:
            h = h * self.c
        return self.b(torch.tanh(h))


ONCE_WRONG = {
    "clamp-tensor-bounds": (lambda: TensorBound(), ((4, 5),)),
    "clip-method-bounds": (lambda: TensorBound(method=True), ((4, 5),)),
    "tied-to-a-layer-without-rule": (TiedToUnruledLayer, ((4, 6), "bag")),
    **{
        f"{op}-across-heads": (lambda op=op: AcrossHeads(op), ((4, 5),))
        for op in ("mean", "sum", "amax", "softmax")
    },
    "eval-only-parameter": (EvalOnly, ((4, 5),)),
}


def _once_wrong(case: str) -> tuple[nn.Module, tuple]:
    factory, shapes = ONCE_WRONG[case]
    torch.manual_seed(0)
    model = factory().double()
    generator = torch.Generator().manual_seed(1)
    inputs = tuple(
        torch.randint(0, 10, (4, 3), generator=generator)
        if shape == "bag"
        else torch.randn(*shape, generator=generator, dtype=torch.float64)
        for shape in shapes
    )
    return model, inputs


@pytest.mark.parametrize("case", ONCE_WRONG)
def test_once_wrong_cases_are_exact_by_their_rules(case: str) -> None:
    model, inputs = _once_wrong(case)
    model.train()  # a fresh template is in train mode: tracing must not follow that branch
    spec = infer_spec(model, inputs, check=False)  # the rules alone, without the net
    assert _exact(model.eval(), spec, inputs) <= 1e-10, case


def test_once_wrong_cases_keep_what_can_move() -> None:
    """The fixes are not blanket refusals: the bound joins the units, the eval-only scale
    is permuted with them; only the tied weight and the mixed heads fix their spaces."""
    model, inputs = _once_wrong("clamp-tensor-bounds")
    spec = infer_spec(model, inputs)
    assert list(spec.perms) == ["P_a"]
    assert spec.axes["lo"] == spec.axes["hi"] == spec.axes["a.bias"]
    model, inputs = _once_wrong("eval-only-parameter")
    assert infer_spec(model.train(), inputs).axes["c"] == infer_spec(model, inputs).axes["a.bias"]
    assert model.training
    model, inputs = _once_wrong("tied-to-a-layer-without-rule")
    assert list(infer_spec(model, inputs).perms) == ["P_fc"]
    model, inputs = _once_wrong("mean-across-heads")
    assert list(infer_spec(model, inputs).perms) == ["P_b"]


# ---------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------


def _old_keep(self, node):  # the rule before tensor bounds joined: only the input is read
    x = self.tensor(node.args[0])
    return spec_walker._T(tuple(self.spaces.norm(a) for a in x.ann), self.out_shape(node))


def test_the_check_catches_a_rule_that_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the tensor-bound rule removed, the rules return a wrong spec; the check refuses
    it, naming the permutations at fault."""
    monkeypatch.setattr(spec_walker._Walk, "keep", _old_keep)
    model, inputs = _once_wrong("clamp-tensor-bounds")
    wrong = infer_spec(model, inputs, check=False)
    assert _exact(model, wrong, inputs) > 1e-3  # the rules alone are wrong here
    with pytest.raises(SpecInferenceError, match="is wrong") as info:
        infer_spec(model, inputs)
    message = str(info.value)
    assert "P_a" in message and "permutation_spec()" in message
    assert "batch of 1" not in message
    with pytest.raises(SpecInferenceError, match="batch of 1"):
        infer_spec(model, inputs[0][:1])


def test_a_batch_of_one_is_accepted() -> None:
    model, inputs = _once_wrong("clamp-tensor-bounds")
    assert infer_spec(model, inputs[0][:1]) == infer_spec(model, inputs)


def test_non_finite_outputs_make_the_check_inconclusive() -> None:
    class Overflow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(F.relu(self.a(x))) / 0.0

    with pytest.raises(SpecInferenceError, match="inconclusive"):
        infer_spec(Overflow(), torch.ones(2, 3))
    assert infer_spec(Overflow(), torch.ones(2, 3), check=False).perms


def test_the_check_leaves_the_model_untouched() -> None:
    model = M.resnet18(weights=None, num_classes=10)
    before = copy.deepcopy(model.state_dict())
    infer_spec(model, torch.randn(2, 3, 32, 32))
    assert model.training
    assert all(
        v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point()
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_check_catches_attention_heads_that_are_not_kept_in_blocks(monkeypatch):
    """A fifth case, not one of the four above: with the rule that keeps nn.MultiheadAttention's
    units in head blocks removed, the rules return permutations that move units across heads;
    the check refuses the spec and names the attention permutations."""
    from fedmerge.spec_inference import layers as spec_layers

    real = spec_layers._Inference.attention_units

    def ungrouped(self, node, *args):
        out = real(self, node, *args)
        self.spaces.groups = [g for g in self.spaces.groups if g[2] is not node]
        return out

    torch.manual_seed(0)
    model = MODELS["transformer-encoder"][0]().double().eval()
    tokens = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    assert _exact(model, infer_spec(model, tokens), (tokens,)) <= 1e-10  # the rule in place
    monkeypatch.setattr(spec_layers._Inference, "attention_units", ungrouped)
    wrong = infer_spec(model, tokens, check=False)
    assert all(g.num_groups == 1 for g in wrong.perms.values())
    assert _exact(model, wrong, (tokens,)) > 1e-3
    with pytest.raises(SpecInferenceError, match=r"is wrong.*self_attn\.(qk|v)"):
        infer_spec(model, tokens)
