"""Shared pieces of the model registry: option parsing, shapes, norms and spec helpers."""

from __future__ import annotations

import re

from torch import Tensor, nn

from fedmerge.errors import ConfigError
from fedmerge.permutations import (
    Axis,
    AxisEntry,
    PermGroup,
    PermutationSpec,
    Site,
    check_spec,
    layer_axes,
)
from fedmerge.spec_inference import infer_spec

#: Normalisation layers that ``resnet20`` accepts (run-config key ``model-norm``).
NORMS: tuple[str, ...] = ("batch", "group", "layer")

VECTOR_HINT = "mlp for vector datasets such as synthetic"
HIDDEN_ALLOWED = 'comma-separated integers >= 1, e.g. "200,200"'


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
        raise ConfigError("mlp-hidden", text, HIDDEN_ALLOWED)
    parts = [part.strip() for part in text.split(",")]
    # A strict pattern rather than int(): int() also takes "+5", "1_000" and non-ASCII digits,
    # which are more likely typos than intent in a config file.
    if not parts or any(re.fullmatch(r"[0-9]+", part) is None for part in parts):
        raise ConfigError("mlp-hidden", text, HIDDEN_ALLOWED)
    return check_hidden(tuple(int(part) for part in parts))


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


def check_hidden(hidden: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """Return ``hidden`` as a tuple; ConfigError('mlp-hidden') unless it holds ints >= 1."""
    if (
        not isinstance(hidden, tuple | list)
        or not hidden
        or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden)
    ):
        raise ConfigError("mlp-hidden", hidden, HIDDEN_ALLOWED)
    return tuple(hidden)


def image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Return ``(C, H, W)`` for a convolutional model, or say to use the mlp."""
    if len(input_shape) == 1:
        raise ConfigError("model", name, VECTOR_HINT)
    if len(input_shape) != 3:
        raise ConfigError(
            "model",
            name,
            f"mlp for inputs of shape {input_shape}",
            hint="Convolutional models need images of shape (channels, height, width)",
        )
    channels, height, width = input_shape
    return channels, height, width


def make_norm(norm: str, channels: int, groups: int) -> nn.Module:
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


def chain_spec(
    model: nn.Module, convs: tuple[str, ...], linears: tuple[str, ...]
) -> PermutationSpec:
    """Spec of a chain conv..., flatten, linear... with ReLU after every layer but the last."""
    axes: dict[str, tuple[AxisEntry, ...]] = {}
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


def channel_groups(norm: nn.Module) -> int:
    """Blocks of channels a normalisation layer ties together (1 unless GroupNorm)."""
    return norm.num_groups if isinstance(norm, nn.GroupNorm) else 1


def model_spec(
    model: nn.Module, example_input: Tensor | tuple[Tensor, ...] | None = None
) -> PermutationSpec:
    """The permutation spec of a model, computed from the instance (sizes follow its shape).

    Parameters
    ----------
    model : torch.nn.Module
        Any model. Its own ``permutation_spec()`` method wins when it has one (every model
        of :data:`MODELS` does).
    example_input : Tensor or tuple of Tensor, optional
        Inputs of ``forward`` (a small batch). For a model without ``permutation_spec()``,
        the spec is inferred from its code with
        :func:`fedmerge.spec_inference.infer_spec`, which runs it once on these inputs.

    Returns
    -------
    PermutationSpec
        Checked against ``model.state_dict()`` with :func:`fedmerge.permutations.check_spec`.

    Raises
    ------
    TypeError
        When the model declares no permutation spec and no ``example_input`` is given;
        :class:`~fedmerge.spec_inference.SpecInferenceError` (a ``TypeError``) when the spec
        cannot be inferred.
    """
    method = getattr(model, "permutation_spec", None)
    if callable(method):
        spec = method()
    elif example_input is not None:
        spec = infer_spec(model, example_input)
    else:
        raise TypeError(
            f"{type(model).__name__} declares no permutation_spec(): pass an example input "
            "(model_spec(model, example_input)) so that the spec can be inferred from the "
            "model's code, or give the model a permutation_spec() method returning a "
            "fedmerge.permutations.PermutationSpec"
        )
    check_spec(spec, model.state_dict())
    return spec
