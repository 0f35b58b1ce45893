"""The server's proxy data, from whatever form a user has it in.

Data-based matchers, BatchNorm repair, MuDSC's beta selection, NP Merge and server fine-tuning
read a small labelled (or, for matching and repair, unlabelled) set on the server. A user's
ServerApp may hold it as tensors, a ``torch.utils.data.Dataset`` or a ``DataLoader``;
:func:`as_proxy` turns each into one pair of tensors, read once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["Proxy", "ProxyLike", "as_proxy"]


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


def _pair(item: object) -> tuple[Tensor, Tensor | None]:
    if isinstance(item, tuple | list) and len(item) == 2:
        x, y = item
        return torch.as_tensor(x), None if y is None else torch.as_tensor(y)
    if isinstance(item, tuple | list) and len(item) == 1:
        return torch.as_tensor(item[0]), None
    if isinstance(item, Tensor):
        return item, None
    raise TypeError(
        "proxy data: each sample or batch must be a tensor or an (inputs, labels) pair, "
        f"got {type(item).__name__}"
    )


def _stack(parts: list[tuple[Tensor, Tensor | None]], cat: bool) -> Proxy:
    join = torch.cat if cat else torch.stack
    xs = [x for x, _ in parts]
    ys = [y for _, y in parts]
    if any(y is None for y in ys):
        return Proxy(join(xs))
    return Proxy(join(xs), join(ys).long())  # type: ignore[arg-type]


def as_proxy(data: ProxyLike) -> Proxy | None:
    """Read proxy data into tensors.

    Parameters
    ----------
    data : Proxy, Tensor, (inputs, labels), Dataset, DataLoader or None
        A tensor of inputs (unlabelled), a pair of tensors, a map-style ``Dataset`` whose items
        are ``(input, label)`` pairs (or inputs alone), or a ``DataLoader`` over one (every
        batch is read once, in its order). ``None`` or an empty set gives ``None``.

    Returns
    -------
    Proxy or None

    Raises
    ------
    TypeError
        For anything else, naming what was given.
    """
    if data is None or isinstance(data, Proxy):
        return data if data is None or len(data) else None
    if isinstance(data, Tensor):
        return Proxy(data) if len(data) else None
    if isinstance(data, tuple | list):
        x, y = _pair(tuple(data))
        return Proxy(x, None if y is None else y.long()) if len(x) else None
    if isinstance(data, DataLoader):
        parts = [_pair(batch) for batch in data]
        return _stack(parts, cat=True) if parts else None
    if isinstance(data, Dataset):
        if not hasattr(data, "__len__"):
            raise TypeError("proxy data: an iterable Dataset has no length; pass a DataLoader")
        parts = [_pair(data[i]) for i in range(len(data))]
        return _stack(parts, cat=False) if parts else None
    raise TypeError(
        "proxy data must be a tensor of inputs, an (inputs, labels) pair, a Dataset or a "
        f"DataLoader; got {type(data).__name__}"
    )
