"""The error of spec inference and the hint every refusal ends with."""

from __future__ import annotations

#: How to get a spec when inference refuses (the end of every SpecInferenceError message).
HAND_WRITTEN_HINT = (
    "Write the spec by hand instead: give the model a permutation_spec() method that returns "
    "a fedmerge.permutations.PermutationSpec (see the fedmerge.permutations docstring, "
    "docs/methods.md 'Permutation specs' and the registry models in fedmerge/models)"
)


class SpecInferenceError(TypeError):
    """The permutation spec of a model cannot be inferred, or the inferred one failed its
    check; the message names the fx node or the permutations involved."""
