"""Tests of fedmerge.models: shapes, gradients, seeding, reference sizes, norms, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmerge.errors import ConfigError
from fedmerge.models import (
    MODELS,
    NORMS,
    ResNet20,
    SimpleCNN,
    build_model,
    count_parameters,
    parse_hidden,
)

DIGITS = (1, 8, 8)
MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)
VECTOR = (60,)
IMAGE_SHAPES = [DIGITS, MNIST, CIFAR]
CONV_MODELS = [name for name in MODELS if name != "mlp"]
NUM_CLASSES = 7  # not 10, so that a hard-coded class count would show

# Every (model, shape) pair that must build: all models on all image shapes, mlp on vectors.
CASES = [(name, shape) for name in MODELS for shape in IMAGE_SHAPES] + [("mlp", VECTOR)]


def _case_id(case: tuple[str, tuple[int, ...]]) -> str:
    name, shape = case
    return f"{name}-{'x'.join(map(str, shape))}"


def _batch(shape: tuple[int, ...], n: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=generator)


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_registry_names() -> None:
    assert set(MODELS) == {"mlp", "cnn", "vgg9", "resnet20", "vit"}
    assert NORMS == ("batch", "group", "layer")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_shape_finite_and_gradients(case: tuple[str, tuple[int, ...]]) -> None:
    name, shape = case
    model = build_model(name, shape, NUM_CLASSES, seed=0)
    model.train()
    x = _batch(shape)
    x_before = x.clone()
    logits = model(x)
    assert logits.shape == (2, NUM_CLASSES)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert torch.equal(x, x_before)  # the forward must not modify its input
    loss = F.cross_entropy(logits, torch.tensor([0, NUM_CLASSES - 1]))
    loss.backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_same_state_different_seed_different(name: str) -> None:
    a = build_model(name, DIGITS, NUM_CLASSES, seed=3)
    b = build_model(name, DIGITS, NUM_CLASSES, seed=3)
    c = build_model(name, DIGITS, NUM_CLASSES, seed=4)
    _assert_same_state(a, b)
    weights_a = dict(a.named_parameters())
    weights_c = dict(c.named_parameters())
    assert any(not torch.equal(weights_a[k], weights_c[k]) for k in weights_a)


@pytest.mark.parametrize("name", MODELS)
def test_seeded_build_leaves_global_rng_alone(name: str) -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    build_model(name, DIGITS, NUM_CLASSES, seed=0)
    assert torch.equal(torch.get_rng_state(), before)


def test_seeded_build_does_not_seed_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.manual_seed would also reseed every CUDA device, outside fork_rng(devices=[]).
    def forbidden(seed: int) -> None:
        raise AssertionError("build_model reseeded the CUDA generators")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", forbidden)
    monkeypatch.setattr(torch.cuda, "manual_seed", forbidden)
    build_model("cnn", DIGITS, NUM_CLASSES, seed=0)


def test_unseeded_builds_draw_from_global_rng() -> None:
    torch.manual_seed(5)
    a = build_model("cnn", DIGITS, NUM_CLASSES)
    torch.manual_seed(5)
    b = build_model("cnn", DIGITS, NUM_CLASSES)
    _assert_same_state(a, b)


def test_cnn_matches_niid_bench_parameter_counts() -> None:
    # NIID-Bench SimpleCNNMNIST (28x28): flatten 16*4*4.
    mnist = (1 * 6 * 25 + 6) + (6 * 16 * 25 + 16) + (256 * 120 + 120) + (120 * 84 + 84)
    mnist += 84 * 10 + 10
    assert count_parameters(build_model("cnn", MNIST, 10)) == mnist == 44_426
    # NIID-Bench SimpleCNN (32x32 RGB): flatten 16*5*5.
    cifar = (3 * 6 * 25 + 6) + (6 * 16 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84)
    cifar += 84 * 10 + 10
    assert count_parameters(build_model("cnn", CIFAR, 10)) == cifar == 62_006


@pytest.mark.parametrize(
    ("shape", "padding", "flatten"), [(DIGITS, 2, 16 * 2 * 2), (MNIST, 0, 256), (CIFAR, 0, 400)]
)
def test_cnn_padding_and_flatten_size(shape: tuple[int, ...], padding: int, flatten: int) -> None:
    model = build_model("cnn", shape, 10)
    assert isinstance(model, SimpleCNN)
    assert model.padding == padding
    assert model.conv1.padding == (padding, padding)
    assert model.fc1.in_features == flatten
    assert [n for n, _ in model.named_children()] == ["conv1", "conv2", "fc1", "fc2", "fc3"]


@pytest.mark.parametrize(
    ("shape", "flatten"), [(CIFAR, 256 * 4 * 4), (MNIST, 256 * 3 * 3), (DIGITS, 256 * 1 * 1)]
)
def test_vgg9_flatten_size(shape: tuple[int, ...], flatten: int) -> None:
    model = build_model("vgg9", shape, 10)
    assert model.fc1.in_features == flatten


def test_vgg9_matches_fedma_parameter_count() -> None:
    convs = [(3, 32), (32, 64), (64, 128), (128, 128), (128, 256), (256, 256)]
    expected = sum(cin * cout * 9 + cout for cin, cout in convs)
    expected += (4096 * 512 + 512) + (512 * 512 + 512) + (512 * 10 + 10)
    model = build_model("vgg9", CIFAR, 10)
    assert count_parameters(model) == expected == 3_491_530  # FedMA paper, Table (VGG-9)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_resnet20_parameter_count() -> None:
    model = build_model("resnet20", CIFAR, 10)
    conv = 3 * 16 * 9  # stem
    conv += 6 * 16 * 16 * 9  # layer1
    conv += 16 * 32 * 9 + 5 * 32 * 32 * 9  # layer2
    conv += 32 * 64 * 9 + 5 * 64 * 64 * 9  # layer3
    norm = 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)  # weight + bias of 19 norm layers
    option_a = conv + norm + 64 * 10 + 10
    assert option_a == 269_722  # the 0.27M of He et al.
    shortcuts = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)  # option B: 1x1 conv + norm
    assert count_parameters(model) == option_a + shortcuts == 272_474
    assert 0.26e6 < count_parameters(model) < 0.28e6


def test_resnet20_structure_and_width() -> None:
    model = build_model("resnet20", CIFAR, 10, width=2)
    assert isinstance(model, ResNet20)
    stages = (model.layer1, model.layer2, model.layer3)
    for stage, channels in zip(stages, (32, 64, 128), strict=True):
        assert len(stage) == 3
        for block in stage:
            assert block.conv2.out_channels == channels
            assert block.conv1.bias is None and block.conv2.bias is None
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert isinstance(model.layer2[0].shortcut, nn.Sequential)
    assert model.layer2[0].conv1.stride == (2, 2)
    assert model.layer3[0].shortcut.conv.stride == (2, 2)
    assert isinstance(model.layer2[1].shortcut, nn.Identity)
    assert model.fc.in_features == 128
    assert model(_batch(CIFAR)).shape == (2, 10)


@pytest.mark.parametrize("norm", NORMS)
def test_resnet20_norm_options(norm: str) -> None:
    model = build_model("resnet20", DIGITS, 10, norm=norm, norm_groups=4)
    keys = set(model.state_dict())
    for prefix in ("norm1", "layer1.0.norm1", "layer2.2.norm2", "layer3.0.shortcut.norm"):
        assert f"{prefix}.weight" in keys and f"{prefix}.bias" in keys
    assert "layer3.0.shortcut.conv.weight" in keys
    has_stats = any(k.endswith(("running_mean", "running_var")) for k in keys)
    assert has_stats == (norm == "batch")
    if norm == "batch":
        assert isinstance(model.norm1, nn.BatchNorm2d)
        assert "layer1.0.norm1.running_mean" in keys and "layer1.0.norm1.running_var" in keys
    else:
        assert isinstance(model.norm1, nn.GroupNorm)
        assert model.norm1.num_groups == (4 if norm == "group" else 1)
    assert model(_batch(DIGITS)).shape == (2, 10)


def test_resnet20_batch_norm_updates_running_stats_in_train_mode_only() -> None:
    model = build_model("resnet20", DIGITS, 10, seed=0)
    mean0 = model.norm1.running_mean.clone()
    model.eval()
    model(_batch(DIGITS, n=4))
    assert torch.equal(model.norm1.running_mean, mean0)
    model.train()
    model(_batch(DIGITS, n=4))
    assert not torch.equal(model.norm1.running_mean, mean0)
    assert int(model.layer3[2].norm2.num_batches_tracked) == 1


def test_mlp_layers_and_vector_input() -> None:
    model = build_model("mlp", VECTOR, 5, hidden=[32, 16, 8])
    assert [n for n, _ in model.named_children()] == ["fc1", "fc2", "fc3", "fc4"]
    assert model.fc1.in_features == 60 and model.fc4.out_features == 5
    assert build_model("mlp", MNIST, 10).fc1.in_features == 784


@pytest.mark.parametrize(
    ("name", "norm"),
    [
        ("mlp", "batch"),
        ("cnn", "batch"),
        ("vgg9", "batch"),
        ("resnet20", "group"),
        ("vit", "batch"),
    ],
)
def test_functional_call_and_vmap(name: str, norm: str) -> None:
    # Later work evaluates stacks of client models with functional_call + vmap.
    model = build_model(name, DIGITS, 10, norm=norm, seed=0).eval()
    other = build_model(name, DIGITS, 10, norm=norm, seed=1).eval()
    x = _batch(DIGITS)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    out = torch.func.functional_call(model, (params, buffers), (x,))
    assert torch.allclose(out, model(x))
    stacked = {k: torch.stack([v, dict(other.named_parameters())[k]]) for k, v in params.items()}

    def run(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(model, (p, buffers), (x,))

    outs = torch.func.vmap(run)(stacked)
    assert outs.shape == (2, 2, 10)
    assert torch.allclose(outs[0], model(x), atol=1e-5)
    assert torch.allclose(outs[1], other(x), atol=1e-5)


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def _raises(key: str, **kwargs: object) -> ConfigError:
    args = {"name": "resnet20", "input_shape": CIFAR, "num_classes": 10} | kwargs
    with pytest.raises(ConfigError) as info:
        build_model(**args)  # type: ignore[arg-type]
    assert info.value.key == key
    assert f"'{key}'" in str(info.value)
    return info.value


def test_unknown_model_lists_choices() -> None:
    error = _raises("model", name="transformer")
    for name in MODELS:
        assert name in error.allowed


@pytest.mark.parametrize("name", CONV_MODELS)
def test_conv_model_on_vector_input(name: str) -> None:
    error = _raises("model", name=name, input_shape=VECTOR)
    assert error.allowed == "mlp for vector datasets such as synthetic"


@pytest.mark.parametrize(
    ("name", "shape"),
    [("cnn", (1, 3, 3)), ("vgg9", (1, 7, 7)), ("vit", (1, 30, 30)), ("vit", (1, 8, 9))],
)
def test_image_too_small(name: str, shape: tuple[int, ...]) -> None:
    _raises("model", name=name, input_shape=shape)


@pytest.mark.parametrize("width", [0, -1, True, 1.5])
def test_bad_width(width: object) -> None:
    _raises("model-width", width=width)


@pytest.mark.parametrize("norm", ["instance", "Batch", ""])
def test_bad_norm(norm: str) -> None:
    error = _raises("model-norm", norm=norm)
    assert "batch" in error.allowed and "group" in error.allowed and "layer" in error.allowed


def test_group_norm_groups_must_divide_channels() -> None:
    _raises("model-norm", norm="group", norm_groups=3)  # 16 channels
    _raises("model-norm", norm="group", norm_groups=0)
    build_model("resnet20", DIGITS, 10, norm="group", norm_groups=16)


@pytest.mark.parametrize("hidden", [(), (0,), (200, -1), (2.5,), (True,), "200,200", None])
def test_bad_hidden(hidden: object) -> None:
    _raises("mlp-hidden", name="mlp", hidden=hidden)


def test_bad_seed() -> None:
    _raises("seed", seed=-1)
    _raises("seed", seed="0")


def test_malformed_dataset_shape_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        build_model("mlp", (), 10)
    with pytest.raises(ValueError):
        build_model("mlp", VECTOR, 0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("200,200", (200, 200)), (" 64 , 32 ", (64, 32)), ("10", (10,)), (128, (128,))],
)
def test_parse_hidden(text: str | int, expected: tuple[int, ...]) -> None:
    assert parse_hidden(text) == expected


@pytest.mark.parametrize("text", ["", " ", "200,", ",200", "a,b", "2.5", "-3", "0", "+5", True])
def test_parse_hidden_rejects_junk(text: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_hidden(text)  # type: ignore[arg-type]
    assert info.value.key == "mlp-hidden"
