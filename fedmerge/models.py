"""Model registry: builders sized from a dataset's input shape and number of classes.

Every model takes a float32 batch of shape ``(N, *input_shape)`` and returns logits of shape
``(N, num_classes)``. The forward passes are written to be friendly to
:func:`torch.func.functional_call` and :func:`torch.func.vmap`: they never modify their input
in place, never call ``.item()`` and use :func:`torch.nn.functional.relu` (not in place).

Parameter names are part of the API: later code (merging, permutation alignment) refers to
layers by name, so they are kept short and stable (``conv1``, ``fc1``, ``layer2.0.norm1``...).

Every model declares its permutation structure beside it: a ``permutation_spec()`` method
returns a :class:`~fedmerge.permutations.PermutationSpec` computed from the instance (sizes
follow the input shape and options), which :func:`model_spec` returns checked against the
state dict. It covers every state entry (buffers included) and names readable permutations:
``P_fc1`` (mlp, cnn, vgg9 units), ``P_conv1`` (channels), ``P_layer2_res`` (a ResNet residual
stream), ``P_layer2.0_inner`` (a block's inner channels), ``P_res``, ``P_block0_qk``,
``P_block0_vo``, ``P_block0_mlp`` (ViT).

Models
------
``mlp``
    Fully connected network (flatten, one ``Linear`` + ReLU per hidden size, ``Linear``
    output). The only model that accepts vector inputs ``(D,)``.
``cnn``
    NIID-Bench's ``SimpleCNN`` / ``SimpleCNNMNIST`` (Li et al., ICDE 2022).
``vgg9``
    FedMA's "moderate CNN", called VGG-9 in the paper (Wang et al., ICLR 2020).
``resnet20``
    The CIFAR ResNet-20 (He et al., CVPR 2016) with a width multiplier and a choice of
    normalisation layer.
``vit``
    A small pre-norm Vision Transformer (Dosovitskiy et al., ICLR 2021): width
    ``64 * model-width``, 2 blocks, 4 heads, patch size 4 (2 for images below 16x16); separate
    q, k, v layers so attention heads can be permuted.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmerge.errors import ConfigError, unknown_name
from fedmerge.permutations import (
    Axis,
    PermGroup,
    PermutationSpec,
    Site,
    check_spec,
    layer_axes,
)

__all__ = [
    "MLP",
    "MODELS",
    "NORMS",
    "VGG9",
    "BasicBlock",
    "ResNet20",
    "SimpleCNN",
    "ViT",
    "build_model",
    "count_parameters",
    "model_spec",
    "parse_hidden",
]

#: Normalisation layers that ``resnet20`` accepts (run-config key ``model-norm``).
NORMS: tuple[str, ...] = ("batch", "group", "layer")

_VECTOR_HINT = "mlp for vector datasets such as synthetic"
_HIDDEN_ALLOWED = 'comma-separated integers >= 1, e.g. "200,200"'


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def parse_hidden(text: str | int) -> tuple[int, ...]:
    """Parse the ``mlp-hidden`` run-config value into hidden layer sizes.

    Parameters
    ----------
    text : str or int
        Comma-separated positive integers such as ``"200,200"`` (spaces around the commas are
        allowed). A bare integer is accepted too, because Flower parses an override such as
        ``mlp-hidden=200`` as TOML and hands over an ``int``.

    Returns
    -------
    tuple of int
        The hidden layer sizes, in order.

    Raises
    ------
    ConfigError
        On an empty string, an empty item, or an item that is not an integer >= 1.

    Examples
    --------
    >>> parse_hidden("200, 200")
    (200, 200)
    """
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str):
        raise ConfigError("mlp-hidden", text, _HIDDEN_ALLOWED)
    parts = [part.strip() for part in text.split(",")]
    # A strict pattern rather than int(): int() also takes "+5", "1_000" and non-ASCII digits,
    # which are more likely typos than intent in a config file.
    if not parts or any(re.fullmatch(r"[0-9]+", part) is None for part in parts):
        raise ConfigError("mlp-hidden", text, _HIDDEN_ALLOWED)
    return _check_hidden(tuple(int(part) for part in parts))


def count_parameters(model: nn.Module) -> int:
    """Count the scalar parameters of a model (buffers such as BatchNorm statistics excluded).

    Parameters
    ----------
    model : torch.nn.Module
        Any module; shared parameters are counted once.

    Returns
    -------
    int
        The total number of elements over ``model.parameters()``.
    """
    return sum(p.numel() for p in model.parameters())


def _check_hidden(hidden: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """Return ``hidden`` as a tuple; ConfigError('mlp-hidden') unless it holds ints >= 1."""
    if (
        not isinstance(hidden, tuple | list)
        or not hidden
        or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden)
    ):
        raise ConfigError("mlp-hidden", hidden, _HIDDEN_ALLOWED)
    return tuple(hidden)


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Return ``(C, H, W)`` for a convolutional model, or say to use the mlp."""
    if len(input_shape) == 1:
        raise ConfigError("model", name, _VECTOR_HINT)
    if len(input_shape) != 3:
        raise ConfigError(
            "model",
            name,
            f"mlp for inputs of shape {input_shape}",
            hint="Convolutional models need images of shape (channels, height, width)",
        )
    channels, height, width = input_shape
    return channels, height, width


