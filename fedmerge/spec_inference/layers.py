"""Rules for the built-in layers that :mod:`torch.fx` keeps as leaves: how each one's state
entries index the units of its inputs and outputs.

Linear and convolution layers (grouped and depthwise included), embeddings, batch, group
and layer norms, pooling, activations and dropout, ``nn.MultiheadAttention`` (heads
permuted), ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (hidden units; the gates' rows move
together), and ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder``, modelled from
their documented computation. A leaf without a rule is allowed only on inputs without units,
and its own state entries stay fixed.
"""

from __future__ import annotations

import operator
from typing import Any

import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from .spaces import _T, _Ann, _Full, _Refusal
from .walker import (
    _ACTIVATION_MODULES,
    _CONV_MODULES,
    _KEEP_MODULES,
    _POOL_MODULES,
    _arg,
    _dim,
    _plain,
    _qualname,
    _tensors,
    _Walk,
)

_GATES: dict[type[nn.Module], int] = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}
#: The activations a TransformerEncoderLayer may apply between its two linear layers.
_FEEDFORWARD_FUNCTIONS = (F.relu, F.gelu)


class _Inference(_Walk):
    """The graph walk with a rule for every supported leaf layer."""

    def op_call_module(self, node: fx.Node) -> Any:
        prefix = _qualname(node)
        module = self.gm.get_submodule(prefix)
        if isinstance(module, nn.Linear):
            weight = self.required_param(prefix, "weight", (0,))
            bias = self.module_param(prefix, "bias")
            out = self.linear(node, self.tensor(node.args[0]), weight, bias)
        elif isinstance(module, nn.modules.conv._ConvNd) and type(module) in _CONV_MODULES:
            out = self.module_conv(node, module, prefix)
        elif isinstance(module, nn.Embedding):
            out = self.embedding(node, prefix)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            out = self.batch_norm(node, prefix)
        elif isinstance(module, nn.GroupNorm):
            out = self.group_norm(node, module, prefix)
        elif isinstance(module, nn.LayerNorm):
            out = self.module_layer_norm(self.tensor(node.args[0]), module, prefix)
        elif isinstance(module, nn.Softmax | nn.LogSoftmax | nn.Softmin):
            out = self.keep(node)
            if module.dim is not None:
                self.across_blocks(out, {_dim(module.dim, len(out.shape))})
        elif isinstance(module, _KEEP_MODULES):
            out = self.keep(node)
        elif type(module) in _POOL_MODULES:
            out = self.pool(node, self.tensor(node.args[0]), _POOL_MODULES[type(module)])
        elif isinstance(module, nn.Flatten | nn.Unflatten):
            out = self.reshape(node)
        elif isinstance(module, nn.MultiheadAttention):
            out = self.attention(node, module, prefix)
        elif type(module) in _GATES:
            out = self.recurrent(node, module, prefix)
        elif isinstance(module, nn.TransformerEncoderLayer):
            self.plain_inputs(node, 1, "attention masks")
            out = self.encoder_layer(node, module, prefix, self.tensor(node.args[0]))
            out = _T(out.ann, self.out_shape(node))
        elif isinstance(module, nn.TransformerEncoder):
            out = self.encoder(node, module, prefix)
        else:
            out = self.unknown(node)
        self.note_site(node, module, out)
        return out

    def plain_inputs(self, node: fx.Node, start: int, what: str) -> None:
        """Arguments from position ``start`` on (and every keyword) must hold no units."""
        rest = self.value((node.args[start:], node.kwargs))
        if any(t.spaced for t in _tensors(rest)):
            raise _Refusal(f"{what} with permutable axes")

    # ---- convolutions, embeddings, norms ----------------------------------------------------

    def module_conv(self, node: fx.Node, module: nn.modules.conv._ConvNd, prefix: str) -> _T:
        weight = self.required_param(prefix, "weight", (0,))
        bias = self.module_param(prefix, "bias")
        k = _CONV_MODULES[type(module)]
        return self.conv(node, self.tensor(node.args[0]), weight, bias, k, module.groups)

    def embedding(self, node: fx.Node, prefix: str) -> _T:
        x, weight = self.tensor(node.args[0]), self.required_param(prefix, "weight", (1,))
        if x.spaced:
            raise _Refusal("embedding indices have permutable axes")
        self.spaces.fix(weight.ann[0])  # rows are looked up by index
        return _T((*x.ann, self.spaces.norm(weight.ann[1])), self.out_shape(node))

    def batch_norm(self, node: fx.Node, prefix: str) -> _T:
        entries = ("weight", "bias", "running_mean", "running_var")
        params = [p for e in entries if (p := self.module_param(prefix, e)) is not None]
        return self.channel_params(self.tensor(node.args[0]), 1, params)

    def group_norm(self, node: fx.Node, module: nn.GroupNorm, prefix: str) -> _T:
        x = self.tensor(node.args[0])
        ann = self.spaces.norm(x.ann[1])
        if module.num_groups > 1 and ann is not None:
            if not isinstance(ann, _Full) or self.spaces.size[ann.space] % module.num_groups:
                raise _Refusal("GroupNorm groups do not align with the permutable channels")
            if self.spaces.composite(ann.space):
                raise _Refusal("GroupNorm over concatenated channels")
            self.spaces.groups.append((ann.space, module.num_groups, node))
        params = [p for e in ("weight", "bias") if (p := self.module_param(prefix, e))]
        return self.channel_params(x, 1, params)

    def module_layer_norm(self, x: _T, module: nn.LayerNorm, prefix: str) -> _T:
        scale, shift = self.module_param(prefix, "weight"), self.module_param(prefix, "bias")
        return self.layer_norm(x, len(module.normalized_shape), scale, shift)

    # ---- attention ----------------------------------------------------------------------------

    def attention(self, node: fx.Node, module: nn.MultiheadAttention, prefix: str) -> Any:
        """``nn.MultiheadAttention`` called as a layer: ``(output, weights)``."""
        inputs = [self.tensor(_arg(node, i, n)) for i, n in enumerate(("query", "key", "value"))]
        masks = [v for k, v in node.kwargs.items() if k.endswith("mask")] + list(node.args[3:])
        if any(t.spaced for t in _tensors(self.value(masks))):
            raise _Refusal("attention masks with permutable axes")
        out = self.attention_units(node, module, prefix, *inputs)
        meta = node.meta["tensor_meta"]  # ShapeProp's (output, weights) pair
        query = inputs[0]
        return (_T((*query.ann[:-1], out), tuple(meta[0].shape)), _plain(meta[1]))

    def attention_units(
        self, node: fx.Node, module: nn.MultiheadAttention, prefix: str, q: _T, k: _T, v: _T
    ) -> _Ann:
        """Join the spaces of multi-head attention; the output's embedding annotation.

        The in-projection's rows are three spaces side by side: the queries' and keys' units
        (one space: each head's scores are dot products of a query and a key unit by unit),
        and the values' units; both are grouped by head and share their head order (head
        ``h`` of the scores weighs head ``h`` of the values). The out-projection's columns
        are the values' units; its rows and the in-projection's columns are the embedding.
        """
        sp, heads, embed = self.spaces, module.num_heads, module.embed_dim
        qk, values = sp.new(embed), sp.new(embed)
        self.labels[qk] = (f"{prefix}.qk", True)
        self.labels[values] = (f"{prefix}.v", True)
        for space in (qk, values):
            sp.groups.append((space, heads, node))
        sp.tie_union(qk, values)
        rows = _Full(sp.concat([(qk, 1), (qk, 1), (values, 1)]))
        if module._qkv_same_embed_dim:
            packed = self.required_param(prefix, "in_proj_weight")
            for x in (q, k, v):
                sp.meet(packed.ann[1], x.ann[-1])
            sp.meet(packed.ann[0], rows)
        else:
            for x, entry, space in ((q, "q", qk), (k, "k", qk), (v, "v", values)):
                weight = self.required_param(prefix, f"{entry}_proj_weight")
                sp.meet(weight.ann[1], x.ann[-1])
                sp.meet(weight.ann[0], _Full(space))
        if (bias := self.module_param(prefix, "in_proj_bias")) is not None:
            sp.meet(bias.ann[0], rows)
        for entry, space in (("bias_k", qk), ("bias_v", values)):
            if (extra := self.module_param(prefix, entry)) is not None:
                sp.meet(extra.ann[-1], _Full(space))  # appended to the projected keys / values
        out_proj = self.required_param(f"{prefix}.out_proj", "weight", (0,))
        sp.meet(out_proj.ann[1], _Full(values))
        out = sp.norm(out_proj.ann[0])
        if (out_bias := self.module_param(f"{prefix}.out_proj", "bias")) is not None:
            out = sp.meet(out, out_bias.ann[0])
        return out

    # ---- recurrent layers ---------------------------------------------------------------------

    def recurrent(self, node: fx.Node, module: nn.Module, prefix: str) -> Any:
        """``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``: one space of hidden units per layer and
        direction. Each weight's rows are the gates side by side, every gate over the same
        hidden units (``Concat`` of that space, 4 times for an LSTM, 3 for a GRU); the
        recurrent weight's columns are the hidden units too; a layer reads the previous
        layer's hidden units (both directions side by side when bidirectional)."""
        assert isinstance(module, nn.RNNBase)
        if getattr(module, "proj_size", 0):
            raise _Refusal("an LSTM with proj_size > 0 (projected hidden state)")
        sp = self.spaces
        x = self.tensor(node.args[0])
        gates, size = _GATES[type(module)], module.hidden_size
        directions = 2 if module.bidirectional else 1
        layer_in, hidden = self.spaces.norm(x.ann[-1]), []
        for layer in range(module.num_layers):
            spaces = []
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                h = sp.new(size)
                self.labels[h] = (f"{prefix}.l{layer}" + ("_reverse" if direction else ""), True)
                rows = _Full(sp.concat([(h, 1)] * gates)) if gates > 1 else _Full(h)
                w_ih = self.required_param(prefix, f"weight_ih{suffix}")
                w_hh = self.required_param(prefix, f"weight_hh{suffix}")
                sp.meet(w_ih.ann[1], layer_in)
                sp.meet(w_hh.ann[1], _Full(h))
                for entry in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    if (param := self.module_param(prefix, entry + suffix)) is not None:
                        sp.meet(param.ann[0], rows)
                spaces.append(h)
            hidden.append(spaces)
            layer_in = (
                _Full(spaces[0]) if directions == 1 else _Full(sp.concat([(s, 1) for s in spaces]))
            )
        every = [h for spaces in hidden for h in spaces]
        state = _Full(every[0]) if len(every) == 1 else None
        initial = self.value(_arg(node, 1, "hx", None))
        for t in _tensors(initial):
            self.meet_state(t, state, every)
        if state is None and self.state_is_read(node):
            for h in every:
                sp.fix(_Full(h))  # h_n stacks every layer's units on one axis
        meta = node.meta["tensor_meta"]
        output = _T((*x.ann[:-1], sp.norm(layer_in)), tuple(meta[0].shape))
        if directions == 1 and self.calls[node.target] == 1:
            self.inner_site(node, prefix, -1, False, layer_in)
        states = tuple(self.hidden_state(m, state) for m in _tensors_meta(meta[1]))
        return (output, states if isinstance(module, nn.LSTM) else states[0])

    def hidden_state(self, meta: Any, state: _Ann) -> _T:
        shape = tuple(meta.shape)
        return _T((None,) * (len(shape) - 1) + (state,), shape)

    def meet_state(self, t: _T, state: _Ann, every: list[int]) -> None:
        """An initial hidden state given to the layer holds its hidden units on its last axis."""
        if any(a is not None for a in t.ann[:-1]):
            raise _Refusal("an initial hidden state with permutable units on other axes")
        if state is None:
            self.spaces.fix(t.ann[-1])
            for h in every:
                self.spaces.fix(_Full(h))
        else:
            self.spaces.meet(t.ann[-1], state)

    def state_is_read(self, node: fx.Node) -> bool:
        """Whether the final hidden (or cell) state of a recurrent layer is used."""
        return any(
            user.target is operator.getitem and user.args[1] == 1 and len(user.users) > 0
            for user in node.users
        )

    # ---- transformer layers -------------------------------------------------------------------

    def encoder_layer(
        self, node: fx.Node, layer: nn.TransformerEncoderLayer, prefix: str, x: _T
    ) -> _T:
        """``nn.TransformerEncoderLayer``: self-attention and a two-layer feed-forward block,
        each added to the residual stream, LayerNorm before (``norm_first``) or after."""
        act = layer.activation
        relu = act is F.relu or isinstance(act, nn.ReLU)
        if not (act in _FEEDFORWARD_FUNCTIONS or isinstance(act, _ACTIVATION_MODULES)):
            raise _Refusal(
                f"the encoder layer's activation {act!r} is not a known element-wise one"
            )

        def norm1(h: _T) -> _T:
            return self.module_layer_norm(h, layer.norm1, f"{prefix}.norm1")

        def norm2(h: _T) -> _T:
            return self.module_layer_norm(h, layer.norm2, f"{prefix}.norm2")

        def attend(h: _T) -> _T:
            out = self.attention_units(node, layer.self_attn, f"{prefix}.self_attn", h, h, h)
            return _T((*h.ann[:-1], out), h.shape)

        def feed_forward(h: _T) -> _T:
            w1 = self.required_param(f"{prefix}.linear1", "weight", (0,))
            hidden = self.linear(None, h, w1, self.module_param(f"{prefix}.linear1", "bias"))
            self.inner_site(node, f"{prefix}.linear1", -1, relu, hidden.ann[-1])
            w2 = self.required_param(f"{prefix}.linear2", "weight", (0,))
            return self.linear(None, hidden, w2, self.module_param(f"{prefix}.linear2", "bias"))

        def add(a: _T, b: _T) -> _T:
            return self.broadcast([a, b], a.shape)

        if layer.norm_first:
            x = add(x, attend(norm1(x)))
            return add(x, feed_forward(norm2(x)))
        x = norm1(add(x, attend(x)))
        return norm2(add(x, feed_forward(x)))

    def encoder(self, node: fx.Node, module: nn.TransformerEncoder, prefix: str) -> _T:
        """``nn.TransformerEncoder``: its layers in turn, then its final norm if any."""
        self.plain_inputs(node, 1, "attention masks")
        x = self.tensor(node.args[0])
        for i, layer in enumerate(module.layers):
            x = self.encoder_layer(node, layer, f"{prefix}.layers.{i}", x)
            self.inner_site(node, f"{prefix}.layers.{i}", -1, False, x.ann[-1])
        if isinstance(module.norm, nn.LayerNorm):
            x = self.module_layer_norm(x, module.norm, f"{prefix}.norm")
        elif module.norm is not None:
            raise _Refusal(f"a final norm of type {type(module.norm).__name__}")
        return _T(x.ann, self.out_shape(node))


def _tensors_meta(meta: Any) -> list[Any]:
    """The TensorMetadata leaves of a (nested) ShapeProp result, in order."""
    if isinstance(meta, TensorMetadata):  # a NamedTuple: test it before tuples
        return [meta]
    if isinstance(meta, list | tuple):
        return [leaf for item in meta for leaf in _tensors_meta(item)]
    return []
