"""A small pre-norm Vision Transformer (Dosovitskiy et al., ICLR 2021, arXiv 2010.11929)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import Tensor, nn

from fedmerge.errors import ConfigError
from fedmerge.permutations import Axis, PermGroup, PermutationSpec, Site, layer_axes


class Attention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v`` and ``proj`` linear layers.

    Separate layers (rather than one fused ``qkv``) let the rows of q, k and v be permuted
    independently. Plain matmul + softmax, so :func:`torch.func.vmap` and float64 work.

    Parameters
    ----------
    dim : int
        Token width.
    heads : int
        Number of heads; must divide ``dim``.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"{heads} heads do not divide the width {dim}")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Apply attention to tokens ``(N, T, dim)``."""

        def split(t: Tensor) -> Tensor:  # (N, T, dim) -> (N, heads, T, dim / heads)
            return t.unflatten(-1, (self.heads, -1)).transpose(-3, -2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        weights = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((weights @ v).transpose(-3, -2).flatten(-2))


class FeedForward(nn.Module):
    """Token-wise MLP ``fc2(act(fc1(x)))`` with a GELU module (its output is a Site)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Apply to tokens ``(N, T, dim)``."""
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Apply to tokens ``(N, T, dim)``; the output is the residual stream."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small pre-norm Vision Transformer (Dosovitskiy et al., ICLR 2021) for CPU-sized runs.

    ``patch`` (``Conv2d`` C->dim, kernel = stride = patch size) turns the image into
    ``T = (H/p)(W/p)`` tokens; a learned ``cls`` token ``(1, 1, dim)`` is prepended and a
    learned position embedding ``pos`` ``(1, T+1, dim)`` added; then ``depth``
    :class:`TransformerBlock` (``blocks.{i}.norm1``, ``.attn.q/k/v/proj``, ``.norm2``,
    ``.mlp.fc1``, ``.mlp.act`` (GELU), ``.mlp.fc2``), a final LayerNorm ``norm`` and ``head``
    on the cls token. No dropout. ``cls`` and ``pos`` start from a normal(0, 0.02) truncated
    at +-2 std (0.04); linear layers keep PyTorch's default initialisation.

    The registry's ``vit`` uses ``dim = 64 * width``, ``mlp_dim = 128 * width`` (run-config
    ``model-width``), ``depth = 2``, ``heads = 4`` and patch size 4 for images of at least
    16x16 (28x28, 32x32), 2 below (8x8 digits); it has 72,074 parameters on 28x28 with 10
    classes.

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, H, W)``.
    num_classes : int
        Number of output logits.
    dim, depth, heads, mlp_dim : int
        Token width, number of blocks, attention heads (must divide ``dim``), MLP hidden size.
    patch_size : int, optional
        Side of the square patches; by default 4 for images of at least 16x16, else 2.

    Raises
    ------
    ConfigError
        (key ``model``) when the patch size does not divide the image height and width.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_dim: int = 128,
        patch_size: int | None = None,
    ) -> None:
        super().__init__()
        channels, height, width = input_shape
        if patch_size is None:
            patch_size = 4 if min(height, width) >= 16 else 2
        if height % patch_size or width % patch_size:
            raise ConfigError(
                "model",
                "vit",
                f"mlp, cnn or resnet20 for {height}x{width} images",
                hint=f"vit needs image sides divisible by its patch size {patch_size}",
            )
        tokens = (height // patch_size) * (width // patch_size)
        self.heads = heads
        self.patch = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for param in (self.cls, self.pos):
            nn.init.trunc_normal_(param, std=0.02, a=-0.04, b=0.04)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``(N, num_classes)`` for a batch ``(N, C, H, W)``."""
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (N, T, dim)
        cls = self.cls.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])

    def permutation_spec(self) -> PermutationSpec:
        """Stream ``P_res``; per block ``P_block{i}_qk``, ``P_block{i}_vo``, ``P_block{i}_mlp``.

        ``P_res`` indexes every tensor that writes to or reads from the stream (patch rows,
        ``cls``/``pos`` features, every LayerNorm, q/k/v/fc1 columns, proj/fc2 rows, head
        columns); LayerNorm over the features commutes with a consistent permutation of them.
        ``P_block{i}_qk`` (q and k rows) and ``P_block{i}_vo`` (v rows, proj columns) are
        grouped by head (``num_groups = heads``) and share their block order (``vo`` is tied
        to ``qk``): heads move as wholes and together, units move only inside a head.
        Activations: block outputs (``P_res``), q and k outputs, v outputs, the GELU output.
        ``attn.k.bias`` is permuted with ``P_block{i}_qk`` like every key row, although it
        has no effect on the function (it shifts all scores of a query alike, which the
        softmax cancels).
        """
        res = "P_res"
        dim = self.patch.out_channels
        axes = layer_axes("patch", self.patch, res)
        axes |= {"cls": (None, None, Axis(res)), "pos": (None, None, Axis(res))}
        perms: dict[str, PermGroup] = {}
        for index, block in enumerate(cast(Iterable[TransformerBlock], self.blocks)):
            prefix, name = f"blocks.{index}", f"P_block{index}"
            qk, vo, mlp = f"{name}_qk", f"{name}_vo", f"{name}_mlp"
            attn = f"{prefix}.attn"
            axes |= layer_axes(f"{prefix}.norm1", block.norm1, res)
            axes |= layer_axes(f"{attn}.q", block.attn.q, qk, res)
            axes |= layer_axes(f"{attn}.k", block.attn.k, qk, res)
            axes |= layer_axes(f"{attn}.v", block.attn.v, vo, res)
            axes |= layer_axes(f"{attn}.proj", block.attn.proj, res, vo)
            axes |= layer_axes(f"{prefix}.norm2", block.norm2, res)
            axes |= layer_axes(f"{prefix}.mlp.fc1", block.mlp.fc1, mlp, res)
            axes |= layer_axes(f"{prefix}.mlp.fc2", block.mlp.fc2, res, mlp)
            perms[qk] = PermGroup(
                dim, self.heads, sites=(Site(f"{attn}.q", -1), Site(f"{attn}.k", -1))
            )
            perms[vo] = PermGroup(dim, self.heads, tied_to=qk, sites=(Site(f"{attn}.v", -1),))
            perms[mlp] = PermGroup(
                block.mlp.fc1.out_features, sites=(Site(f"{prefix}.mlp.act", -1),)
            )
        axes |= layer_axes("norm", self.norm, res) | layer_axes("head", self.head, None, res)
        sites = tuple(Site(f"blocks.{i}", -1) for i in range(len(self.blocks)))
        return PermutationSpec({res: PermGroup(dim, sites=sites), **perms}, axes)