def _make_norm(norm: str, channels: int, groups: int) -> nn.Module:
    """Build the normalisation layer for ``channels`` feature maps.

    ``"layer"`` is ``GroupNorm(1, channels)``: it normalises each sample over (C, H, W) with a
    per-channel affine, which is the usual meaning of layer norm for conv nets.
    """
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "layer":
        return nn.GroupNorm(1, channels)
    if channels % groups != 0:
        raise ConfigError(
            "model-norm",
            norm,
            f"batch or layer, or group when the channel counts are divisible by "
            f"norm_groups={groups}",
            hint=f"A layer has {channels} channels; change model-width or the number of groups",
        )
    return nn.GroupNorm(groups, channels)


def _chain_spec(
    model: nn.Module, convs: tuple[str, ...], linears: tuple[str, ...]
) -> PermutationSpec:
    """Spec of a chain conv..., flatten, linear... with ReLU after every layer but the last."""
    axes: dict[str, tuple[Axis | None, ...]] = {}
    perms: dict[str, PermGroup] = {}
    names = (*convs, *linears)
    previous: Axis | None = None
    for index, name in enumerate(names):
        layer = getattr(model, name)
        if convs and name == linears[0]:
            # Flattening (C, H, W) puts channel c at columns c*H*W .. (c+1)*H*W - 1.
            previous = Axis(
                f"P_{convs[-1]}", layer.in_features // getattr(model, convs[-1]).out_channels
            )
        current = f"P_{name}" if index < len(names) - 1 else None
        axes |= layer_axes(name, layer, current, previous)
        if current is not None:
            size = layer.out_channels if name in convs else layer.out_features
            perms[current] = PermGroup(size, sites=(Site(name, relu=True),))
        previous = None if current is None else Axis(current)
    return PermutationSpec(perms, axes)


def _norm_groups(norm: nn.Module) -> int:
    """Blocks of channels a normalisation layer ties together (1 unless GroupNorm)."""
    return norm.num_groups if isinstance(norm, nn.GroupNorm) else 1


