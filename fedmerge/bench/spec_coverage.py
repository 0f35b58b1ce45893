"""Which models' permutation specs can be inferred, and what inference and its check cost.

    python -m fedmerge.bench.spec_coverage [--models resnet18,lstm,...] [--repeat 3]

For each model (torchvision's with ``weights=None`` and 10 classes on small inputs, and three
token classifiers written as users write them: ``nn.TransformerEncoder``, ``nn.LSTM``,
``nn.GRU``), :func:`fedmerge.spec_inference.infer_spec` runs on an example batch of 2 in
float32 on the CPU. Printed: accepted or refused (the refusal's reason), the permutations
found, their units, the spaces that are concatenations (a ``Concat`` axis in the spec), and
the best of ``--repeat`` wall times of the inference alone (``check=False``) and of the check
(a float64 copy of the model in eval mode and two forward passes).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

VOCAB = 40


class TransformerClassifier(nn.Module):
    """Token classifier on ``nn.TransformerEncoder`` (post-norm layers, PyTorch's default)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


class RNNClassifier(nn.Module):
    """Token classifier on a recurrent layer, read from its final hidden state and outputs."""

    def __init__(self, cell: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.rnn = cell(16, 24, batch_first=True)
        self.head = nn.Linear(24, 5)

    def forward(self, tokens: Tensor) -> Tensor:
        out, state = self.rnn(self.embed(tokens))
        hidden = state[0] if isinstance(state, tuple) else state  # LSTM: (h_n, c_n)
        return self.head(hidden[-1] + out.mean(dim=1))


def _vit_b_16() -> nn.Module:
    """torchvision's ViT-B/16 on 32x32 images, its zero-initialised head made random (with a
    zero head every output is the bias, and no permutation could change it)."""
    import torchvision

    model = torchvision.models.vit_b_16(weights=None, num_classes=10, image_size=32)
    nn.init.normal_(model.heads.head.weight, std=0.05)
    return model


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=10)

    return build


#: name -> (factory, input of one example: (C, H, W) images or (T,) tokens).
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    **{
        name: (_torchvision(name), (3, 64, 64) if name.startswith("squeezenet") else (3, 32, 32))
        for name in (
            "resnet18",
            "resnet50",
            "vgg16_bn",
            "mobilenet_v2",
            "mobilenet_v3_small",
            "efficientnet_b0",
            "squeezenet1_0",
            "densenet121",
        )
    },
    "vit_b_16": (_vit_b_16, (3, 32, 32)),
    "transformer-encoder": (TransformerClassifier, (7,)),
    "lstm": (lambda: RNNClassifier(nn.LSTM), (7,)),
    "gru": (lambda: RNNClassifier(nn.GRU), (7,)),
    "shufflenet_v2_x0_5": (_torchvision("shufflenet_v2_x0_5"), (3, 32, 32)),
}


def example(shape: tuple[int, ...], n: int = 2, seed: int = 0) -> Tensor:
    """``n`` random images or token sequences of one example's ``shape``."""
    generator = torch.Generator().manual_seed(seed)
    if len(shape) == 1:
        return torch.randint(0, VOCAB, (n, *shape), generator=generator)
    return torch.randn(n, *shape, generator=generator)


def measure(name: str, repeat: int = 3) -> dict[str, object]:
    """One row of the coverage table."""
    from ..permutations import Concat, check_spec
    from ..spec_inference import SpecInferenceError, infer_spec
    from ..spec_inference.check import check_inferred

    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model, x = factory(), example(shape)
    params = sum(p.numel() for p in model.parameters())
    try:
        infer_times, check_times = [], []
        for _ in range(repeat):
            start = time.perf_counter()
            spec = infer_spec(model, x, check=False)
            infer_times.append(time.perf_counter() - start)
            check_spec(spec, model.state_dict())
            start = time.perf_counter()
            check_inferred(spec, model, (x,))
            check_times.append(time.perf_counter() - start)
    except SpecInferenceError as exc:
        return {"model": name, "params": params, "accepted": False, "reason": str(exc)}
    concat = {
        part.perm
        for axes in spec.axes.values()
        for entry in axes
        if isinstance(entry, Concat)
        for part in entry.parts
        if not isinstance(part, int)
    }
    return {
        "model": name,
        "params": params,
        "accepted": True,
        "perms": len(spec.perms),
        "units": sum(g.size for g in spec.perms.values()),
        "grouped": sum(g.num_groups > 1 for g in spec.perms.values()),
        "in-concat": len(concat),
        "no-site": sum(not g.sites for g in spec.perms.values()),
        "infer-s": min(infer_times),
        "check-s": min(check_times),
    }


def _short(reason: str) -> str:
    """The refusal's node and reason, without the hand-written-spec hint."""
    return reason.split(". Write the spec by hand")[0].split(": fx node ")[-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many timings")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(
        "| model | parameters | accepted | permutations | units | grouped | in a concatenation "
        "| without a site | inference s | check s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        row = measure(name.strip(), args.repeat)
        millions = f"{row['params'] / 1e6:.1f} M"  # type: ignore[operator]
        if not row["accepted"]:
            print(f"| {name} | {millions} | refused: {_short(str(row['reason']))} |||||||")
            continue
        print(
            f"| {name} | {millions} | yes | {row['perms']} | {row['units']} | {row['grouped']} "
            f"| {row['in-concat']} | {row['no-site']} | {row['infer-s']:.2f} "
            f"| {row['check-s']:.2f} |"
        )


if __name__ == "__main__":
    main()
