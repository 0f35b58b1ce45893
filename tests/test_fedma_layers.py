"""FedMA's layer-wise matching building blocks (fedmerge.fedma): chains, one-shot matching of
whole models by BBP-MAP, and models resized to grown widths."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fedmerge.fedma import FedMAError, chain_layers, match_chain, resized
from fedmerge.models import build_model
from fedmerge.options import FedMAOptions
from fedmerge.permutations import apply_permutations, random_permutations


def _model(name: str, seed: int = 0, shape=(1, 8, 8)):
    options = {"hidden": (12, 10)} if name == "mlp" else {}
    return build_model(name, shape, 10, seed=seed, **options).double()


@pytest.mark.parametrize("name", ["mlp", "cnn", "vgg9"])
def test_chain_models_are_layers_in_forward_order(name: str) -> None:
    model = _model(name)
    spec = model.permutation_spec()
    layers = chain_layers(spec)
    assert [layer.perm for layer in layers] == list(spec.perms)
    for layer, following in itertools.pairwise(layers):
        assert {t for t, _, _ in layer.consumers} <= set(following.producers)


@pytest.mark.parametrize(("name", "reason"), [("resnet20", "residual stream"), ("vit", "blocks")])
def test_models_that_are_no_chain_are_refused_by_name(name: str, reason: str) -> None:
    spec = _model(name).permutation_spec()
    with pytest.raises(FedMAError, match=reason):
        chain_layers(spec)


def test_permuted_copies_are_matched_back_to_one_model() -> None:
    """Three clients holding the same cnn, each with its hidden units permuted: every layer
    keeps its width, and each global unit is the first client's unit, shrunk towards the
    prior exactly as BBP-MAP's posterior mean says: (s0 * mu0 + J * s * w) / (s0 + J * s)."""
    model = _model("cnn")
    spec, state = model.permutation_spec(), model.state_dict()
    generator = torch.Generator().manual_seed(1)
    copies = [state] + [
        apply_permutations(spec, random_permutations(spec, generator), state) for _ in range(2)
    ]
    sigma, sigma0, clients = 0.001, 0.01, 3  # a tight prior: a copy matches, never opens
    options = FedMAOptions(sigma=sigma, sigma0=sigma0)
    result = match_chain(copies, spec, [1.0, 1.0, 1.0], options=options)
    assert result.widths == {name: group.size for name, group in spec.perms.items()}
    assert set(result.new_units.values()) == {0}
    s, s0 = 1 / sigma, 1 / sigma0
    for name, value in state.items():
        if any(name in layer.producers for layer in chain_layers(spec)):
            mu0 = 0.1 if name.endswith(".bias") else 0.0
            expected = (s0 * mu0 + clients * s * value) / (s0 + clients * s)
        else:
            expected = value  # the last layer: the average of three equal copies
        assert torch.allclose(result.state[name], expected, atol=1e-9), name


def test_independent_models_grow_and_the_grown_model_runs() -> None:
    models = [_model("mlp", seed=s) for s in range(3)]
    spec = models[0].permutation_spec()
    result = match_chain([m.state_dict() for m in models], spec, [10.0, 20.0, 30.0])
    assert all(result.widths[p] >= spec.perms[p].size for p in spec.perms)
    assert sum(result.new_units.values()) > 0
    grown = resized(models[0], spec, result.widths)
    grown.load_state_dict(result.state)  # shapes fit
    assert grown.permutation_spec().perms["P_fc1"].size == result.widths["P_fc1"]
    out = grown(torch.randn(4, 1, 8, 8, dtype=torch.float64))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    for perm, assignment in result.assignments.items():
        for a in assignment:
            assert len(set(a.tolist())) == spec.perms[perm].size  # distinct global units
            assert a.max() < result.widths[perm]


def test_fixed_width_keeps_the_model_and_the_last_layer_follows_class_counts() -> None:
    models = [_model("cnn", seed=s) for s in range(2)]
    spec = models[0].permutation_spec()
    counts = [[5, 0] + [1] * 8, [0, 5] + [1] * 8]  # class 0 only at client 0, class 1 at 1
    result = match_chain(
        [m.state_dict() for m in models],
        spec,
        [1.0, 1.0],
        class_counts=counts,
        options=FedMAOptions(grow=False),
    )
    assert result.widths == {name: group.size for name, group in spec.perms.items()}
    resized(models[0], spec, result.widths).load_state_dict(result.state)
    # class 0's output row comes from client 0 alone (its inputs placed at its units' places)
    rows = [m.state_dict()["fc3.weight"] for m in models]
    placed = torch.zeros_like(rows[0])
    placed[:, torch.from_numpy(result.assignments["P_fc2"][0])] = rows[0]
    assert torch.equal(result.state["fc3.weight"][0], placed[0])
    assert torch.equal(
        result.state["fc3.bias"][:2], torch.stack([m.fc3.bias for m in models])[[0, 1], [0, 1]]
    )


def test_a_class_count_table_of_the_wrong_size_is_refused() -> None:
    models = [_model("mlp", seed=s) for s in range(2)]
    spec = models[0].permutation_spec()
    with pytest.raises(ValueError, match="10 rows but 3 class counts"):
        match_chain([m.state_dict() for m in models], spec, [1, 1], class_counts=np.ones((2, 3)))
