"""Plots read at a glance: partitions named in words, seed spread as a band, published results
as a dashed line with a band, error bars of mean ± std. The tests read the drawn artists."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.container import ErrorbarContainer

from fedmerge import plots
from fedmerge.plots import Reference


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures the plot functions close, kept open for inspection."""
    kept: list = []
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    monkeypatch.undo()
    plt.close("all")


@pytest.mark.parametrize(
    ("keys", "label"),
    [
        ({"partition": "iid"}, "IID"),
        ({"partition": "dirichlet", "partition-beta": 0.5}, "Dir(0.5)"),
        ({"partition": "dirichlet", "partition-beta": 0.1, "partition-k": 3}, "Dir(0.1)"),
        ({"partition": "label-quantity", "partition-k": 2}, "#C=2"),
        ({"partition": "quantity-skew", "partition-beta": 0.5}, "quantity skew Dir(0.5)"),
        ({"partition": "noise", "partition-sigma": 0.1}, "feature noise σ=0.1"),
        ({"partition": "natural"}, "natural"),
        ({"partition": "label-quantity"}, "c2"),  # no k: the table's name
        ({"partition": "made-up"}, "c2"),
        ({}, "c2"),
    ],
)
def test_partition_label(keys, label):
    assert plots.partition_label(keys, "c2") == label


def test_dataset_label():
    assert plots.dataset_label("fashion-mnist") == "Fashion-MNIST"
    assert plots.dataset_label("my-data") == "my-data"


def _band(ax, color) -> np.ndarray:
    """The vertices of the fill_between band drawn in ``color``."""
    (band,) = [c for c in ax.collections if np.allclose(c.get_facecolor()[0][:3], color[:3])]
    return band.get_paths()[0].vertices


def test_accuracy_panels_draw_the_seed_mean_the_seed_range_and_the_reference(tmp_path, figures):
    seeds_a = [[0.1, 0.5, 0.6], [0.2, 0.3, 0.9], [0.6, 0.4, 0.7]]  # min/max far from mean ± std
    seeds_b = [[0.1, 0.2, 0.3], [0.1, 0.4, 0.5]]
    panels = {"Dir(0.5)": {"fedavg": seeds_a, "fedprox": seeds_b}, "IID": {"fedavg": seeds_a}}
    ref = Reference(0.8809, 0.0029, "published (not run): Flower")
    path = tmp_path / "acc.png"
    plots.plot_accuracy_panels(panels, path, "Fashion-MNIST", {"Dir(0.5)": ref})
    assert path.stat().st_size > 0
    (fig,) = figures
    dir05, iid = [ax for ax in fig.axes if ax.get_visible()]
    assert (dir05.get_title(), iid.get_title()) == ("Dir(0.5)", "IID")
    for ax, lines in ((dir05, panels["Dir(0.5)"]), (iid, panels["IID"])):
        for variant, curves in lines.items():
            runs = np.array(curves)
            (line,) = [ln for ln in ax.lines if ln.get_label() == variant]
            np.testing.assert_allclose(line.get_ydata(), runs.mean(axis=0))
            vertices = _band(ax, matplotlib.colors.to_rgba(line.get_color()))
            for x in range(runs.shape[1]):  # the band spans exactly the seeds' min..max
                ys = vertices[np.isclose(vertices[:, 0], x), 1]
                assert ys.min() == pytest.approx(runs[:, x].min())
                assert ys.max() == pytest.approx(runs[:, x].max())
    (dashed,) = [ln for ln in dir05.lines if ln.get_label() == ref.label]
    np.testing.assert_allclose(dashed.get_ydata(), [ref.mean, ref.mean])
    (span,) = dir05.patches
    assert (span.get_y(), span.get_y() + span.get_height()) == pytest.approx(
        (ref.mean - ref.std, ref.mean + ref.std)
    )
    assert not [ln for ln in iid.lines if ln.get_label() == ref.label] and not iid.patches
    assert "min..max" in fig.get_suptitle() and "{" not in fig.get_suptitle()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["fedavg", "fedprox", ref.label]


def test_accuracy_points_show_mean_and_sample_std_and_each_seed(tmp_path, figures):
    panels = {"#C=2": {"fedavg": [0.70, 0.78, 0.81], "fedprox": [0.75, 0.76]}}
    ref = Reference(0.781, 0.0251, "published")
    plots.plot_accuracy_points(panels, tmp_path / "p.png", "t", "best", {"#C=2": ref})
    (fig,) = figures
    (ax,) = fig.axes
    assert ax.get_title() == "#C=2"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fedavg", "fedprox"]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert [c.get_label() for c in bars] == ["fedavg", "fedprox"]
    for i, (bar, values) in enumerate(zip(bars, panels["#C=2"].values(), strict=True)):
        mean, std = np.mean(values), np.std(values, ddof=1)
        point, _, (segments,) = bar.lines
        assert (point.get_xdata()[0], point.get_ydata()[0]) == pytest.approx((i, mean))
        (segment,) = segments.get_segments()
        np.testing.assert_allclose(segment[:, 1], [mean - std, mean + std])
    dots = np.concatenate(
        [c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)]
    )
    np.testing.assert_allclose(sorted(dots[:, 1]), sorted([0.70, 0.78, 0.81, 0.75, 0.76]))
    (dashed,) = [ln for ln in ax.lines if ln.get_label() == "published"]
    np.testing.assert_allclose(dashed.get_ydata(), [ref.mean, ref.mean])
    low, high = ax.get_ylim()
    assert low <= ref.mean - ref.std and high >= ref.mean + ref.std  # the band is in view
