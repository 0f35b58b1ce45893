"""The server's proxy data, from whatever form a user has it in.

Data-based matchers, BatchNorm repair, MuDSC's beta selection, NP Merge and server fine-tuning
read a small labelled (or, for matching and repair, unlabelled) set on the server. A user's
ServerApp may hold it as tensors, a ``torch.utils.data.Dataset`` or a ``DataLoader``, whose
samples or batches are ``(inputs, labels)`` pairs or dictionaries (``{"img": ..., "label":
...}``, the form of Flower's quickstarts and of ``flwr-datasets``); :func:`as_proxy` turns each
into one pair of tensors, read once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["INPUT_KEYS", "LABEL_KEYS", "Proxy", "ProxyLike", "as_proxy"]


@dataclass(frozen=True)
class Proxy:
    """Proxy inputs and, when known, their integer labels.

    Attributes
    ----------
    x : Tensor
        Inputs, first axis = samples.
    y : Tensor or None
        Labels (``torch.long``), one per input; None for unlabelled data.
    """

    x: Tensor
    y: Tensor | None = None

    def __post_init__(self) -> None:
        if self.y is not None and len(self.y) != len(self.x):
            raise ValueError(f"proxy data: {len(self.x)} inputs but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def labelled(self) -> bool:
        """Labels are known."""
        return self.y is not None


#: What :func:`as_proxy` accepts.
ProxyLike = Proxy | Tensor | tuple | list | Dataset | DataLoader | None


#: Dictionary keys read as the inputs and as the labels when no ``keys`` are given, in this
#: order (Flower's and Hugging Face's datasets name them so: ``img``, ``image``, ``label``...).
INPUT_KEYS = ("img", "image", "pixel_values", "x", "input", "inputs", "features")
LABEL_KEYS = ("label", "labels", "fine_label", "y", "target", "targets", "character")


def _from_dict(item: Mapping, keys: tuple[str, str | None] | None) -> tuple[object, object]:
    """``(inputs, labels)`` of a dictionary sample or batch, by ``keys`` or detected."""
    if keys is not None:
        missing = [k for k in keys if k is not None and k not in item]
        if missing:
            raise KeyError(
                f"proxy data: a batch has no key {missing[0]!r}; its keys are {sorted(item)}"
            )
        return item[keys[0]], None if keys[1] is None else item[keys[1]]
    inputs = [k for k in INPUT_KEYS if k in item]
    labels = [k for k in LABEL_KEYS if k in item]
    if not inputs and labels and len(item) == 2:
        inputs = [k for k in item if k != labels[0]]
    if not inputs:
        raise TypeError(
            f"proxy data: cannot tell which key of a batch holds the inputs (keys "
            f"{sorted(item)}; known input keys {list(INPUT_KEYS)}): pass "
            "as_proxy(data, keys=(INPUT_KEY, LABEL_KEY)) and give the strategy its result"
        )
    return item[inputs[0]], item[labels[0]] if labels else None


def _pair(item: object, keys: tuple[str, str | None] | None = None) -> tuple[Tensor, Tensor | None]:
    if isinstance(item, Mapping):
        item = _from_dict(item, keys)
    if isinstance(item, tuple | list) and len(item) == 2:
        x, y = item
        return torch.as_tensor(x), None if y is None else torch.as_tensor(y)
    if isinstance(item, tuple | list) and len(item) == 1:
        return torch.as_tensor(item[0]), None
    if isinstance(item, Tensor):
        return item, None
    raise TypeError(
        "proxy data: each sample or batch must be a tensor, an (inputs, labels) pair or a "
        f"dictionary of them, got {type(item).__name__}"
    )


def _stack(parts: list[tuple[Tensor, Tensor | None]], cat: bool) -> Proxy:
    join = torch.cat if cat else torch.stack
    xs = [x for x, _ in parts]
    ys = [y for _, y in parts]
    if any(y is None for y in ys):
        return Proxy(join(xs))
    return Proxy(join(xs), join(ys).long())  # type: ignore[arg-type]


def as_proxy(data: ProxyLike, keys: tuple[str, str | None] | None = None) -> Proxy | None:
    """Read proxy data into tensors.

    Parameters
    ----------
    data : Proxy, Tensor, (inputs, labels), Dataset, DataLoader or None
        A tensor of inputs (unlabelled), a pair of tensors, a map-style ``Dataset`` whose items
        are ``(input, label)`` pairs, dictionaries or inputs alone, or a ``DataLoader`` over
        one (every batch is read once, in its order). ``None`` or an empty set gives ``None``.
    keys : (str, str or None), optional
        For dictionary samples or batches: the key of the inputs and of the labels (None:
        unlabelled). Default: detected, the first of :data:`INPUT_KEYS` and of
        :data:`LABEL_KEYS` present (with two keys, one a label key, the other is the input).

    Returns
    -------
    Proxy or None

    Raises
    ------
    TypeError
        For anything else, naming what was given; for dictionaries whose input key cannot be
        detected, listing their keys.
    KeyError
        A ``keys`` entry a dictionary does not have.
    """
    if data is None or isinstance(data, Proxy):
        return data if data is None or len(data) else None
    if isinstance(data, Tensor):
        return Proxy(data) if len(data) else None
    if isinstance(data, tuple | list):
        x, y = _pair(tuple(data))
        return Proxy(x, None if y is None else y.long()) if len(x) else None
    if isinstance(data, DataLoader):
        parts = [_pair(batch, keys) for batch in data]
        return _stack(parts, cat=True) if parts else None
    if isinstance(data, Dataset):
        if not hasattr(data, "__len__"):
            raise TypeError("proxy data: an iterable Dataset has no length; pass a DataLoader")
        parts = [_pair(data[i], keys) for i in range(len(data))]
        return _stack(parts, cat=False) if parts else None
    raise TypeError(
        "proxy data must be a tensor of inputs, an (inputs, labels) pair, a Dataset or a "
        f"DataLoader; got {type(data).__name__}"
    )
