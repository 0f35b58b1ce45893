"""Weight-averaging analyses: "Rethinking Weight-Averaged Model-merging", arXiv 2411.09263.

The paper's three probes as functions of a :class:`~fedmerge.config.RunConfig` that train what
they need and return table rows (dicts); ``fedmerge analyse`` prints and plots them.

1. **Weight patterns** (:func:`weight_patterns`): a linear classifier's rows reshaped to the
   image size next to the class-mean images, and the first-layer units of the configured model,
   for a model trained on all data and for models trained on single clients' Non-IID shards.
2. **Weight vs output averaging** (:func:`soups`): for N models, uniform soup, greedy soup,
   logit ensemble and feature ensemble, for models that share an initialisation (the clients of
   one FL round) and for independently initialised ones.
3. **Magnitude scaling** (:func:`scaling`): scale all parameters of one, half or all of the N
   models by a factor M before the uniform average; accuracy and prediction agreement.

Only the abstract of the paper is available here; every protocol detail below is our choice:

- The linear classifier is a separate softmax regression (:class:`LinearClassifier`), because
  the models of :mod:`fedmerge.models` have hidden layers and a hidden unit belongs to no
  class: only a linear model's row ``c`` is "the template of class c". It starts at zero (an
  option: random), so its rows hold what training wrote into them and no initialisation
  noise. Its template-to-class-mean correlation is computed after centring rows and class
  means over the classes: softmax is invariant to adding one vector to every row, so only the
  class-centred part of the rows is determined by the loss.
- A class counts as "seen" by a client with at least ``seen_min`` (10) of its samples and as
  "absent" with none; Dirichlet shards also hold classes with a handful of samples (neither:
  a few samples already write a template into a row).
- Shared initialisation: the N clients of one FedAvg round of ``cfg`` (partition, number of
  clients, local epochs, client seeds of round ``warmup_rounds + 1``), started from the seeded
  initial model or, with ``warmup_rounds > 0``, from the model after that many FedAvg rounds.
  Independent: model k starts from seed ``cfg.seed + 1 + k`` and is trained with the same
  data and seed as client k (``independent_data="shards"``, so the two settings differ only in
  the initialisation) or on the whole training split (``"full"``, the model-soup setting).
- Held-out set = the config's proxy slice of the *training* split (``proxy-size``; 1000 samples,
  or a tenth of a small training split, when it is 0): never seen by any model, never the test
  split. The greedy soup selects on it and BatchNorm models get their statistics recomputed on
  its inputs after every weight average (:func:`fedmerge.merging.repair_batchnorm`).
- Greedy soup (Wortsman et al., ICML 2022): models sorted by held-out accuracy, a model joins
  the (uniform) soup only if the held-out accuracy strictly improves.
- Feature ensemble: mean of the models' penultimate features (the input of the last ``Linear``
  layer) through one head, by default the uniform soup's head (symmetric in the models, and
  it isolates the body: the uniform soup is the same head on the averaged body's features);
  ``feature_head="first"`` uses model 0's head. With each model's own head it would equal the
  logit ensemble (the head is linear).
- Scaling multiplies the parameters (``named_parameters``; not BN running statistics, which are
  recomputed) of models ``0`` (one), ``0..N/2-1`` (half) or all by M, then averages uniformly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ...federation import DataSpec, load_data
from ...training import resolve_device
from .common import (
    CASES,
    DEFAULT_HOLDOUT,
    FEATURE_HEADS,
    INDEPENDENT_DATA,
    SETTINGS,
    accuracy,
    agreement,
    fit,
    head_name,
    outputs,
    with_holdout,
)
from .magnitude import scale_parameters, scaled_indices, scaling_rows
from .patterns import (
    LinearClassifier,
    WeightPatterns,
    class_means,
    diagonal_contrast,
    first_layer_units,
    linear_classifier,
    template_correlation,
    weight_patterns,
)
from .soups import ModelSet, fedavg_rounds, greedy_soup, soup_rows, train_model_set

if TYPE_CHECKING:
    from ...config import RunConfig

__all__ = [
    "CASES",
    "DEFAULT_HOLDOUT",
    "FEATURE_HEADS",
    "INDEPENDENT_DATA",
    "SETTINGS",
    "LinearClassifier",
    "ModelSet",
    "WeightPatterns",
    "accuracy",
    "agreement",
    "class_means",
    "diagonal_contrast",
    "fedavg_rounds",
    "first_layer_units",
    "fit",
    "greedy_soup",
    "head_name",
    "linear_classifier",
    "model_sets",
    "outputs",
    "scale_parameters",
    "scaled_indices",
    "scaling",
    "scaling_rows",
    "soup_rows",
    "soups",
    "template_correlation",
    "train_model_set",
    "weight_patterns",
    "with_holdout",
]


# -- experiments: config in, rows out ---------------------------------------------------------
def model_sets(
    cfg: RunConfig,
    *,
    settings: Sequence[str] = SETTINGS,
    epochs: int | None = None,
    warmup_rounds: int = 0,
    independent_data: str = "shards",
) -> list[ModelSet]:
    """One :class:`ModelSet` per setting (``cfg`` should carry a held-out slice)."""
    return [
        train_model_set(
            cfg, s, epochs=epochs, warmup_rounds=warmup_rounds, independent_data=independent_data
        )
        for s in settings
    ]


def soups(cfg: RunConfig, *, feature_head: str = "soup", **train_options: Any) -> list[dict]:
    """Weight vs output averaging (probe 2) for every setting.

    Parameters
    ----------
    cfg : RunConfig
        The run configuration; a held-out slice is added when ``proxy-size`` is 0
        (:func:`with_holdout`).
    feature_head : {"soup", "first"}
        Head of the feature ensemble.
    **train_options
        ``settings``, ``epochs``, ``warmup_rounds``, ``independent_data`` of
        :func:`model_sets`.

    Returns
    -------
    list of dict
        The rows of :func:`soup_rows`, setting after setting.
    """
    cfg = with_holdout(cfg)
    data, device = load_data(DataSpec.of(cfg)), resolve_device(cfg.device)
    rows: list[dict] = []
    for models in model_sets(cfg, **train_options):
        rows += soup_rows(models, data, feature_head=feature_head, device=device)
    return rows


def scaling(
    cfg: RunConfig,
    *,
    factors: Sequence[float] = (100.0,),
    repair: bool = False,
    **train_options: Any,
) -> list[dict]:
    """The magnitude-scaling probe (probe 3) for every setting.

    Parameters
    ----------
    cfg : RunConfig
        As in :func:`soups`.
    factors : sequence of float
        Factors M (the paper's default probe: 100).
    repair : bool
        BatchNorm-repair every average on the proxy slice (see :func:`scaling_rows`).
    **train_options
        As in :func:`soups`.

    Returns
    -------
    list of dict
        The rows of :func:`scaling_rows`, setting after setting.
    """
    cfg = with_holdout(cfg)
    data, device = load_data(DataSpec.of(cfg)), resolve_device(cfg.device)
    rows: list[dict] = []
    for models in model_sets(cfg, **train_options):
        rows += scaling_rows(models, data, factors=factors, device=device, repair=repair)
    return rows
