"""How image inputs are scaled: standardised (the default) or left in [0, 1]."""

from __future__ import annotations

import torch

#: Values of the run-config key ``input-scaling``.
INPUT_SCALINGS: tuple[str, ...] = ("standard", "unit")


def to_unit_range(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Undo per-channel standardisation: ``x * std + mean``, i.e. pixel values in [0, 1].

    ``x`` is ``(N, C, H, W)`` standardised with ``mean``/``std`` in [0, 1] pixel units (what the
    loaders cache), so the result is what ``torchvision.transforms.ToTensor`` alone gives, up
    to float32 rounding. Returns a new tensor.
    """
    shape = (1, len(mean), 1, 1)
    m = torch.tensor(mean, dtype=x.dtype).view(shape)
    s = torch.tensor(std, dtype=x.dtype).view(shape)
    return x * s + m
