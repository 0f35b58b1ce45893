"""The check every inferred spec passes before it is returned: a random permutation of every
inferred space must leave the model's outputs unchanged (to float64 rounding).

The inference follows rules; this check tests their result on the model itself, so that a
rule that does not fit a model (an operation whose effect was misjudged, a parameter used
where tracing could not see) raises instead of returning a spec that would silently change
what a matched or merged model computes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..permutations import (
    PermutationSpec,
    apply_permutations,
    random_permutations,
)
from .errors import HAND_WRITTEN_HINT, SpecInferenceError

#: Largest output difference, relative to the largest output, that counts as rounding in
#: float64 (a permuted model sums the same products in another order: ~1e-15 relative).
TOLERANCE_FLOAT64 = 1e-9
#: The same when the model cannot run in float64 and is checked in its own precision.
TOLERANCE_FLOAT32 = 1e-4


@contextmanager
def python_attention() -> Iterator[None]:
    """Run ``nn.MultiheadAttention`` and transformer layers through their Python code (not
    torch's fused fast path, which calls no submodule: no hook on ``linear1`` would fire)."""
    backend = getattr(torch.backends, "mha", None)
    if backend is None or not hasattr(backend, "set_fastpath_enabled"):
        yield
        return
    before = backend.get_fastpath_enabled()
    backend.set_fastpath_enabled(False)
    try:
        yield
    finally:
        backend.set_fastpath_enabled(before)


def _to_double(value: Any) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.double()
    if isinstance(value, tuple):
        return tuple(_to_double(v) for v in value)
    return value


def _flat(output: Any) -> list[Tensor]:
    """The floating-point tensors of a (nested) model output, in order."""
    if isinstance(output, Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, list | tuple):
        return [t for item in output for t in _flat(item)]
    if isinstance(output, dict):
        return [t for key in sorted(output) for t in _flat(output[key])]
    return []


def _copy(model: nn.Module) -> tuple[nn.Module, bool]:
    """An eval-mode copy in float64 when the model runs in it (else in its own precision)."""
    try:
        clone = copy.deepcopy(model).eval()
    except Exception as exc:  # a model holding something that cannot be copied
        raise SpecInferenceError(
            f"cannot check the inferred permutation spec of {type(model).__name__}: the model "
            f"cannot be deep-copied ({type(exc).__name__}: {exc}); pass check=False to "
            "infer_spec to use the spec unchecked, or write it by hand"
        ) from exc
    try:
        return clone.double(), True
    except (RuntimeError, TypeError):  # pragma: no cover - a model that refuses float64
        return copy.deepcopy(model).eval(), False


class _Check:
    """Outputs of one eval-mode copy of a model under permuted states."""

    def __init__(self, model: nn.Module, inputs: tuple[Any, ...]) -> None:
        self.model, self.double = _copy(model)
        self.inputs = _to_double(inputs) if self.double else inputs
        self.state = self.model.state_dict()
        first: dict[int, str] = {}
        tensors = self.model.state_dict(keep_vars=True)
        # One name per tied tensor: functional_call sets the others through the tie.
        self.names = {first.setdefault(id(t), name) for name, t in tensors.items()}
        self.reference = self.outputs(self.state)

    def outputs(self, state: dict[str, Tensor]) -> list[Tensor]:
        given = {name: value for name, value in state.items() if name in self.names}
        with torch.no_grad(), python_attention():
            return _flat(functional_call(self.model, given, self.inputs, tie_weights=True))

    def changed(self, state: dict[str, Tensor]) -> float:
        """Largest output difference relative to the largest reference output."""
        outputs = self.outputs(state)
        scale = max(float(r.abs().max()) for r in self.reference)
        worst = max(
            float((o - r).abs().max()) for o, r in zip(outputs, self.reference, strict=True)
        )
        return worst / max(scale, 1e-300)


def check_inferred(
    spec: PermutationSpec,
    model: nn.Module,
    inputs: tuple[Any, ...],
    *,
    seed: int = 0,
) -> None:
    """Raise :class:`SpecInferenceError` unless random permutations of ``spec`` leave the
    outputs of ``model`` on ``inputs`` unchanged (see the module docstring).

    The whole spec is permuted at once; when the outputs change, each permutation family
    (permutations that share a head order) is tried alone to name the ones at fault.
    """
    if not spec.perms:
        return
    name = type(model).__name__
    check = _Check(model, inputs)
    batch = next((t.shape[0] for t in inputs if isinstance(t, Tensor) and t.ndim), None)
    small = (
        " The example input has a batch of 1: use a batch of at least 2 (real samples, not "
        "zeros) so that the check sees how samples flow."
        if batch == 1
        else ""
    )
    if not check.reference or any(not torch.isfinite(r).all() for r in check.reference):
        raise SpecInferenceError(
            f"cannot check the inferred permutation spec of {name}: its outputs on the example "
            "input are not finite floating-point tensors, so whether a permutation changes "
            f"them is inconclusive. Pass another example input.{small}"
        )
    tolerance = TOLERANCE_FLOAT64 if check.double else TOLERANCE_FLOAT32
    generator = torch.Generator().manual_seed(seed)
    perms = random_permutations(spec, generator)
    worst = check.changed(apply_permutations(spec, perms, check.state))
    if worst <= tolerance:
        return
    culprits: list[str] = []
    for family in spec.families():
        alone = apply_permutations(spec, {p: perms[p] for p in family}, check.state)
        if check.changed(alone) > tolerance:
            culprits.extend(family)
    raise SpecInferenceError(
        f"the permutation spec inferred for {name} is wrong: permuting the units it found "
        f"changes the model's outputs by {worst:.2g} (relative; rounding is below "
        f"{tolerance:g}). Permutations at fault: {culprits or sorted(spec.perms)}. Some "
        "operation of the model treats these units in a way the inference misjudged (please "
        f"report the model).{small} {HAND_WRITTEN_HINT}"
    )
