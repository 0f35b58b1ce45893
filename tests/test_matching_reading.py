"""Reading the activation similarities in one pass per model (fedmerge.matching.reading)
against the streamed float64 reading: same assignments, BatchNorm statistics of each layer's
own eval-mode inputs, float32 products accurate to rounding, the streamed path past the
memory budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmerge import merging
from fedmerge.bench.matching import SHAPES, client_states
from fedmerge.errors import ConfigError
from fedmerge.matching import match, reading
from fedmerge.options import MatchOptions
from fedmerge.permutations import (
    PermGroup,
    Site,
    spec_from_axes,
)


@pytest.mark.parametrize(
    ("name", "reset"),
    [(name, True) for name in SHAPES] + [("cnn", False), ("resnet20", False), ("vit", False)],
)
def test_one_pass_reading_gives_the_streamed_assignments_on_the_registry_models(name, reset):
    model, spec, state, clients = client_states(name, 2, drift=0.05)
    # 256 inputs: with 96, vgg9's 512-unit fc1 has a near-tie (3 units, totals 2e-7 apart)
    # that float32 rounding resolves the other way
    x = torch.randn(256, *SHAPES[name], generator=torch.Generator().manual_seed(2))
    kwargs = {"reset_target": reset, "reset_states": reset}
    fast = merging.activation_similarities_of(
        spec, model, state, clients, x, reading="one-pass", **kwargs
    )
    slow = merging.activation_similarities_of(
        spec, model, state, clients, x, reading="streamed", **kwargs
    )
    for one, other, client in zip(fast, slow, clients, strict=True):
        assert one.keys() == other.keys() == spec.perms.keys()
        for key in one:
            assert one[key].dtype == torch.float64
            # float32 rounding (and, with BatchNorm reset, statistics taken in one pass
            # instead of a train-mode pass over the same single batch)
            torch.testing.assert_close(one[key], other[key], atol=2e-3, rtol=0)
        activation = MatchOptions(method="activation")
        a = match(spec, state, client, activation, similarities=one)
        b = match(spec, state, client, activation, similarities=other)
        assert all(torch.equal(a[k], b[k]) for k in spec.perms)


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))).relu()


def test_one_pass_batchnorm_statistics_are_those_of_each_layers_eval_mode_inputs():
    torch.manual_seed(0)
    model = ConvBN()
    for bn in (model.bn1, model.bn2):  # statistics that are not the inputs'
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(0.1)
    x = torch.randn(8, 2, 4, 4) * 2 + 1
    (out,) = reading._read(model, model.state_dict(), x, [Site("bn2")], reset=True)

    def eval_bn(bn: nn.BatchNorm2d, h: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(h, dim=(0, 2, 3), correction=1)  # unbiased, as torch keeps
        return nn.functional.batch_norm(h, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)

    with torch.no_grad():
        h = torch.relu(eval_bn(model.bn1, model.conv1(x)))
        expected = eval_bn(model.bn2, model.conv2(h))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the template keeps its own statistics
    assert torch.all(model.bn1.running_mean == 3.0) and torch.all(model.bn2.running_var == 0.1)


def test_float32_products_in_chunks_match_float64_to_rounding():
    g = torch.Generator().manual_seed(0)
    # (units, samples) as a channels-last view, mostly positive terms: the case where one
    # float32 accumulator over every sample loses ~1e-4
    a = (torch.relu(torch.randn(300_000, 6, generator=g) + 0.2) - 0.1).T
    b = (a + 0.1 * torch.randn(300_000, 6, generator=g).T).relu()
    exact = a.double() @ b.double().T
    got = reading._products(a, b)
    assert got.dtype == torch.float64
    assert float(((got - exact) / exact.abs()).abs().max()) < 1e-5
    squares = (a.double() ** 2).sum(1)
    assert float(((reading._squares(a) - squares) / squares).abs().max()) < 1e-5


def test_constant_units_correlate_zero_and_never_nan():
    spec = spec_from_axes(
        {"fc.weight": ("h", None), "fc.bias": ("h",)},
        {"h": PermGroup(3, sites=(Site("fc", relu=True),))},
    )

    class Net(nn.Module):
        def __init__(self, bias: float) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            with torch.no_grad():
                self.fc.weight[2].zero_()
                self.fc.bias[2] = bias  # unit 2: dead (bias < 0) or constant (bias > 0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    for bias in (-1.0, 0.5):
        torch.manual_seed(1)
        net = Net(bias)
        state = net.state_dict()
        (sims,) = merging.activation_similarities_of(spec, net, state, [state], x)
        corr = sims["h"]
        assert not torch.isnan(corr).any()
        assert torch.all(corr[2, :2].abs() < 1e-5) and torch.all(corr[:2, 2].abs() < 1e-5)
        assert torch.allclose(torch.diagonal(corr)[:2], torch.ones(2, dtype=torch.float64))


def test_auto_reads_in_one_pass_within_the_budget_and_streams_beyond_it(monkeypatch):
    model, spec, state, clients = client_states("cnn", 1, drift=0.05)
    x = torch.randn(40, *SHAPES["cnn"], generator=torch.Generator().manual_seed(2))
    ways = {
        way: merging.activation_similarities_of(spec, model, state, clients, x, reading=way)
        for way in ("one-pass", "streamed")
    }
    assert not all(torch.equal(ways["one-pass"][0][k], ways["streamed"][0][k]) for k in spec.perms)
    needed = reading.one_pass_bytes(spec, model, x, "all")
    assert needed > 0
    for budget, way in ((needed, "one-pass"), (needed - 1, "streamed")):
        monkeypatch.setattr(reading, "ONE_PASS_BYTES", budget)
        (auto,) = merging.activation_similarities_of(spec, model, state, clients, x)
        assert all(torch.equal(auto[k], ways[way][0][k]) for k in spec.perms), way


def test_an_unknown_reading_names_the_choices():
    model, spec, state, clients = client_states("mlp", 1, drift=0.05)
    x = torch.randn(4, *SHAPES["mlp"])
    with pytest.raises(ConfigError, match="auto, one-pass, streamed"):
        merging.activation_similarities_of(spec, model, state, clients, x, reading="fast")
