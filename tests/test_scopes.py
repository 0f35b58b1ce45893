"""Weight Scope Alignment: scope statistics, the KL regularizer, fusion rules, the strategy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fedmerge.clients.client_app import app as client_app
from fedmerge.strategies.wsa import FedWSA
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedmerge.config import RunConfig
from fedmerge.engine.local import LocalGrid, set_server_identity
from fedmerge.errors import ConfigError
from fedmerge.federation import DataSpec, load_data, make_model
from fedmerge.models import build_model
from fedmerge.results import read_metrics
from fedmerge.runner import run
from fedmerge.scopes import (
    FUSION_RULES,
    Scope,
    WSARegularizer,
    fuse_scopes,
    scope_names,
    scope_of,
    sigma_spread,
    target_from_config,
    target_to_config,
)
from fedmerge.step import gaussian_kl, layer_stats


def test_scope_names_pick_conv_and_linear_weights():
    state = build_model("resnet20", (3, 32, 32), 10, seed=0).state_dict()
    names = scope_names(state)
    assert "conv1.weight" in names and "fc.weight" in names
    assert not any(n.endswith("bias") or "norm" in n for n in names)
    everything = scope_names(state, "all")
    assert "fc.bias" in everything and "norm1.weight" in everything
    assert not any("running_" in n or "num_batches" in n for n in everything)
    with pytest.raises(ConfigError, match="'wsa-layers'"):
        scope_names(state, "some")


def test_kl_is_zero_at_the_target_and_positive_elsewhere():
    mu, s = torch.tensor([0.1, -0.2]), torch.tensor([0.5, 0.05])
    assert gaussian_kl(mu, s, mu, s).item() == pytest.approx(0.0, abs=1e-7)
    for dmu, ds in [(0.1, 0.0), (0.0, 0.2), (-0.3, -0.01)]:
        assert gaussian_kl(mu + dmu, s + ds, mu, s).item() > 0
    # closed form of one layer: log(s_t/s) + (s^2 + (mu - mu_t)^2) / (2 s_t^2) - 1/2
    got = gaussian_kl(
        torch.tensor([0.3]), torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([1.0])
    )
    assert got.item() == pytest.approx(math.log(0.5) + (4 + 0.09) / 2 - 0.5, rel=1e-6)


def test_gradient_moves_the_scope_toward_the_target():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 32) * 0.5 + 0.3)
    target = Scope(("w",), (0.0,), (0.1,))
    mu_t, s_t = target.tensors()
    # Per-element gradients of layer statistics scale with 1 / numel: a large step size.
    opt = torch.optim.SGD([w], lr=10.0)
    gaps = []
    for _ in range(60):
        mu, s = layer_stats([w])
        gaps.append((abs(mu.item() - 0.0), abs(s.item() - 0.1)))
        loss = gaussian_kl(mu, s, mu_t, s_t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert gaps[-1][0] < 0.1 * gaps[0][0] and gaps[-1][1] < 0.1 * gaps[0][1]


@pytest.mark.parametrize("reverse", [False, True])
def test_regularizer_on_a_model(reverse):
    model = build_model("cnn", (1, 28, 28), 10, seed=0)
    state = model.state_dict()
    names = scope_names(state)
    own = scope_of(state, names)
    reg = WSARegularizer(own, lam=0.5, reverse=reverse)
    assert reg(model).item() == pytest.approx(0.0, abs=1e-6)
    shifted = Scope(own.names, tuple(m + 0.05 for m in own.mu), tuple(s * 2 for s in own.sigma))
    value = WSARegularizer(shifted, lam=0.5, reverse=reverse)(model)
    assert value.item() > 0
    value.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in names)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in names)


def test_moment_fusion_equals_the_sampled_mixture():
    rng = np.random.default_rng(0)
    scopes = [
        Scope(("a", "b"), (0.0, 1.0), (1.0, 0.1)),
        Scope(("a", "b"), (2.0, -1.0), (0.5, 0.2)),
        Scope(("a", "b"), (-1.0, 0.5), (2.0, 0.3)),
    ]
    weights = [100, 300, 600]
    fused = fuse_scopes(scopes, weights, "moment")
    n = 2_000_000
    for layer in range(2):
        comp = rng.choice(3, size=n, p=np.array(weights) / 1000)
        mus = np.array([s.mu[layer] for s in scopes])[comp]
        sds = np.array([s.sigma[layer] for s in scopes])[comp]
        sample = rng.normal(mus, sds)
        assert fused.mu[layer] == pytest.approx(sample.mean(), abs=5e-3)
        assert fused.sigma[layer] == pytest.approx(sample.std(), rel=5e-3)


def test_mean_fusion_and_identity_on_identical_scopes():
    s = Scope(("a", "b"), (0.2, -0.1), (0.3, 0.05))
    for rule in ("moment", "mean"):
        fused = fuse_scopes([s, s, s], [1, 5, 2], rule)
        assert fused.mu == pytest.approx(s.mu) and fused.sigma == pytest.approx(s.sigma)
    other = Scope(("a", "b"), (0.4, 0.1), (0.1, 0.15))
    mean = fuse_scopes([s, other], [1, 3], "mean")
    assert mean.mu == pytest.approx((0.35, 0.05)) and mean.sigma == pytest.approx((0.15, 0.125))


def test_global_and_fixed_rules_and_bad_rule():
    s, g, init = (Scope(("a",), (v,), (1.0,)) for v in (0.0, 1.0, 2.0))
    assert fuse_scopes([s], [1], "global", global_scope=g) == g
    assert fuse_scopes([s], [1], "fixed", initial=init) == init
    with pytest.raises(ConfigError, match="'wsa-fusion'"):
        fuse_scopes([s], [1], "median")


def test_sigma_spread():
    stds, rel = sigma_spread([[1.0, 0.1], [3.0, 0.1]])
    assert stds == pytest.approx([1.0, 0.0]) and rel == pytest.approx(0.25)


def test_target_round_trips_through_config():
    s = Scope(("x.weight", "y.weight"), (0.1, 0.2), (0.3, 0.4))
    conf = ConfigRecord(target_to_config(s, 0.01, True))  # Flower accepts every value type
    assert target_from_config(conf) == s
    assert conf["wsa-lambda"] == 0.01 and conf["wsa-reverse"] is True
    assert target_from_config(ConfigRecord({"server-round": 1})) is None


# -- the strategy and the client ---------------------------------------------------------
def _cfg(tmp_path, **over):
    base = {"num-rounds": 2, "num-clients": 4, "model": "cnn", "output-dir": str(tmp_path)}
    return RunConfig.from_mapping({**base, **over})


def test_the_target_travels_in_the_message_and_the_client_applies_it(tmp_path):
    cfg = _cfg(tmp_path)
    model = make_model(cfg, load_data(DataSpec.of(cfg)), seed=0)
    initial = ArrayRecord(model.state_dict())
    grid = LocalGrid(client_app, cfg.to_mapping(), cfg.num_clients)
    set_server_identity(grid.run.run_id)
    strategy = FedWSA(lam=5.0)
    (msg, *_) = list(strategy.configure_train(1, initial, ConfigRecord(), grid))
    target = target_from_config(msg.content["config"])
    assert target == scope_of(model.state_dict(), scope_names(model.state_dict()))
    assert msg.content["config"]["wsa-lambda"] == 5.0

    # A target far from the model's own scope: the client must pull its layers toward it.
    far = Scope(target.names, target.mu, tuple(s * 3 for s in target.sigma))

    def train_with(config):
        m = Message(
            RecordDict({"arrays": initial, "config": ConfigRecord(config)}),
            dst_node_id=1000,
            message_type="train",
        )
        ctx = Context(
            1, 1000, {"partition-id": 0, "num-partitions": 4}, RecordDict(), cfg.to_mapping()
        )
        reply = client_app(m, ctx)
        return scope_of(reply.content["arrays"].to_torch_state_dict(), target.names)

    plain = train_with({"server-round": 1})
    pulled = train_with({"server-round": 1, **target_to_config(far, 5.0, False)})
    gap = lambda s: sum(abs(a - b) for a, b in zip(s.sigma, far.sigma, strict=True))  # noqa: E731
    assert gap(pulled) < 0.5 * gap(plain)


def test_fedwsa_fuses_client_scopes_into_the_next_target(tmp_path):
    def reply(values, n):
        arrays = ArrayRecord([np.asarray(values, dtype=np.float32).reshape(2, 2)])
        return Message(
            RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})}),
            reply_to=request,
        )

    set_server_identity(1)
    request = Message(RecordDict(), dst_node_id=1000, message_type="train")
    request.metadata.__dict__["_message_id"] = "m1"
    strategy = FedWSA(fusion="moment")
    start = ArrayRecord([np.zeros((2, 2), dtype=np.float32)])
    strategy.target = strategy.initial = scope_of(start.to_torch_state_dict(), ("0",))
    a, b = [0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]
    arrays, metrics = strategy.aggregate_train(1, [reply(a, 1), reply(b, 3)])
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0].ravel(), [0.75, 1.0, 1.25, 1.5])
    sa = scope_of({"0": torch.tensor(a)}, ("0",))
    sb = scope_of({"0": torch.tensor(b)}, ("0",))
    expected = fuse_scopes([sa, sb], [1, 3], "moment")
    assert strategy.target.mu == pytest.approx(expected.mu)
    assert strategy.target.sigma == pytest.approx(expected.sigma)
    assert metrics["wsa-target-sigma"] == pytest.approx(list(expected.sigma))


def test_fedwsa_composes_with_a_merge_function(tmp_path):
    calls = []

    def first_client(states, weights, reference):
        calls.append(([dict(s) for s in states], list(weights)))
        return {k: v.clone() for k, v in states[0].items()}

    cfg = _cfg(tmp_path, strategy="fedwsa", num_rounds=1)
    strategy = FedWSA(merge=first_client, fraction_evaluate=0.0)
    model = make_model(cfg, load_data(DataSpec.of(cfg)), seed=0)
    grid = LocalGrid(client_app, cfg.to_mapping(), cfg.num_clients)
    set_server_identity(grid.run.run_id)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=1)
    assert len(calls) == 1 and len(calls[0][0]) == 4
    states, weights = calls[0]
    # The merge function's result is the new global model (not FedAvg's mean) ...
    final = result.arrays.to_torch_state_dict()
    assert final.keys() == states[0].keys()
    assert all(torch.equal(final[k], states[0][k]) for k in final)
    assert not all(torch.equal(final[k], states[1][k]) for k in final)
    # ... and the next target fuses the clients' scopes, not the initial model's scope.
    names = strategy.initial.names
    expected = fuse_scopes(
        [scope_of(s, names) for s in states],
        weights,
        strategy.options.fusion,
        global_scope=scope_of(final, names),
        initial=strategy.initial,
    )
    assert strategy.target.sigma == pytest.approx(expected.sigma)
    assert strategy.target.mu == pytest.approx(expected.mu)
    assert strategy.target.sigma != pytest.approx(strategy.initial.sigma)


@pytest.mark.parametrize("fusion", FUSION_RULES)
def test_fedwsa_runs_end_to_end_with_every_fusion_rule(tmp_path, fusion):
    rows = read_metrics(run(_cfg(tmp_path, strategy="fedwsa", **{"wsa-fusion": fusion}), "local"))
    assert len(rows) == 3
    for row in rows[1:]:
        # Non-IID clients drift apart: their scopes differ every round.
        assert row["scope-spread"] > 0 and len(row["scope-sigma-std"]) == 5
        assert len(row["wsa-target-sigma"]) == 5 and min(row["wsa-target-sigma"]) > 0
    # "fixed" keeps the initial model's scope; every other rule moves the target each round.
    same = rows[1]["wsa-target-sigma"] == rows[2]["wsa-target-sigma"]
    assert same == (fusion == "fixed")
