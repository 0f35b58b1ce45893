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
from collections.abc import Callable

import torch
from torch import nn

from fedmerge.errors import ConfigError, unknown_name

from .common import (
    NORMS,
    check_hidden,
    count_parameters,
    image_shape,
    model_spec,
    parse_hidden,
)
from .resnet import BasicBlock, ResNet20
from .simple import MLP, VGG9, SimpleCNN
from .vit import ViT

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
    return SimpleCNN(image_shape("cnn", input_shape), num_classes)


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
    return VGG9(image_shape("vgg9", input_shape), num_classes)


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
    return ResNet20(image_shape("resnet20", input_shape), num_classes, width, norm, norm_groups)


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
    shape = image_shape("vit", input_shape)
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
    hidden = check_hidden(hidden)
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
