"""The fused parameters as a function of the merge logits, and the optimiser that learns them."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from ..merging import (
    average,
)
from ..permutations import State

# ---------------------------------------------------------------------------------------------
# The fused parameters as a function of the logits
# ---------------------------------------------------------------------------------------------


def fuse(states: Sequence[State], logits: Mapping[str, Tensor], *, form: str) -> dict[str, Tensor]:
    """Merge aligned models with per-element coefficient logits (pure; inputs unchanged).

    Parameters
    ----------
    states : sequence of state dicts
        Aligned models: exactly two for ``pair``.
    logits : mapping of str to Tensor
        ``a`` for every merged entry: the entry's shape for ``pair`` (``alpha = sigmoid(a)``
        weighs ``states[0]``), ``(K, *shape)`` for ``softmax``. Entries without logits are
        taken from ``states[0]``.
    form : {"pair", "softmax"}
        ``alpha * W_0 + (1 - alpha) * W_1``, or ``sum_k softmax_k(a) * W_k``.

    Returns
    -------
    dict of str to Tensor
        The merged state dict (differentiable in ``logits``).
    """
    if form == "pair" and len(states) != 2:
        raise ValueError(f"form 'pair' merges two models, got {len(states)}")
    if form not in ("pair", "softmax"):
        raise ValueError(f"form must be 'pair' or 'softmax', got {form!r}")
    out: dict[str, Tensor] = {}
    for key, first in states[0].items():
        if key not in logits:
            out[key] = first.clone()
        elif form == "pair":
            alpha = torch.sigmoid(logits[key])
            out[key] = alpha * first + (1 - alpha) * states[1][key]
        else:
            share = torch.softmax(logits[key], dim=0)
            out[key] = (share * torch.stack([s[key] for s in states])).sum(0)
    return out


def _nbytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _Fusion:
    """Merged parameters as a differentiable function of the logits, memory-lean.

    Pair: ``W_B + sigmoid(a) * (W_A - W_B)`` (two model copies kept, not three). Softmax: the
    stacked models. Entries without logits are fixed at the starting shares.
    """

    def __init__(
        self, states: Sequence[State], shares: Sequence[float], learned: Sequence[str], init: str
    ) -> None:
        self.form = "pair" if len(states) == 2 else "softmax"
        self.fixed = average(states, shares)  # non-learned entries; integer ones replaced later
        self.const: dict[str, Tensor] = {}
        self.logits: dict[str, Tensor] = {}
        for key in learned:
            self.fixed.pop(key)
            if self.form == "pair":
                start = 0.0 if init == "uniform" else math.log(shares[0] / shares[1])
                self.const[key] = states[1][key].clone()
                self.const[f"{key}/diff"] = states[0][key] - states[1][key]
                self.logits[key] = torch.full_like(states[0][key], start).requires_grad_()
            else:
                stack = torch.stack([s[key] for s in states])
                log_share = torch.tensor(
                    [0.0 if init == "uniform" else math.log(w) for w in shares],
                    dtype=stack.dtype,
                    device=stack.device,
                ).view(-1, *([1] * (stack.ndim - 1)))
                self.const[key] = stack
                self.logits[key] = (torch.zeros_like(stack) + log_share).requires_grad_()

    def merged(self) -> dict[str, Tensor]:
        """The merged learned entries (differentiable)."""
        out = {}
        for key, a in self.logits.items():
            if self.form == "pair":
                out[key] = torch.addcmul(
                    self.const[key], torch.sigmoid(a), self.const[f"{key}/diff"]
                )
            else:
                out[key] = (torch.softmax(a, dim=0) * self.const[key]).sum(0)
        return out

    def nbytes(self) -> int:
        """Bytes of the constants and logits."""
        return _nbytes([*self.const.values(), *self.logits.values(), *self.fixed.values()])

    def merged_nbytes(self) -> int:
        """Bytes of one merged copy of the learned entries."""
        one = [a[0] if self.form == "softmax" else a for a in self.logits.values()]
        return _nbytes(one)


class _Adam:
    """Adam (Kingma & Ba), the update of ``torch.optim.Adam`` with default flags, in
    ``torch._foreach`` ops: constructing ``torch.optim.Adam`` imports TorchDynamo (~5 s on
    2 CPU cores), most of a small merge's wall time (tests check the update step by step)."""

    def __init__(
        self,
        params: Sequence[Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params, self.lr, self.betas, self.eps = list(params), lr, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        """One update; gradients are read from ``.grad`` and then dropped."""
        b1, b2 = self.betas
        self.t += 1
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        torch._foreach_lerp_(self.m, grads, 1 - b1)  # m = b1 m + (1 - b1) g
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_div_(denom, math.sqrt(1 - b2**self.t))
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(self.params, self.m, denom, value=-self.lr / (1 - b1**self.t))
        for p in self.params:
            p.grad = None

    def nbytes(self) -> int:
        """Bytes of the two moments."""
        return _nbytes([*self.m, *self.v])
