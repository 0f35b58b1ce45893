"""PNG plots of runs and partitions (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Test accuracy per round as a PNG."""
    plt = _pyplot()
    rounds = [r["round"] for r in rows if "test-accuracy" in r]
    acc = [r["test-accuracy"] for r in rows if "test-accuracy" in r]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(rounds, acc, marker="o", ms=3)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def partition_heatmap(counts: np.ndarray, path: Path, title: str) -> None:
    """Per-client label counts (clients x classes) as an annotated heatmap PNG."""
    plt = _pyplot()
    n_clients, n_classes = counts.shape
    fig, ax = plt.subplots(
        figsize=(max(4.0, 0.45 * n_classes + 1.5), max(3.0, 0.3 * n_clients + 1.2)), dpi=120
    )
    im = ax.imshow(counts, aspect="auto", cmap="viridis")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_xticks(range(n_classes))
    ax.set_yticks(range(n_clients))
    if n_clients * n_classes <= 400:
        peak = counts.max() or 1
        for i in range(n_clients):
            for j in range(n_classes):
                color = "black" if counts[i, j] > 0.6 * peak else "white"
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=6, color=color)
    fig.colorbar(im, ax=ax, label="samples")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_scope_spread(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Per round and per layer, the std over clients of the layer's weight std ``s_l``."""
    plt = _pyplot()
    data = [(r["round"], r["scope-sigma-std"]) for r in rows if "scope-sigma-std" in r]
    if not data:
        return
    rounds = [d[0] for d in data]
    per_layer = list(zip(*[d[1] for d in data], strict=True))
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for i, values in enumerate(per_layer):
        ax.plot(rounds, values, marker="o", ms=2, label=f"layer {i}")
    ax.set_xlabel("round")
    ax.set_ylabel("std over clients of s_l")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_paths(results: Sequence[Mapping[str, Any]], path: Path, title: str, key: str) -> None:
    """Loss and accuracy along interpolation paths, one line per ``results[i][key]``."""
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=120)
    for r in results:
        label = f"{key} = {r[key]}"
        ax_loss.plot(r["t"], r["loss"], marker="o", ms=3, label=label)
        ax_acc.plot(r["t"], r["accuracy"], marker="o", ms=3, label=label)
    ax_loss.set_ylabel("test loss")
    ax_acc.set_ylabel("test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("t  (0 = model A, 1 = model B)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sweep(rows: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> None:
    """Mean test accuracy and mean client scope spread per round, one line per variant."""
    plt = _pyplot()
    fig, (ax_acc, ax_spread) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=120)
    colors = plt.get_cmap("tab20").colors  # distinct colours for up to 20 variants
    for i, (variant, r) in enumerate(rows.items()):
        style = {"label": variant, "lw": 1.2, "color": colors[(2 * i) % 20 + (2 * i) // 20 % 2]}
        style["ls"] = "-" if i < 10 else "--"
        curve = r["accuracy-curve"]
        ax_acc.plot(range(len(curve)), curve, **style)
        spread = r["scope-spread-curve"]
        ax_spread.plot(range(1, len(spread) + 1), spread, **style)
    ax_acc.set_ylabel("test accuracy (mean over seeds)")
    ax_spread.set_ylabel("client scope spread (mean rel. std of s_l)")
    ax_spread.set_yscale("log")
    for ax in (ax_acc, ax_spread):
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