def model_spec(model: nn.Module) -> PermutationSpec:
    """The permutation spec of a model, computed from the instance (sizes follow its shape).

    Parameters
    ----------
    model : torch.nn.Module
        A model with a ``permutation_spec()`` method (every model of :data:`MODELS`).

    Returns
    -------
    PermutationSpec
        Checked against ``model.state_dict()`` with :func:`fedmerge.permutations.check_spec`.

    Raises
    ------
    TypeError
        When the model's class declares no permutation spec.
    """
    method = getattr(model, "permutation_spec", None)
    if not callable(method):
        raise TypeError(f"{type(model).__name__} declares no permutation_spec()")
    spec = method()
    check_spec(spec, model.state_dict())
    return spec


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Fully connected classifier: flatten, ``Linear`` + ReLU per hidden size, ``Linear``.

    Layers are named ``fc1 ... fcK`` with ``K = len(hidden) + 1`` (the last one is the output
    layer), e.g. ``fc1, fc2, fc3`` for ``hidden=(200, 200)``, FedAvg's "2NN".

    Parameters
    ----------
    in_features : int
        Number of input features (product of the input shape).
    num_classes : int
        Number of output logits.
    hidden : tuple of int
        Hidden layer sizes, at least one.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        sizes = (in_features, *hidden, num_classes)
        self.layer_names: tuple[str, ...] = tuple(f"fc{i}" for i in range(1, len(sizes)))
        for name, fan_in, fan_out in zip(self.layer_names, sizes[:-1], sizes[1:], strict=True):
            self.add_module(name, nn.Linear(fan_in, fan_out))

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``(N, num_classes)`` for a batch ``(N, *input_shape)``."""
        x = torch.flatten(x, 1)
        *hidden_names, out_name = self.layer_names
        for name in hidden_names:
            x = F.relu(getattr(self, name)(x))
        return getattr(self, out_name)(x)

    def permutation_spec(self) -> PermutationSpec:
        """``P_fc1 ... P_fc{K-1}``: the units of every hidden layer (output rows are fixed)."""
        return _chain_spec(self, (), self.layer_names)


class SimpleCNN(nn.Module):
    """NIID-Bench's ``SimpleCNN`` (a LeNet-5 variant), sized from the input shape.

    ``conv1`` (C->6, 5x5), ReLU, max-pool 2, ``conv2`` (6->16, 5x5), ReLU, max-pool 2, flatten,
    ``fc1`` (->120), ReLU, ``fc2`` (120->84), ReLU, ``fc3`` (84->num_classes). On 28x28 inputs
    this is exactly NIID-Bench's ``SimpleCNNMNIST`` (flatten size 16*4*4) and on 32x32 inputs
    its ``SimpleCNN`` (16*5*5).

    Deviation for small inputs: when unpadded 5x5 convolutions would shrink the image to
    nothing (height or width below 16, e.g. the 8x8 scikit-learn digits), both convolutions
    use ``padding=2`` so they preserve the size: 8x8 -> 8 -> 4 -> 4 -> 2, flatten 16*2*2.
    The chosen padding is exposed as :attr:`padding`.

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, H, W)``.
    num_classes : int
        Number of output logits.

    Raises
    ------
    ConfigError
        (key ``model``) when the image is smaller than 4x4 even with padding.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape

        def out_size(size: int, padding: int) -> int:
            # conv 5x5 (stride 1), pool 2, conv 5x5, pool 2; pooling floors like MaxPool2d.
            return ((size + 2 * padding - 4) // 2 + 2 * padding - 4) // 2

        self.padding: int = 0 if min(out_size(height, 0), out_size(width, 0)) >= 1 else 2
        out_h, out_w = out_size(height, self.padding), out_size(width, self.padding)
        if min(out_h, out_w) < 1:
            raise ConfigError(
                "model",
                "cnn",
                f"mlp or resnet20 for {height}x{width} images",
                hint="cnn needs images of at least 4x4",
            )
        self.conv1 = nn.Conv2d(channels, 6, 5, padding=self.padding)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=self.padding)
        self.fc1 = nn.Linear(16 * out_h * out_w, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``(N, num_classes)`` for a batch ``(N, C, H, W)``."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)

    def permutation_spec(self) -> PermutationSpec:
        """``P_conv1``, ``P_conv2`` (channels), ``P_fc1``, ``P_fc2`` (units)."""
        return _chain_spec(self, ("conv1", "conv2"), ("fc1", "fc2", "fc3"))


class VGG9(nn.Module):
    """FedMA's "moderate CNN" (VGG-9 in Wang et al., ICLR 2020; IBM/FedMA ``ModerateCNN``).

    Six 3x3 convolutions (padding 1, with bias, no normalisation) and three linear layers::

        conv1 C->32, ReLU, conv2 32->64, ReLU, max-pool 2
        conv3 64->128, ReLU, conv4 128->128, ReLU, max-pool 2, Dropout2d(0.05)
        conv5 128->256, ReLU, conv6 256->256, ReLU, max-pool 2
        flatten, Dropout(0.1), fc1 ->512, ReLU, fc2 512->512, ReLU, Dropout(0.1),
        fc3 512->num_classes

    The flatten size follows the input: 256*4*4 = 4096 for 32x32 (the paper's 3,491,530
    parameters with 10 classes), 256*3*3 for 28x28, 256*1*1 for 8x8.

    The dropout layers draw random numbers in training mode: under :func:`torch.func.vmap`
    pass ``randomness="different"`` or ``"same"``, or evaluate in ``eval()`` mode.

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, H, W)``.
    num_classes : int
        Number of output logits.

    Raises
    ------
    ConfigError
        (key ``model``) when the image is smaller than 8x8 (three 2x2 poolings).
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        out_h, out_w = height // 8, width // 8
        if min(out_h, out_w) < 1:
            raise ConfigError(
                "model",
                "vgg9",
                f"mlp, cnn or resnet20 for {height}x{width} images",
                hint="vgg9 needs images of at least 8x8",
            )
        self.conv1 = nn.Conv2d(channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.conv4 = nn.Conv2d(128, 128, 3, padding=1)
        self.conv5 = nn.Conv2d(128, 256, 3, padding=1)
        self.conv6 = nn.Conv2d(256, 256, 3, padding=1)
        self.conv_dropout = nn.Dropout2d(0.05)
        self.fc_dropout1 = nn.Dropout(0.1)
        self.fc1 = nn.Linear(256 * out_h * out_w, 512)
        self.fc2 = nn.Linear(512, 512)
        self.fc_dropout2 = nn.Dropout(0.1)
        self.fc3 = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``(N, num_classes)`` for a batch ``(N, C, H, W)``."""
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        x = F.max_pool2d(F.relu(self.conv4(x)), 2)
        x = self.conv_dropout(x)
        x = F.relu(self.conv5(x))
        x = F.max_pool2d(F.relu(self.conv6(x)), 2)
        x = self.fc_dropout1(torch.flatten(x, 1))
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(self.fc_dropout2(x))

    def permutation_spec(self) -> PermutationSpec:
        """``P_conv1 ... P_conv6`` (channels), ``P_fc1``, ``P_fc2`` (units)."""
        convs = tuple(f"conv{i}" for i in range(1, 7))
        return _chain_spec(self, convs, ("fc1", "fc2", "fc3"))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with normalisation and a shortcut.

    ``out = relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x))``. The shortcut is the
    identity when the shape is unchanged, otherwise a ``Sequential`` named ``conv`` (1x1,
    strided, no bias) + ``norm`` ("option B" of He et al.), so its parameters are
    ``shortcut.conv.weight``, ``shortcut.norm.weight``...

    Parameters
    ----------
    in_channels, out_channels : int
        Channels in and out.
    stride : int
        Stride of ``conv1`` and of the shortcut.
    norm : str
        One of :data:`NORMS`.
    norm_groups : int
        Number of groups when ``norm == "group"``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, norm: str, norm_groups: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.norm1 = _make_norm(norm, out_channels, norm_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.norm2 = _make_norm(norm, out_channels, norm_groups)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                    norm=_make_norm(norm, out_channels, norm_groups),
                )
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``(N, C_in, H, W)``."""
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """The CIFAR ResNet-20 of He et al. (2016), with a width multiplier and a norm choice.

    Stem ``conv1`` (3x3, ``16*width``) + ``norm1`` + ReLU, then ``layer1``, ``layer2``,
    ``layer3`` (``nn.Sequential`` of 3 :class:`BasicBlock` each) with ``16, 32, 64`` times
    ``width`` channels, stride 2 at the first block of ``layer2`` and ``layer3``, global
    average pooling and ``fc``. Convolutions have no bias (the normalisation has one).
    Shortcuts that change shape are 1x1 convolutions + norm (option B), so with ``width=1``
    and 10 classes the model has 272,474 parameters (269,722 for the option-A original).

    Convolutions use Kaiming-normal initialisation (fan-out, as torchvision's ResNets);
    norm layers start at weight 1, bias 0.

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, H, W)``; any spatial size works (the pooling is global).
    num_classes : int
        Number of output logits.
    width : int
        Channel multiplier, >= 1.
    norm : str
        ``"batch"`` (``BatchNorm2d``, with running statistics), ``"group"``
        (``GroupNorm(norm_groups, C)``) or ``"layer"`` (``GroupNorm(1, C)``: normalises each
        sample over C, H, W with a per-channel affine). Group and layer norm have no buffers,
        which makes them the choice for :func:`torch.func.vmap` in training mode.
    norm_groups : int
        Number of groups for ``norm="group"``; must divide ``16 * width``.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        width: int = 1,
        norm: str = "batch",
        norm_groups: int = 2,
    ) -> None:
        super().__init__()
        channels = input_shape[0]
        widths = (16 * width, 32 * width, 64 * width)
        self.conv1 = nn.Conv2d(channels, widths[0], 3, 1, padding=1, bias=False)
        self.norm1 = _make_norm(norm, widths[0], norm_groups)
        in_channels = widths[0]
        stages: list[nn.Sequential] = []
        for stage, out_channels in enumerate(widths):
            blocks = []
            for index in range(3):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(in_channels, out_channels, stride, norm, norm_groups))
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(widths[2], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``(N, num_classes)`` for a batch ``(N, C, H, W)``."""
        x = F.relu(self.norm1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        # A mean rather than AdaptiveAvgPool2d: same result, and plain reductions are the
        # simplest thing for torch.func transforms.
        return self.fc(x.mean(dim=(2, 3)))

    def permutation_spec(self) -> PermutationSpec:
        """Residual streams ``P_layer{s}_res`` and inner channels ``P_layer{s}.{b}_inner``.

        A residual stream is shared by everything added to it: the stem (``conv1``,
        ``norm1``) for ``layer1``, the projection shortcut for ``layer2``/``layer3``, every
        block's ``conv2``/``norm2``, and consumed by the next blocks' ``conv1`` and shortcut
        inputs (including the strided first block of the next stage) and by ``fc``. With group
        norm every permutation moves channels only with their group (``num_groups``).
        Activations: every block output of the stage (post-ReLU), plus the stem for
        ``layer1``; the inner channels at ``norm1`` (+ ReLU).
        """
        groups = _norm_groups(self.norm1)
        stream = "P_layer1_res"
        axes = layer_axes("conv1", self.conv1, stream) | layer_axes("norm1", self.norm1, stream)
        sizes = {stream: self.conv1.out_channels}
        sites: dict[str, list[Site]] = {stream: [Site("norm1", relu=True)]}
        for stage_index, stage in enumerate((self.layer1, self.layer2, self.layer3), start=1):
            for block_index, block in enumerate(stage):
                prefix = f"layer{stage_index}.{block_index}"
                source = stream
                if isinstance(block.shortcut, nn.Sequential):  # a new stream starts here
                    stream = f"P_layer{stage_index}_res"
                    shortcut = block.shortcut
                    axes |= layer_axes(f"{prefix}.shortcut.conv", shortcut.conv, stream, source)
                    axes |= layer_axes(f"{prefix}.shortcut.norm", shortcut.norm, stream)
                inner = f"P_{prefix}_inner"
                axes |= layer_axes(f"{prefix}.conv1", block.conv1, inner, source)
                axes |= layer_axes(f"{prefix}.norm1", block.norm1, inner)
                axes |= layer_axes(f"{prefix}.conv2", block.conv2, stream, inner)
                axes |= layer_axes(f"{prefix}.norm2", block.norm2, stream)
                sizes[stream] = block.conv2.out_channels
                sizes[inner] = block.conv1.out_channels
                sites[inner] = [Site(f"{prefix}.norm1", relu=True)]
                sites.setdefault(stream, []).append(Site(prefix))
        axes |= layer_axes("fc", self.fc, None, stream)
        perms = {
            name: PermGroup(size, num_groups=groups, sites=tuple(sites[name]))
            for name, size in sizes.items()
        }
        return PermutationSpec(perms, axes)


class Attention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v`` and ``proj`` linear layers.

    Separate layers (rather than one fused ``qkv``) let the rows of q, k and v be permuted
    independently. Plain matmul + softmax, so :func:`torch.func.vmap` and float64 work.

    Parameters
    ----------
    dim : int
        Token width.
    heads : int
        Number of heads; must divide ``dim``.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"{heads} heads do not divide the width {dim}")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Apply attention to tokens ``(N, T, dim)``."""

        def split(t: Tensor) -> Tensor:  # (N, T, dim) -> (N, heads, T, dim / heads)
            return t.unflatten(-1, (self.heads, -1)).transpose(-3, -2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        weights = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((weights @ v).transpose(-3, -2).flatten(-2))


class FeedForward(nn.Module):
    """Token-wise MLP ``fc2(act(fc1(x)))`` with a GELU module (its output is a Site)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Apply to tokens ``(N, T, dim)``."""
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Apply to tokens ``(N, T, dim)``; the output is the residual stream."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small pre-norm Vision Transformer (Dosovitskiy et al., ICLR 2021) for CPU-sized runs.

    ``patch`` (``Conv2d`` C->dim, kernel = stride = patch size) turns the image into
    ``T = (H/p)(W/p)`` tokens; a learned ``cls`` token ``(1, 1, dim)`` is prepended and a
    learned position embedding ``pos`` ``(1, T+1, dim)`` added; then ``depth``
    :class:`TransformerBlock` (``blocks.{i}.norm1``, ``.attn.q/k/v/proj``, ``.norm2``,
    ``.mlp.fc1``, ``.mlp.act`` (GELU), ``.mlp.fc2``), a final LayerNorm ``norm`` and ``head``
    on the cls token. No dropout. ``cls`` and ``pos`` start from a normal(0, 0.02) truncated
    at +-2 std (0.04); linear layers keep PyTorch's default initialisation.

    The registry's ``vit`` uses ``dim = 64 * width``, ``mlp_dim = 128 * width`` (run-config
    ``model-width``), ``depth = 2``, ``heads = 4`` and patch size 4 for images of at least
    16x16 (28x28, 32x32), 2 below (8x8 digits); it has 72,074 parameters on 28x28 with 10
    classes.

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, H, W)``.
    num_classes : int
        Number of output logits.
    dim, depth, heads, mlp_dim : int
        Token width, number of blocks, attention heads (must divide ``dim``), MLP hidden size.
    patch_size : int, optional
        Side of the square patches; by default 4 for images of at least 16x16, else 2.

    Raises
    ------
    ConfigError
        (key ``model``) when the patch size does not divide the image height and width.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_dim: int = 128,
        patch_size: int | None = None,
    ) -> None:
        super().__init__()
        channels, height, width = input_shape
        if patch_size is None:
            patch_size = 4 if min(height, width) >= 16 else 2
        if height % patch_size or width % patch_size:
            raise ConfigError(
                "model",
                "vit",
                f"mlp, cnn or resnet20 for {height}x{width} images",
                hint=f"vit needs image sides divisible by its patch size {patch_size}",
            )
        tokens = (height // patch_size) * (width // patch_size)
        self.heads = heads
        self.patch = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for param in (self.cls, self.pos):
            nn.init.trunc_normal_(param, std=0.02, a=-0.04, b=0.04)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``(N, num_classes)`` for a batch ``(N, C, H, W)``."""
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (N, T, dim)
        cls = self.cls.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])

    def permutation_spec(self) -> PermutationSpec:
        """Stream ``P_res``; per block ``P_block{i}_qk``, ``P_block{i}_vo``, ``P_block{i}_mlp``.

        ``P_res`` indexes every tensor that writes to or reads from the stream (patch rows,
        ``cls``/``pos`` features, every LayerNorm, q/k/v/fc1 columns, proj/fc2 rows, head
        columns); LayerNorm over the features commutes with a consistent permutation of them.
        ``P_block{i}_qk`` (q and k rows) and ``P_block{i}_vo`` (v rows, proj columns) are
        grouped by head (``num_groups = heads``) and share their block order (``vo`` is tied
        to ``qk``): heads move as wholes and together, units move only inside a head.
        Activations: block outputs (``P_res``), q and k outputs, v outputs, the GELU output.
        ``attn.k.bias`` is permuted with ``P_block{i}_qk`` like every key row, although it
        has no effect on the function (it shifts all scores of a query alike, which the
        softmax cancels).
        """
        res = "P_res"
        dim = self.patch.out_channels
        axes = layer_axes("patch", self.patch, res)
        axes |= {"cls": (None, None, Axis(res)), "pos": (None, None, Axis(res))}
        perms: dict[str, PermGroup] = {}
        for index, block in enumerate(self.blocks):
            prefix, name = f"blocks.{index}", f"P_block{index}"
            qk, vo, mlp = f"{name}_qk", f"{name}_vo", f"{name}_mlp"
            attn = f"{prefix}.attn"
            axes |= layer_axes(f"{prefix}.norm1", block.norm1, res)
            axes |= layer_axes(f"{attn}.q", block.attn.q, qk, res)
            axes |= layer_axes(f"{attn}.k", block.attn.k, qk, res)
            axes |= layer_axes(f"{attn}.v", block.attn.v, vo, res)
            axes |= layer_axes(f"{attn}.proj", block.attn.proj, res, vo)
            axes |= layer_axes(f"{prefix}.norm2", block.norm2, res)
            axes |= layer_axes(f"{prefix}.mlp.fc1", block.mlp.fc1, mlp, res)
            axes |= layer_axes(f"{prefix}.mlp.fc2", block.mlp.fc2, res, mlp)
            perms[qk] = PermGroup(
                dim, self.heads, sites=(Site(f"{attn}.q", -1), Site(f"{attn}.k", -1))
            )
            perms[vo] = PermGroup(dim, self.heads, tied_to=qk, sites=(Site(f"{attn}.v", -1),))
            perms[mlp] = PermGroup(
                block.mlp.fc1.out_features, sites=(Site(f"{prefix}.mlp.act", -1),)
            )
        axes |= layer_axes("norm", self.norm, res) | layer_axes("head", self.head, None, res)
        sites = tuple(Site(f"blocks.{i}", -1) for i in range(len(self.blocks)))
        return PermutationSpec({res: PermGroup(dim, sites=sites), **perms}, axes)


# ---------------------------------------------------------------------------------------------
# Builders and registry
# ---------------------------------------------------------------------------------------------
# Every builder has the same signature so that build_model can call any of them; each uses the
# options that apply to it and ignores the others (width shapes resnet20 and vit, norm only
# resnet20).


def _build_mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int,
    norm: str,
    hidden: tuple[int, ...],
    norm_groups: int,
) -> nn.Module:
    """Fully connected network; accepts any input shape (it is flattened)."""
    del width, norm, norm_groups  # uniform registry signature
    return MLP(math.prod(input_shape), num_classes, hidden)


def _build_cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int,
    norm: str,
    hidden: tuple[int, ...],
    norm_groups: int,
) -> nn.Module:
    """NIID-Bench SimpleCNN (2 conv + 3 fc)."""
    del width, norm, hidden, norm_groups  # uniform registry signature
    return SimpleCNN(_image_shape("cnn", input_shape), num_classes)


def _build_vgg9(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int,
    norm: str,
    hidden: tuple[int, ...],
    norm_groups: int,
) -> nn.Module:
    """FedMA's VGG-9 ("moderate CNN", 6 conv + 3 fc, no normalisation)."""
    del width, norm, hidden, norm_groups  # uniform registry signature
    return VGG9(_image_shape("vgg9", input_shape), num_classes)


def _build_resnet20(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int,
    norm: str,
    hidden: tuple[int, ...],
    norm_groups: int,
) -> nn.Module:
    """CIFAR ResNet-20 with width multiplier and batch/group/layer norm."""
    del hidden  # uniform registry signature
    return ResNet20(_image_shape("resnet20", input_shape), num_classes, width, norm, norm_groups)


def _build_vit(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int,
    norm: str,
    hidden: tuple[int, ...],
    norm_groups: int,
) -> nn.Module:
    """Small pre-norm Vision Transformer (2 blocks, 4 heads, width 64 x model-width)."""
    del norm, hidden, norm_groups  # uniform registry signature
    shape = _image_shape("vit", input_shape)
    return ViT(shape, num_classes, dim=64 * width, mlp_dim=128 * width)


#: Model builders by name. Each is called as
#: ``builder(input_shape, num_classes, *, width, norm, hidden, norm_groups)``; prefer
#: :func:`build_model`, which validates the options and handles the seed.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _build_mlp,
    "cnn": _build_cnn,
    "vgg9": _build_vgg9,
    "resnet20": _build_resnet20,
    "vit": _build_vit,
}


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int = 1,
    norm: str = "batch",
    hidden: tuple[int, ...] = (200, 200),
    norm_groups: int = 2,
    seed: int | None = None,
) -> nn.Module:
    """Build a registered model for inputs of ``input_shape`` and ``num_classes`` classes.

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`: ``"mlp"``, ``"cnn"``, ``"vgg9"``, ``"resnet20"`` or
        ``"vit"`` (run-config key ``model``).
    input_shape : tuple of int
        Shape of one example: ``(C, H, W)`` for images, ``(D,)`` for vectors (mlp only).
    num_classes : int
        Number of output logits.
    width : int, default 1
        Channel multiplier of ``resnet20`` and width multiplier of ``vit`` (run-config key
        ``model-width``); checked for every model but used only by those two.
    norm : str, default "batch"
        Normalisation of ``resnet20``: ``"batch"``, ``"group"`` or ``"layer"`` (run-config
        key ``model-norm``); checked for every model but used only by ``resnet20``.
    hidden : tuple of int, default (200, 200)
        Hidden layer sizes of ``mlp``, a tuple or list (run-config key ``mlp-hidden``, see
        :func:`parse_hidden`); checked for every model but used only by ``mlp``.
    norm_groups : int, default 2
        Groups of ``norm="group"``; must divide every channel count (``16 * width``).
    seed : int, optional
        Seed of the initialisation. The model is then built under a forked CPU RNG, so the
        same seed gives an identical state dict and the caller's global RNG state is left
        untouched. With ``None`` the model draws from (and advances) the global RNG.

    Returns
    -------
    torch.nn.Module
        The model, on CPU, in float32 and in training mode. It maps ``(N, *input_shape)`` to
        logits ``(N, num_classes)``.

    Raises
    ------
    ConfigError
        Naming ``model`` (unknown name, a convolutional model on vector inputs, images too
        small or, for ``vit``, not divisible by the patch size), ``model-width``,
        ``model-norm`` (unknown norm, or group norm whose groups do not divide the channels),
        ``mlp-hidden`` or ``seed``.
    ValueError
        When ``input_shape`` or ``num_classes`` is malformed (a dataset bug, not a config one).
    """
    if name not in MODELS:
        raise unknown_name("model", name, MODELS)
    input_shape = tuple(input_shape)
    if not input_shape or any(
        isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in input_shape
    ):
        raise ValueError(f"input_shape must be a non-empty tuple of ints >= 1, got {input_shape}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError("model-width", width, "an integer >= 1")
    if norm not in NORMS:
        raise unknown_name("model-norm", norm, NORMS)
    if isinstance(norm_groups, bool) or not isinstance(norm_groups, int) or norm_groups < 1:
        raise ConfigError(
            "model-norm", norm_groups, "a number of groups >= 1 (norm_groups of group norm)"
        )
    hidden = _check_hidden(hidden)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ConfigError("seed", seed, "an integer >= 0")

    builder = MODELS[name]
    options = {"width": width, "norm": norm, "hidden": hidden, "norm_groups": norm_groups}
    if seed is None:
        return builder(input_shape, num_classes, **options)
    # Modules are initialised on CPU, so forking the CPU generator alone is enough; seeding it
    # directly (instead of torch.manual_seed) also leaves the CUDA/MPS generators untouched.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return builder(input_shape, num_classes, **options)
