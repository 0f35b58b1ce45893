"""The CIFAR ResNet-20 (He et al., CVPR 2016) with batch, group or layer normalisation."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import cast

import torch.nn.functional as F
from torch import Tensor, nn

from fedmerge.permutations import PermGroup, PermutationSpec, Site, layer_axes

from .common import channel_groups, make_norm


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
        self.norm1 = make_norm(norm, out_channels, norm_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_channels, norm_groups)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                    norm=make_norm(norm, out_channels, norm_groups),
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
        self.norm1 = make_norm(norm, widths[0], norm_groups)
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
        groups = channel_groups(self.norm1)
        stream = "P_layer1_res"
        axes = layer_axes("conv1", self.conv1, stream) | layer_axes("norm1", self.norm1, stream)
        sizes = {stream: self.conv1.out_channels}
        sites: dict[str, list[Site]] = {stream: [Site("norm1", relu=True)]}
        for stage_index, stage in enumerate((self.layer1, self.layer2, self.layer3), start=1):
            for block_index, block in enumerate(cast(Iterable[BasicBlock], stage)):
                prefix = f"layer{stage_index}.{block_index}"
                source = stream
                if isinstance(block.shortcut, nn.Sequential):  # a new stream starts here
                    stream = f"P_layer{stage_index}_res"
                    shortcut = block.shortcut
                    conv, norm = cast(nn.Module, shortcut.conv), cast(nn.Module, shortcut.norm)
                    axes |= layer_axes(f"{prefix}.shortcut.conv", conv, stream, source)
                    axes |= layer_axes(f"{prefix}.shortcut.norm", norm, stream)
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
