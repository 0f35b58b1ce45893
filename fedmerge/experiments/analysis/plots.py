"""PNG plots of the weight-averaging analyses (:mod:`fedmerge.analysis`; matplotlib, headless)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .patterns import WeightPatterns


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _wrap(title: str, width: int = 110) -> str:
    return textwrap.fill(title, width)


def _image(t: torch.Tensor) -> tuple[np.ndarray, bool]:
    """``(C, H, W)`` -> an array for ``imshow`` and whether it is RGB (min-max scaled)."""
    a = t.detach().cpu().float().numpy()
    if a.shape[0] == 3:
        lo, hi = a.min(), a.max()
        return np.transpose((a - lo) / (hi - lo + 1e-12), (1, 2, 0)), True
    return a.mean(0), False  # one channel (or the channel mean of other counts)


def _show(ax: Any, t: torch.Tensor, *, signed: bool) -> None:
    """Draw one image: signed maps (weights) on a symmetric red-blue scale, else grey."""
    img, rgb = _image(t)
    if rgb:
        ax.imshow(img)
    elif signed:
        peak = float(np.abs(img).max()) or 1.0
        ax.imshow(img, cmap="RdBu_r", vmin=-peak, vmax=peak)
    else:
        ax.imshow(img, cmap="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_templates(patterns: WeightPatterns, path: Path, title: str) -> None:
    """Class means (top row) above each linear classifier's rows, with correlations ``r``.

    Rows of classes with fewer than ``seen_min`` samples are titled in grey with their count
    ("absent" for none).
    """
    plt = _pyplot()
    labels = list(patterns.templates)
    n_classes = len(patterns.classes)
    fig, axes = plt.subplots(
        len(labels) + 1,
        n_classes,
        figsize=(1.05 * n_classes + 0.8, 1.2 * (len(labels) + 1) + 0.6),
        dpi=120,
        squeeze=False,
    )
    for c in range(n_classes):
        _show(axes[0][c], patterns.means[c], signed=False)
        axes[0][c].set_title(patterns.classes[c][:12], fontsize=7)
    axes[0][0].set_ylabel("class mean", fontsize=7)
    for i, label in enumerate(labels, start=1):
        r = patterns.correlations[label]
        for c in range(n_classes):
            ax = axes[i][c]
            _show(ax, patterns.templates[label][c], signed=True)
            seen, n = c in patterns.seen[label], patterns.counts[label][c]
            text = f"r={float(r[c, c]):.2f}" + ("" if seen else " absent" if n == 0 else f" n={n}")
            ax.set_title(text, fontsize=6, color="black" if seen else "grey")
        axes[i][0].set_ylabel(label, fontsize=7)
    fig.suptitle(_wrap(title), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_filters(patterns: WeightPatterns, path: Path, title: str) -> None:
    """First-layer units of the configured model, one row per training set."""
    plt = _pyplot()
    labels = list(patterns.filters)
    units = max(len(f) for f in patterns.filters.values())
    fig, axes = plt.subplots(
        len(labels),
        units,
        figsize=(0.9 * units + 0.9, 0.95 * len(labels) + 0.6),
        dpi=120,
        squeeze=False,
    )
    for i, label in enumerate(labels):
        filters = patterns.filters[label]
        for u in range(units):
            ax = axes[i][u]
            if u < len(filters):
                _show(ax, filters[u], signed=True)
            else:
                ax.axis("off")
        axes[i][0].set_ylabel(label, fontsize=7)
    fig.suptitle(_wrap(title), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_soups(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Test accuracy per method, one bar per setting; the individual bar spans min to max."""
    plt = _pyplot()
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(settings)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(methods) + 1.5), 3.6), dpi=120)
    for j, setting in enumerate(settings):
        by = {r["method"]: r for r in rows if r["setting"] == setting}
        xs = [i + (j - (len(settings) - 1) / 2) * width for i in range(len(methods))]
        acc = [by[m]["test-accuracy"] if m in by else np.nan for m in methods]
        bars = ax.bar(xs, acc, width, label=setting)
        for x, m in zip(xs, methods, strict=True):
            r = by.get(m, {})
            if "min" in r:
                lo, hi = r["test-accuracy"] - r["min"], r["max"] - r["test-accuracy"]
                ax.errorbar([x], [r["test-accuracy"]], yerr=[[lo], [hi]], color="black", lw=1)
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([m.replace(" (", "\n(") for m in methods], fontsize=7)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.15)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, title="initialisation", title_fontsize=7)
    ax.set_title(_wrap(title, 120), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_scaling(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Per setting: accuracy and agreement with the unscaled merge for each scaled case."""
    plt = _pyplot()
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig_width = max(7.5, 4.2 * len(settings))  # inches: room for the legend and the title
    fig, axes = plt.subplots(1, len(settings), figsize=(fig_width, 4.0), dpi=120, squeeze=False)
    metrics = (
        ("test-accuracy", "test accuracy"),
        ("agreement-unscaled", "agreement with unscaled soup"),
        ("agreement-subset", "agreement with soup of scaled models"),
    )
    for ax, setting in zip(axes[0], settings, strict=True):
        sub = [r for r in rows if r["setting"] == setting]
        names = ["none" if r["case"] == "none" else f"{r['case']}\nx{r['factor']:g}" for r in sub]
        width = 0.8 / len(metrics)
        for j, (key, label) in enumerate(metrics):
            xs = [i + (j - 1) * width for i in range(len(sub))]
            bars = ax.bar(xs, [r[key] for r in sub], width, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=5, padding=1)
        ax.set_xticks(range(len(sub)))
        ax.set_xticklabels(names, fontsize=7)
        ax.set_ylim(0, 1.1)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"{setting} initialisation", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=len(metrics))
    fig.suptitle(_wrap(title, int(14 * fig_width)), fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path)
    plt.close(fig)
