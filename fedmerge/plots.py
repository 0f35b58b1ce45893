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
    """Loss and accuracy along interpolation paths, one line per ``results[i][key]``; a result
    with ``matched-loss`` / ``matched-accuracy`` adds its matched path, dashed, in its colour."""
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=120)
    for r in results:
        label = f"{key} = {r[key]}"
        (line,) = ax_loss.plot(r["t"], r["loss"], marker="o", ms=3, label=label)
        ax_acc.plot(r["t"], r["accuracy"], marker="o", ms=3, label=label, color=line.get_color())
        if "matched-loss" in r:
            style = {"ls": "--", "marker": "s", "ms": 3, "color": line.get_color()}
            ax_loss.plot(r["t"], r["matched-loss"], label=f"{label}, matched", **style)
            ax_acc.plot(r["t"], r["matched-accuracy"], label=f"{label}, matched", **style)
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


def _panel_grid(plt: Any, n: int, width: float, height: float) -> tuple[Any, list[Any]]:
    """A figure of ``n`` panels, at most 3 per row; unused panels hidden."""
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(width * cols, height * rows), dpi=120, squeeze=False
    )
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def plot_accuracy_panels(
    panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    path: Path,
    title: str,
) -> None:
    """Test accuracy per round, one panel per key of ``panels`` (e.g. a partition), one line
    per variant: ``panels[panel][variant] = (mean curve, std curve)``, round 0 first; the
    band is mean +- std. A variant keeps its colour in every panel."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = _panel_grid(plt, max(1, len(panels)), 4.2, 3.2)
    variants = list(dict.fromkeys(v for lines in panels.values() for v in lines))
    colors = plt.get_cmap("tab20").colors  # distinct colours for up to 20 variants
    color = {v: colors[(2 * i) % 20 + (2 * i) // 20 % 2] for i, v in enumerate(variants)}
    for ax, (name, lines) in zip(axes, panels.items(), strict=False):
        for variant, (mean, std) in lines.items():
            x = np.arange(len(mean))
            m, s = np.asarray(mean, dtype=float), np.asarray(std, dtype=float)
            ax.plot(x, m, lw=1.2, color=color[variant], label=variant)
            ax.fill_between(x, m - s, m + s, color=color[variant], alpha=0.15, lw=0)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    legend = {}  # one entry per variant, whichever panel it appears in
    for ax in axes:
        legend.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    if legend:  # beside the panels; `bbox_inches` keeps it in the image
        fig.legend(
            list(legend.values()),
            list(legend),
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            fontsize=7,
        )
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def partition_heatmaps(panels: Mapping[str, np.ndarray], path: Path, title: str) -> None:
    """Per-client label counts (clients x classes), one heatmap panel per key of ``panels``."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = _panel_grid(plt, max(1, len(panels)), 4.0, 3.4)
    for ax, (name, counts) in zip(axes, panels.items(), strict=False):
        n_clients, n_classes = counts.shape
        im = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("class")
        ax.set_ylabel("client")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(integer=True, nbins=10))
        if n_clients * n_classes <= 200:
            peak = counts.max() or 1
            for i in range(n_clients):
                for j in range(n_classes):
                    shade = "black" if counts[i, j] > 0.6 * peak else "white"
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=5,
                            color=shade)  # fmt: skip
        fig.colorbar(im, ax=ax, label="samples")
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_scaling(
    sweeps: Mapping[str, Sequence[Mapping[str, Any]]],
    titles: Mapping[str, str],
    path: Path,
    title: str,
) -> None:
    """Seconds per round of ``fedmerge.bench.scaling``'s three sweeps, one panel each:
    against the number of clients (log-log: the round, its training and the rest), per model
    (training and the rest stacked), per strategy (one bar per number of clients)."""
    from matplotlib.ticker import FormatStrFormatter

    plt = _pyplot()
    fig, (ax_n, ax_m, ax_s) = plt.subplots(1, 3, figsize=(15, 4), dpi=120)
    rows = sweeps.get("clients", [])
    n = [r["clients"] for r in rows]
    for key, label in (
        ("seconds_per_round", "round"),
        ("train_seconds", "client training (sum)"),
        ("other_seconds", "the rest (messages, set-up, aggregation)"),
    ):
        ax_n.plot(n, [max(r[key], 1e-4) for r in rows], marker="o", label=label)
    ax_n.set_xscale("log")
    ax_n.set_yscale("log")
    ax_n.set_xticks(n, [str(k) for k in n])
    ax_n.minorticks_off()
    ax_n.set_xlabel("clients")
    ax_n.legend(fontsize=7)
    rows = sweeps.get("models", [])
    x = np.arange(len(rows))
    train = np.array([r["train_seconds"] for r in rows])
    other = np.array([r["other_seconds"] for r in rows])
    ax_m.bar(x, train, label="client training")
    ax_m.bar(x, other, bottom=train, label="the rest")
    ax_m.set_xticks(x, [f"{r['model']}\n{r['parameters']:,} p." for r in rows], fontsize=7)
    ax_m.legend(fontsize=7)
    rows = sweeps.get("strategies", [])
    names = list(dict.fromkeys(r["strategy"] for r in rows))
    counts = list(dict.fromkeys(r["clients"] for r in rows))
    width = 0.8 / max(1, len(counts))
    for i, k in enumerate(counts):
        seconds = {r["strategy"]: r["seconds_per_round"] for r in rows if r["clients"] == k}
        xs = np.arange(len(names)) + (i - (len(counts) - 1) / 2) * width
        ax_s.bar(xs, [seconds.get(s, 0.0) for s in names], width, label=f"{k} clients")
    ax_s.set_xticks(np.arange(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax_s.set_yscale("log")
    ax_s.legend(fontsize=7)
    for ax in (ax_n, ax_s):  # plain numbers (0.3, 2, 40) rather than powers of ten
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    for ax, key in ((ax_n, "clients"), (ax_m, "models"), (ax_s, "strategies")):
        ax.set_title(titles.get(key, key), fontsize=9)
        ax.set_ylabel("seconds per round")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
