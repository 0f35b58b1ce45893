"""Infer a model's permutation spec from its code, by tracing it with :mod:`torch.fx`.

:func:`infer_spec` traces ``forward`` symbolically in eval mode
(:func:`torch.fx.symbolic_trace`; the built-in ``torch.nn`` layers stay leaves), runs the graph
once on an example input to learn every intermediate shape
(:class:`torch.fx.passes.shape_prop.ShapeProp`), follows how hidden units flow through the
graph, and checks its answer on the model before returning it. The result is a
:class:`~fedmerge.permutations.PermutationSpec` such as a hand-written ``permutation_spec()``
method would return.

How it works
------------
Every axis of every floating-point state entry (parameters and buffers) that a traced
operation reads starts as its own *unit space* (:mod:`.spaces`). Every intermediate tensor
records, per axis, which space indexes it (possibly with each unit repeated ``r`` times in a
row, after a flatten), or nothing. Operations join spaces (union-find; :mod:`.walker` for
functions and tensor methods, :mod:`.layers` for leaf layers; :mod:`.assembly` makes the
spaces left at the end into the spec):

- ``Linear`` / ``Conv1d-3d`` / ``F.linear`` / ``F.conv*d``: the weight's input axis joins the
  input's feature axis; the output's feature axis is the weight's output axis (and the bias).
  A depthwise convolution (one input channel per group, MobileNet, EfficientNet) outputs its
  input's units (each ``m`` times for a channel multiplier ``m``); a convolution whose groups
  hold several input channels keeps its input channels fixed and makes each output group its
  own space. ``Embedding``: the output's last axis is the weight's embedding axis.
- ``BatchNorm*`` (weight, bias *and* running statistics), ``GroupNorm`` (the space becomes
  grouped, ``num_groups`` blocks), ``LayerNorm`` (weight and bias broadcast over the
  normalised axes), element-wise activations and dropout (modules, functions and tensor
  methods), softmax, pooling over spatial axes, ``Identity``: the feature axis keeps its space.
  ``clamp`` / ``clip`` with tensor bounds: the bounds broadcast against the input, their unit
  axes join its.
- Element-wise ``+ - * /`` (and other broadcasting element-wise ops) join the spaces of the
  aligned axes: a residual add puts the shortcut and the branch on one stream. A parameter read
  with ``get_attr`` (a cls token, a position embedding) joins the stream on the axis it is
  added on; an axis that meets an axis no permutation may touch becomes *fixed*.
- ``flatten`` / ``view`` / ``reshape`` of ``(N, C, H, W)`` to ``(N, C*H*W)`` give the merged
  axis the channel space with ``repeat = H*W``; ``unflatten(-1, (heads, d))`` splits a space
  into head blocks and units within a head, which makes it grouped (``num_groups = heads``).
  A reduction, softmax or normalisation *across* the head blocks of a space that keeps its
  within-head axis fixes that space: heads may order their units differently, so such an op
  would mix unit ``j`` of one head with a different unit of another.
- ``matmul`` joins the contracted axes (``q @ k.transpose(-2, -1)``: q and k share one
  permutation); batch axes that index the heads of two different spaces (``weights @ v``) tie
  their block orders (``tied_to``).
- ``cat`` along an axis with units makes it the *direct sum* of the parts' spaces (each part
  keeps its own permutation at its offset: DenseNet, SqueezeNet; a part without units is a run
  nothing moves); ``chunk`` / ``split`` / ``tensor_split`` and contiguous slices of a unit axis
  cut its space at their boundaries. ``stack`` and ``cat`` along other axes join the parts.
  Reductions (``sum``, ``mean``...) drop their axes (invariant to any reordering).
- ``nn.MultiheadAttention``: the in-projection's rows are the queries' and keys' units (one
  space: scores are unit-by-unit dot products) and the values' units, both grouped by head with
  one head order; the out-projection's columns are the values' units. Packed
  (``in_proj_weight``) or separate projections alike.
- ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``: one space of hidden units per layer and direction;
  every gate's rows hold those units (the weights' rows are the gates side by side), the
  recurrent weight's columns too. The final hidden state of a multi-layer or bidirectional
  layer stacks several spaces on one axis: when the model reads it, those spaces are fixed.
- ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` (norm first or last): modelled
  from their computation (self-attention as above, the feed-forward block, residual adds and
  LayerNorms); their activation must be a known element-wise one.
- The model's inputs are never permuted, and every space that reaches the model's output is
  fixed. Fixed spaces (and everything joined with them) are not permutations of the spec.
- Python values computed from shapes (``n_h * n_w`` in torchvision's ViT) hold no units.
- A leaf layer without a rule is allowed on inputs without units (it keeps its own state
  entries fixed, so a weight it shares with another layer does not move); on inputs with
  units it is refused.

The check (:mod:`.check`)
-------------------------
Before the spec is returned, a float64 copy of the model in eval mode is run on the example
input with one random permutation of every inferred space (a different order inside each
head block); any change of the outputs beyond rounding raises :class:`SpecInferenceError`
naming the permutations at fault. Inference is sound by its rules; the check makes an error
in them (or a model the rules misjudge) loud instead of silent.

Anything the inference cannot prove correct raises :class:`SpecInferenceError` naming the fx
node: an operation it does not know applied to a tensor with permuted axes, strided slices or
indexing of a unit axis, reshapes that interleave units with other axes (ShuffleNet's channel
shuffle), an LSTM with ``proj_size``, and models ``torch.fx`` cannot trace (data-dependent
control flow). Such models need a hand-written spec: a ``permutation_spec()`` method returning
a :class:`~fedmerge.permutations.PermutationSpec` (see :mod:`fedmerge.permutations` and the
registry models in :mod:`fedmerge.models`).

Permutations are named ``P_<name>`` after the first layer (in graph order) that produces their
units, e.g. ``P_conv1``, ``P_blocks.0.attn.q``; a parameter read directly (``P_cls``) when no
layer produces them; ``P_<attention>.qk`` / ``.v`` for a ``MultiheadAttention``'s heads and
``P_<rnn>.l<k>`` for a recurrent layer's hidden units. Activation sites are the outputs of the
leaf layers that hold the units on axis 1 (``(N, C, ...)``) or -1 (``(N, T, D)``), the last one
of a chain such as conv -> norm -> activation module, with ``relu=True`` when the only user of
the output is a ReLU; modules called more than once are never sites. A permutation without
such a layer gets the outputs of once-called non-leaf modules that hold its units (an
``nn.Linear`` subclass that fx traces down to ``F.linear``); transformer layers give their
outputs and their feed-forward ``linear1`` outputs. A permutation with none of these (the
heads of ``nn.MultiheadAttention``, a piece cut from a space by a split) has no site: weight
matching works, and activation matching leaves it unmoved.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.fx.proxy import TraceError

from ..permutations import PermutationSpec, check_spec
from .assembly import assemble
from .check import check_inferred
from .errors import HAND_WRITTEN_HINT, SpecInferenceError
from .layers import _Inference

__all__ = ["SpecInferenceError", "infer_spec"]


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no BatchNorm statistics updated, no dropout) and no autograd; restored."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, flag in flags:
            module.training = flag


def _user_frame(exc: BaseException) -> str:
    """Where in the model's own code tracing failed (the last frame outside torch)."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)
    ]
    if not frames:
        return "in forward"
    frame = frames[-1]
    return f"at {frame.filename}:{frame.lineno} in {frame.name} ({(frame.line or '').strip()!r})"


