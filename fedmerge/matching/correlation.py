"""Pearson correlation, accumulated in float64 with shifted sums (streamed over batches)."""

from __future__ import annotations

import torch
from torch import Tensor

# Variance, relative to the shifted second moment, below which a unit counts as constant
# (cancellation in E[x^2] - E[x]^2 leaves ~1e-16 relative in float64).
_EPS = 1e-12


# ---------------------------------------------------------------------------------------------
# Pearson correlation
# ---------------------------------------------------------------------------------------------


class _PearsonSums:
    """Streaming float64 sums for the Pearson correlation between two sets of units."""

    def __init__(self) -> None:
        self.count = 0

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add samples given as rows of units: ``x`` is ``(units_x, samples)``, ``y`` is
        ``(units_y, samples)`` (the layout in which conv outputs and weights copy cheapest)."""
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"{x.shape[1]} samples of x but {y.shape[1]} of y")
        x, y = x.detach(), y.detach().to(x.device)
        if self.count == 0:
            # Shifting by the first sample keeps E[x^2] - E[x]^2 from cancelling badly and
            # makes the variance of a constant unit exactly zero. It is subtracted in the
            # input's dtype (one float64 pass fewer); x - x0 is exact for a constant unit.
            self.shift_x, self.shift_y = x[:, :1].clone(), y[:, :1].clone()
            self.sx = x.new_zeros(x.shape[0], dtype=torch.float64)
            self.sy = x.new_zeros(y.shape[0], dtype=torch.float64)
            self.sxx, self.syy = torch.zeros_like(self.sx), torch.zeros_like(self.sy)
            self.sxy = x.new_zeros(x.shape[0], y.shape[0], dtype=torch.float64)
        x = (x - self.shift_x).to(torch.float64)
        y = (y - self.shift_y).to(torch.float64)
        self.count += x.shape[1]
        self.sx += x.sum(1)
        self.sy += y.sum(1)
        self.sxx += torch.linalg.vector_norm(x, dim=1).square()
        self.syy += torch.linalg.vector_norm(y, dim=1).square()
        self.sxy += x @ y.T

    def correlation(self) -> Tensor:
        """The ``(units_x, units_y)`` correlation matrix, 0 for constant units, in [-1, 1]."""
        if self.count == 0:
            raise ValueError("no samples to correlate")
        n = self.count
        mx, my = self.sx / n, self.sy / n
        cov = self.sxy / n - torch.outer(mx, my)
        varx, vary = self.sxx / n - mx * mx, self.syy / n - my * my
        # A unit is constant when its variance is 0 (exactly, thanks to the shift) or only
        # rounding left over from E[x^2] - E[x]^2; its correlations are 0.
        livex, livey = varx > _EPS * self.sxx / n, vary > _EPS * self.syy / n
        sd = torch.outer(varx.clamp_min(0).sqrt(), vary.clamp_min(0).sqrt())
        live = torch.outer(livex, livey)
        corr = torch.where(live, cov / torch.where(live, sd, 1.0), 0.0)
        return corr.clamp(-1.0, 1.0)


class _Side:
    """Streaming float64 sums of one set of units (rows), shifted by their first sample."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, v: Tensor) -> Tensor:
        """Add ``(units, samples)``; returns the shifted float64 samples (for the cross sums)."""
        v = v.detach()
        if self.count == 0:
            self.shift = v[:, :1].clone()
            self.s = v.new_zeros(v.shape[0], dtype=torch.float64)
            self.ss = torch.zeros_like(self.s)
        v = (v - self.shift).to(torch.float64)
        self.count += v.shape[1]
        self.s += v.sum(1)
        self.ss += torch.linalg.vector_norm(v, dim=1).square()
        return v


class _PearsonMany:
    """The Pearson correlations of one set of units ``x`` against several ``y_k`` on the same
    samples, the ``x`` side converted and summed once: exactly :class:`_PearsonSums` of each
    pair (the same operations on the same values in the same order).

    ``update(k, key, x, y)``: samples of ``x`` and of ``y_k``; ``key`` names where ``x`` came
    from in this batch (a site), so that the ``x`` side is added once per key and batch,
    whichever ``k`` comes first. :meth:`next_batch` between batches.
    """

    def __init__(self, k: int) -> None:
        self.x, self.ys = _Side(), [_Side() for _ in range(k)]
        self.sxy: list[Tensor | None] = [None] * k
        self._shifted: dict[object, Tensor] = {}

    def next_batch(self) -> None:
        self._shifted.clear()

    def update(self, k: int, key: object, x: Tensor, y: Tensor) -> None:
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"{x.shape[1]} samples of x but {y.shape[1]} of y")
        if key not in self._shifted:
            self._shifted[key] = self.x.add(x)
        xs = self._shifted[key]
        ys = self.ys[k].add(y.to(xs.device))
        cross = xs @ ys.T
        current = self.sxy[k]
        self.sxy[k] = cross if current is None else current.add_(cross)

    def correlation(self, k: int) -> Tensor:
        """The ``(units_x, units_y_k)`` correlation matrix, as :meth:`_PearsonSums.correlation`."""
        x, y, sxy = self.x, self.ys[k], self.sxy[k]
        if sxy is None:
            raise ValueError("no samples to correlate")
        sums = _PearsonSums()
        sums.count, sums.sx, sums.sxx = x.count, x.s, x.ss
        sums.sy, sums.syy, sums.sxy = y.s, y.ss, sxy
        return sums.correlation()


def pearson_correlation(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation between the columns of ``x`` and the columns of ``y``.

    Parameters
    ----------
    x : Tensor
        ``(samples, units_x)``.
    y : Tensor
        ``(samples, units_y)``, the same samples.

    Returns
    -------
    Tensor
        float64 ``(units_x, units_y)``; entries of a constant (e.g. dead ReLU) unit are 0,
        never NaN.
    """
    sums = _PearsonSums()
    sums.update(x.T, y.T)
    return sums.correlation()
