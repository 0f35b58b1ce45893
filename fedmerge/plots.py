"""PNG plots of runs and partitions (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from types import ModuleType

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _pyplot() -> ModuleType:
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


# -- labels in words ---------------------------------------------------------------------------
#: How plots name the registered datasets (others keep their key).
DATASET_NAMES = {
    "mnist": "MNIST",
    "fashion-mnist": "Fashion-MNIST",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "synthetic": "Synthetic",
}


def dataset_label(name: str) -> str:
    """A dataset key as a reader knows it (``fashion-mnist`` -> ``Fashion-MNIST``)."""
    return DATASET_NAMES.get(name, name)


def _g(value: Any) -> str:
    """A number without trailing zeros (0.5, 2, 1e-05); anything else as it is."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:g}"
    return str(value)


def partition_label(keys: Mapping[str, Any], name: str = "") -> str:
    """A partition named in words from its run-config keys, as NIID-Bench writes it: ``IID``,
    ``Dir(0.5)`` (dirichlet, ``partition-beta``), ``#C=2`` (label-quantity, ``partition-k``),
    ``quantity skew Dir(0.5)``, ``feature noise σ=0.1`` (noise, ``partition-sigma``),
    ``natural``. Falls back to ``name`` (the spec's table name) when the scheme or the key it
    needs is missing or unknown."""
    scheme = keys.get("partition")
    beta, k, sigma = (keys.get(f"partition-{x}") for x in ("beta", "k", "sigma"))
    if scheme == "iid":
        return "IID"
    if scheme == "natural":
        return "natural"
    if scheme == "dirichlet" and beta is not None:
        return f"Dir({_g(beta)})"
    if scheme == "label-quantity" and k is not None:
        return f"#C={_g(k)}"
    if scheme == "quantity-skew" and beta is not None:
        return f"quantity skew Dir({_g(beta)})"
    if scheme == "noise" and sigma is not None:
        return f"feature noise σ={_g(sigma)}"
    return name or str(scheme or "?")


# -- benchmark grids ---------------------------------------------------------------------------
class Reference(NamedTuple):
    """A published result drawn beside the runs (not run here): a horizontal line at ``mean``
    and, with ``std``, a band of mean +- std; ``label`` names the source in the legend."""

    mean: float
    std: float | None
    label: str


def _variant_colors(plt: ModuleType, variants: Sequence[str]) -> dict[str, Any]:
    """Distinct colours for up to 20 variants (tab20: the dark shades first)."""
    colors = plt.get_cmap("tab20").colors
    return {v: colors[(2 * i) % 20 + (2 * i) // 20 % 2] for i, v in enumerate(variants)}


def _draw_reference(ax: Axes, ref: Reference) -> None:
    ax.axhline(ref.mean, color="black", ls="--", lw=1.0, label=ref.label, zorder=1)
    if ref.std:
        ax.axhspan(ref.mean - ref.std, ref.mean + ref.std, color="black", alpha=0.1, lw=0)


def _figure_legend(fig: Figure, axes: Sequence[Axes]) -> None:
    legend: dict[str, Any] = {}  # one entry per label, whichever panel it appears in
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


def _panel_grid(plt: ModuleType, n: int, width: float, height: float) -> tuple[Figure, list[Axes]]:
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
    panels: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
    path: Path,
    title: str,
    references: Mapping[str, Reference] | None = None,
) -> None:
    """Test accuracy per round, one panel per key of ``panels`` (its title: a partition in
    words), one line per variant: ``panels[title][variant]`` holds the seeds' accuracy curves
    (one per seed, round 0 first); the line is their mean, the translucent band spans their
    min..max. ``references[title]``, where given, is drawn as a dashed line with a band. A
    variant keeps its colour in every panel."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    references = references or {}
    fig, axes = _panel_grid(plt, max(1, len(panels)), 4.2, 3.2)
    color = _variant_colors(plt, list(dict.fromkeys(v for lines in panels.values() for v in lines)))
    seeds = set()
    for ax, (name, lines) in zip(axes, panels.items(), strict=False):
        for variant, curves in lines.items():
            runs = np.atleast_2d(np.asarray(curves, dtype=float))
            seeds.add(len(runs))
            x = np.arange(runs.shape[1])
            ax.plot(x, runs.mean(axis=0), lw=1.2, color=color[variant], label=variant)
            lo, hi = runs.min(axis=0), runs.max(axis=0)
            ax.fill_between(x, lo, hi, color=color[variant], alpha=0.2, lw=0)
        if name in references:
            _draw_reference(ax, references[name])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test accuracy")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    n = "/".join(str(s) for s in sorted(seeds)) or "0"
    how = f"lines: mean over {n} seeds; bands: min..max over the seeds"
    if references:
        how += "; dashed: published result, band ± its std"
    fig.suptitle(f"{title}\n{how}", fontsize=10)
    fig.tight_layout()
    _figure_legend(fig, axes)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def plot_accuracy_points(
    panels: Mapping[str, Mapping[str, Sequence[float]]],
    path: Path,
    title: str,
    ylabel: str = "final-round test accuracy",
    references: Mapping[str, Reference] | None = None,
) -> None:
    """One accuracy per seed (e.g. the final round's), one panel per key of ``panels`` (its
    title): per variant, ``panels[title][variant]``'s mean as a point with an error bar of
    +- its sample std (ddof 1, as the report's tables), and each seed as a small grey dot
    beside it. ``references[title]``, where given, is drawn as a dashed line with a band."""
    plt = _pyplot()
    from matplotlib.ticker import PercentFormatter

    references = references or {}
    fig, axes = _panel_grid(plt, max(1, len(panels)), 4.2, 3.4)
    color = _variant_colors(plt, list(dict.fromkeys(v for vals in panels.values() for v in vals)))
    for ax, (name, values) in zip(axes, panels.items(), strict=False):
        names = list(values)
        for i, variant in enumerate(names):
            v = np.asarray(values[variant], dtype=float)
            v = v[np.isfinite(v)]
            if not v.size:
                continue
            std = float(v.std(ddof=1)) if v.size > 1 else 0.0
            ax.errorbar([i], [float(v.mean())], yerr=[std], fmt="o", ms=5, capsize=3,
                        color=color[variant], label=variant, zorder=3)  # fmt: skip
            ax.scatter(np.full(v.size, i + 0.25), v, s=9, color="0.45", zorder=2, lw=0)
        if name in references:
            _draw_reference(ax, references[name])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_xlim(-0.6, len(names) - 0.4)
        lo, hi = ax.get_ylim()
        pad = max(0.0, 0.05 - (hi - lo)) / 2  # at least 5 points tall
        ax.set_ylim(max(lo - pad, 0.0), min(hi + pad, 1.0))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    how = "points: mean over seeds, bars: ± sample std, grey dots: the seeds"
    if references:
        how += "; dashed: published result, band ± its std"
    fig.suptitle(f"{title}\n{how}", fontsize=10)
    fig.tight_layout()
    _figure_legend(fig, axes)
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
                    ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=5,
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
    """Seconds per round of ``fedmerge.bench.round_cost``'s three sweeps, one panel each:
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
