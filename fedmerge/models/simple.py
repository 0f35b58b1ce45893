"""Plain networks: the MLP, NIID-Bench's simple CNN and FedMA's VGG-9."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmerge.errors import ConfigError
from fedmerge.permutations import PermutationSpec

from .common import chain_spec


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
        return chain_spec(self, (), self.layer_names)


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
        return chain_spec(self, ("conv1", "conv2"), ("fc1", "fc2", "fc3"))


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
        return chain_spec(self, convs, ("fc1", "fc2", "fc3"))