def _trace(model: nn.Module) -> fx.GraphModule:
    name = type(model).__name__
    try:
        return fx.symbolic_trace(model)
    except TraceError as exc:
        raise SpecInferenceError(
            f"cannot infer the permutation spec of {name}: torch.fx cannot trace its forward "
            f"{_user_frame(exc)}: {exc}. This is usually data-dependent control flow (an "
            "`if`/`while` on tensor values) or iteration over a tensor, which a symbolic "
            f"trace cannot follow. {HAND_WRITTEN_HINT}"
        ) from exc
    except (RuntimeError, TypeError, NotImplementedError, AttributeError) as exc:
        raise SpecInferenceError(
            f"cannot infer the permutation spec of {name}: torch.fx cannot trace its forward "
            f"{_user_frame(exc)}: {type(exc).__name__}: {exc}. {HAND_WRITTEN_HINT}"
        ) from exc


def infer_spec(
    model: nn.Module, example_input: Tensor | tuple[Tensor, ...], *, check: bool = True
) -> PermutationSpec:
    """Infer the permutation spec of ``model`` from its code (see the module docstring).

    Parameters
    ----------
    model : torch.nn.Module
        Any model that :func:`torch.fx.symbolic_trace` can trace. Not modified: it is traced
        and run once on ``example_input`` in eval mode without gradients, and every module's
        train/eval mode is restored.
    example_input : Tensor or tuple of Tensor
        Positional inputs of ``forward`` (a batch, on the model's device and dtype), used to
        learn every intermediate shape and to check the result. Use a batch of at least 2 of
        real (or random) samples, images large enough that no spatial axis has the same length
        as a channel axis by accident. A batch of 1 is accepted, but the check sees less.
    check : bool, default True
        Check the spec on the model before returning it (one deep copy in float64 and two
        forward passes; see ``docs/flower-apps.md`` for its cost). ``False`` skips it and
        with it the guarantee that a wrong spec cannot be returned.

    Returns
    -------
    PermutationSpec
        Checked against ``model.state_dict()`` (every entry, buffers included) and, with
        ``check``, against the model's outputs; permutations are named
        ``P_<first producing layer>`` in graph order and have activation sites when some
        once-called layer outputs their units.

    Raises
    ------
    SpecInferenceError
        (a ``TypeError``) naming the fx node, its op and target, when the model cannot be
        traced or uses an operation whose effect on a permutation cannot be proved; naming
        the permutations at fault when the check finds that the spec changes the outputs.
        The message says how to write the spec by hand.
    """
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    with _evaluating(model):
        graph_module = _trace(model)
        ShapeProp(graph_module).propagate(*inputs)
    inference = _Inference(model, graph_module)
    inference.run()
    spec = assemble(inference)
    check_spec(spec, model.state_dict())
    if check:
        check_inferred(spec, model, inputs)
    return spec
