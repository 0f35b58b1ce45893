"""Local training: the SGD update, determinism, regularizers, evaluation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedmerge.errors import ConfigError
from fedmerge.models import build_model
from fedmerge.training import (
    SGD,
    SGDSettings,
    batches,
    evaluate,
    proximal_term,
    resolve_device,
    train,
)


def _data(n=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize(("momentum", "wd"), [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-2), (0.5, 1e-5)])
def test_sgd_matches_torch_optim_sgd(momentum, wd):
    x, y = _data()
    a = build_model("cnn", (1, 8, 8), 10, seed=1)
    b = build_model("cnn", (1, 8, 8), 10, seed=1)
    ours = SGD(list(a.parameters()), lr=0.05, momentum=momentum, weight_decay=wd)
    ref = torch.optim.SGD(b.parameters(), lr=0.05, momentum=momentum, weight_decay=wd)
    for step in range(5):
        xb, yb = x[step * 10 : step * 10 + 10], y[step * 10 : step * 10 + 10]
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_sgd_with_a_layer_frozen_after_the_first_step_matches_torch_optim_sgd(wd):
    """Momentum buffers belong to their parameters: a layer without gradients for a while (a
    frozen prefix, as FedMA's clients have) keeps its buffer, lends it to no other, and picks
    it up again when unfrozen, as in torch.optim.SGD."""
    x, y = _data()
    a = build_model("cnn", (1, 8, 8), 10, seed=1)
    b = build_model("cnn", (1, 8, 8), 10, seed=1)
    ours = SGD(list(a.parameters()), lr=0.05, momentum=0.9, weight_decay=wd)
    ref = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=wd)
    for step in range(6):
        frozen = 1 <= step <= 3  # conv1 frozen for steps 1-3, trained again after
        for model, opt in ((a, ours), (b, ref)):
            for p in model.conv1.parameters():
                p.requires_grad_(not frozen)
            opt.zero_grad()
            xb, yb = x[step * 10 : step * 10 + 10], y[step * 10 : step * 10 + 10]
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_train_is_deterministic_and_leaves_global_rng_alone():
    x, y = _data()
    states = []
    for _ in range(2):
        model = build_model("vgg9", (1, 8, 8), 10, seed=0)  # has dropout: needs the seeded RNG
        before = torch.get_rng_state()
        train(model, x, y, SGDSettings(2, 16, 0.05, momentum=0.9), seed=7)
        assert torch.equal(before, torch.get_rng_state())
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    other = build_model("vgg9", (1, 8, 8), 10, seed=0)
    train(other, x, y, SGDSettings(2, 16, 0.05, momentum=0.9), seed=8)
    assert not torch.equal(other.state_dict()["fc3.weight"], states[0]["fc3.weight"])


def test_train_reports_steps_examples_and_lowers_the_loss():
    x, y = _data(n=64)
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    first = train(model, x, y, SGDSettings(1, 16, 0.1, momentum=0.9), seed=0)
    assert (first.num_examples, first.steps) == (64, 4)
    later = train(model, x, y, SGDSettings(20, 16, 0.1, momentum=0.9), seed=1)
    assert later.steps == 80 and later.loss < first.loss


def test_final_batch_of_one_is_folded():
    drawn = batches(33, 16, torch.Generator().manual_seed(0))
    assert [len(b) for b in drawn] == [16, 17]
    assert sorted(torch.cat(drawn).tolist()) == list(range(33))
    x, y = _data(n=33)
    model = build_model("resnet20", (1, 8, 8), 10, seed=0)  # BatchNorm: a batch of 1 would fail
    assert train(model, x, y, SGDSettings(1, 16, 0.01), seed=0).steps == 2


def test_proximal_term_is_zero_at_reference_and_pulls_toward_it():
    model = build_model("mlp", (1, 8, 8), 10, hidden=(8,), seed=0)
    ref = [p.detach().clone() for p in model.parameters()]
    term = proximal_term(ref, mu=0.5)
    assert term(model).item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    n = sum(p.numel() for p in model.parameters())
    value = term(model)
    assert value.item() == pytest.approx(0.5 * 0.5 * n)
    value.backward()
    for p in model.parameters():
        torch.testing.assert_close(p.grad, torch.full_like(p, 0.5))


def test_regularizer_changes_training():
    x, y = _data()
    plain = build_model("mlp", (1, 8, 8), 10, seed=0)
    prox = build_model("mlp", (1, 8, 8), 10, seed=0)
    ref = [p.detach().clone() for p in prox.parameters()]
    train(plain, x, y, SGDSettings(3, 10, 0.1), seed=0)
    train(prox, x, y, SGDSettings(3, 10, 0.1), seed=0, regularizers=[proximal_term(ref, 10.0)])

    def dist(m):
        return sum(((p - r) ** 2).sum() for p, r in zip(m.parameters(), ref, strict=True)).item()

    assert dist(prox) < dist(plain)


def test_evaluate_counts_accuracy_exactly():
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    x, _ = _data(n=50)
    with torch.no_grad():
        y = model(x).argmax(1)
    y_wrong = (y + 1) % 10
    loss, acc = evaluate(model, x, y, batch_size=16)
    assert acc == 1.0 and loss > 0
    assert evaluate(model, x, torch.cat([y[:25], y_wrong[25:]]), batch_size=7)[1] == 0.5


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'device'"):
            resolve_device("cuda")


def test_training_seeds_the_cpu_generator_as_torch_manual_seed_does():
    """Dropout draws from the CPU's default generator: the one train() seeds (the cheaper
    way, without torch.manual_seed's bookkeeping for other devices) must hold the state
    torch.manual_seed gives it."""
    from fedmerge.training import _seed_generators

    torch.manual_seed(7)
    expected = torch.rand(5)
    torch.manual_seed(0)
    _seed_generators(7, torch.device("cpu"))
    assert torch.equal(torch.rand(5), expected)


def test_sgd_settings_of_a_run_config_are_its_local_training_with_changes():
    from fedmerge.config import RunConfig

    cfg = RunConfig.from_mapping(
        {"local-epochs": 3, "batch-size": 16, "lr": 0.2, "momentum": 0.5, "weight-decay": 1e-3}
    )
    assert SGDSettings.of(cfg) == SGDSettings(3, 16, 0.2, momentum=0.5, weight_decay=1e-3)
    changed = SGDSettings.of(cfg, epochs=1, lr=0.1)
    assert changed == SGDSettings(1, 16, 0.1, momentum=0.5, weight_decay=1e-3)
