"""Reading client replies: their arrays as zero-copy views of the ``.npy`` bytes, their state
dicts and weights, their metrics as numbers or lists. What replies must hold is checked in
:mod:`.validation`, which reads them with these."""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, Message, MetricRecord

if TYPE_CHECKING:
    import torch

_NUMPY_STYPE = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY
_NPY_MAGIC = b"\x93NUMPY"
_MAX_HEADER = 10_000  # bytes; NumPy's own limit on a .npy header


def _view(array: Array) -> np.ndarray:
    """The array's values as a read-only view of its ``.npy`` bytes (no copy of the data)."""
    if array.stype != _NUMPY_STYPE:
        raise ValueError(f"serialisation {array.stype!r}, expected {_NUMPY_STYPE!r}")
    data = array.data
    if data[:6] != _NPY_MAGIC or data[6:8] not in (b"\x01\x00", b"\x02\x00"):
        return array.numpy()  # not .npy 1.0/2.0: let NumPy read it (a copy) or say why not
    size = 2 if data[6] == 1 else 4  # bytes of the header length
    offset = 8 + size + int.from_bytes(data[8 : 8 + size], "little")
    if offset > _MAX_HEADER:
        raise ValueError(f".npy header of {offset} bytes")
    shape, fortran, dtype = _npy_header(bytes(data[:offset]))
    count = math.prod(shape)
    if count == 0:
        return np.empty(shape, dtype)
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C")


@functools.lru_cache(maxsize=4096)
def _npy_header(prefix: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of a ``.npy`` header (NumPy's parser, cached)."""
    # Parsing a header costs ~0.2 ms (ast.literal_eval); a model's headers repeat every
    # reply and round, so the cache makes it nearly free.
    buf = io.BytesIO(prefix)
    version = np.lib.format.read_magic(buf)
    read = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read(buf)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    return shape, fortran, dtype


@functools.lru_cache(maxsize=256)
def _dtype(name: str) -> np.dtype:
    return np.dtype(name)


def client_states(
    replies: Iterable[Message], weighted_by_key: str
) -> tuple[list[Mapping[str, torch.Tensor]], list[float]]:
    """The state dicts and weights (``weighted_by_key``) of the replies that carry no error.

    Each reply's one ArrayRecord is read under whatever key it has, as Flower's FedAvg reads it.
    """
    valid = [r for r in replies if not r.has_error()]
    states: list[Mapping[str, torch.Tensor]] = [
        next(iter(r.content.array_records.values())).to_torch_state_dict() for r in valid
    ]
    weights = [
        float(metric_number(next(iter(r.content.metric_records.values())), weighted_by_key))
        for r in valid
    ]
    return states, weights


def metric_number(metrics: MetricRecord, key: str) -> float:
    """``metrics[key]`` as a number (int or float, unchanged); TypeError when it is a list.

    For replies already validated (:func:`validate_reply` refuses list weights).
    """
    value = metrics[key]
    if isinstance(value, list):
        raise TypeError(f"metric {key!r} is a list, expected a number")
    return value


def metric_list(metrics: MetricRecord, key: str) -> list[float]:
    """``metrics[key]`` as a new list of numbers; TypeError when it is a single number."""
    value = metrics[key]
    if not isinstance(value, list):
        raise TypeError(f"metric {key!r} is a number, expected a list")
    return list(value)
