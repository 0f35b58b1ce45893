"""How many clients :func:`fedmerge.vectorised.train_many` trains together: an estimate of one
client's memory (its stacked parameters and optimiser state, and the activations of one
forward pass measured on one sample) against the free memory of the device."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["choose_chunk_size"]

#: Most clients per chunk on a CPU: beyond a few dozen the per-op overhead is amortised and
#: larger stacks only grow the working set.
_CPU_MAX_CHUNK = 64
#: Most clients per chunk on an accelerator (the memory estimate usually decides first).
_DEVICE_MAX_CHUNK = 512
#: Fraction of the free memory a chunk may plan to use: CUDA free memory, or MemAvailable of
#: /proc/meminfo on a CPU (shared with data, other processes and allocator slack).
_CUDA_MEMORY_FRACTION = 0.5
_CPU_MEMORY_FRACTION = 0.25
#: Budget when no memory figure can be read (CPU without /proc/meminfo, MPS).
_FALLBACK_BUDGET = 2 * 1024**3


class _CountOutputs(TorchFunctionMode):
    """Counts the elements of every tensor that torch functions return (views included)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        items = out if isinstance(out, tuple | list) else (out,)
        self.elements += sum(t.numel() for t in items if isinstance(t, torch.Tensor))
        return out


def _activation_elements(model: nn.Module, input_shape: Sequence[int], batch_size: int) -> int:
    """Elements of all tensors that one forward pass creates, for a batch of ``batch_size``.

    Measured on one zero sample where the model lives, in eval mode (no random numbers drawn,
    no running statistics updated; the training flags are restored). Not on the meta device:
    some of its kernels are Python decompositions that import TorchDynamo (seconds).
    """
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros((1, *input_shape), device=device, dtype=dtype)
    modes = {m: m.training for m in model.modules()}
    counter = _CountOutputs()
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        for module, mode in modes.items():
            module.training = mode
    return counter.elements * batch_size


def _cpu_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def choose_chunk_size(
    model: nn.Module,
    batch_size: int,
    device: torch.device | str,
    *,
    input_shape: Sequence[int] | None = None,
) -> int:
    """How many clients to train together, from the model's size and the free memory.

    Parameters
    ----------
    model : nn.Module
        The architecture.
    batch_size : int
        Samples per step.
    device : torch.device or str
        Where training runs. CUDA: the budget is half of ``torch.cuda.mem_get_info``'s free
        memory. CPU: a quarter of ``MemAvailable`` in ``/proc/meminfo`` (2 GiB when that
        cannot be read), capped at 64 clients: past a few dozen the per-op overhead is
        amortised and bigger stacks only grow the working set. Other devices: 2 GiB.
    input_shape : sequence of int, optional
        Shape of one sample. With it, the activations are measured by a forward pass of one
        zero sample (eval mode, no gradients, the model's flags restored); without it they
        are guessed as one element per parameter per sample.

    Returns
    -------
    int
        At least 1.

    Notes
    -----
    Per client the estimate counts the parameters six times (stacked weights, gradients,
    momentum buffer, weight-decayed gradient, proximal reference, starting copy) and the
    forward activations three times (saved for backward, their gradients, slack).
    """
    device = torch.device(device)
    param_elements = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for b in model.buffers()
    )
    activations = None
    lazy = any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())
    if input_shape is not None and not lazy:
        try:
            activations = _activation_elements(model, tuple(input_shape), batch_size)
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            activations = None  # an op without a meta kernel: fall back to the guess
    if activations is None:
        activations = param_elements * batch_size
    element_size = next((p.element_size() for p in model.parameters()), 4)
    per_client = element_size * (6 * param_elements + 3 * activations)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget, cap = int(free * _CUDA_MEMORY_FRACTION), _DEVICE_MAX_CHUNK
    elif device.type == "cpu":
        available = _cpu_available_bytes()
        budget = (
            int(available * _CPU_MEMORY_FRACTION) if available is not None else _FALLBACK_BUDGET
        )
        cap = _CPU_MAX_CHUNK
    else:
        budget, cap = _FALLBACK_BUDGET, _DEVICE_MAX_CHUNK
    return max(1, min(cap, budget // max(per_client, 1)))
