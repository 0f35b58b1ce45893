"""One-shot merge experiment: two models trained on disjoint halves of the classes, merged.

The setting of Git Re-Basin (arXiv 2209.04836, "disjoint" experiments) and ZipIt!: model A
is trained from seed ``2s`` on the training samples of the first half of the classes (0-4 on
MNIST), model B from seed ``2s + 1`` on the second half (5-9); both have all ``num_classes``
outputs. Every merge is judged by its *joint* test accuracy over all classes, next to:

- model A and model B alone (each near 50%: they know half the classes);
- the plain average (no alignment);
- the aligned averages, one per matcher (weight, activation, dual-space at several beta);
- the logit ensemble (mean of the two models' logits): the upper reference every weight-space
  merge is measured against (it runs both networks).

The data-based matchers read the activation sites of run-config key ``match-sites`` (every
site of a unit space, or only its last: :func:`fedmerge.matching.selected_sites`).

"Merge-site data" is a small labelled slice of the training split drawn evenly from both halves
(``merge_samples``): activation-based matchers and BatchNorm repair read its inputs; NP Merge
and its control (SGD fine-tuning of the weight-matched average on the same slice) read its
labels too, an advantage the other rows do not get. Models with BatchNorm get their statistics
recomputed on it after *every* merge, the plain average included, so that no row is
handicapped by stale statistics.

Extra rows (e.g. NP Merge) plug in through :data:`EXTRA_METHODS`.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from ..matching import match
from ..merging import BETA_GRID, average, has_batchnorm, repair_batchnorm
from ..models import model_spec
from ..npmerge import NPOptions, np_merge
from ..options import DEFAULT_MATCH_BETA, DEFAULT_MATCH_SITES, MatchOptions
from ..permutations import PermutationSpec, StateDict, apply_permutations
from ..training import SGDSettings, resolve_device, train

if TYPE_CHECKING:
    from ..config import RunConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeSite:
    """Everything a merge method may use: the two models, the template, merge-site data, and
    the activation sites the data-based matchers read (``match-sites``)."""

    model: nn.Module
    a: StateDict
    b: StateDict
    x: Tensor
    y: Tensor
    seed: int
    sites: str = DEFAULT_MATCH_SITES

    @property
    def spec(self) -> PermutationSpec:
        """The template's permutation spec: its own, or inferred from two merge-site inputs."""
        return model_spec(self.model, self.x[:2])


#: Extra one-shot rows: name -> ``fn(site) -> merged state`` (NP Merge registers here).
EXTRA_METHODS: dict[str, Callable[[MergeSite], StateDict]] = {}


def class_halves(y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Boolean masks of the first ``ceil(C/2)`` classes and of the rest."""
    cut = math.ceil(num_classes / 2)
    first = y < cut
    return first, ~first


def merge_site_indices(y: Tensor, num_classes: int, size: int, seed: int) -> np.ndarray:
    """``size`` training indices, half from each class half, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    picks = []
    for mask in class_halves(y, num_classes):
        idx = np.flatnonzero(mask.numpy())
        picks.append(rng.choice(idx, size=min(len(idx), size // 2), replace=False))
    return np.sort(np.concatenate(picks))


def _cpu(state: dict[str, Tensor]) -> StateDict:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _aligned_average(
    site: MergeSite, matcher: str, beta: float = DEFAULT_MATCH_BETA, *, reset_batchnorm: bool = True
) -> StateDict:
    """B aligned to A by ``matcher``, then averaged with A. The data-based matchers read both
    models' activations through BatchNorm statistics recomputed on the merge-site inputs (as
    MuDSC's code does), unless ``reset_batchnorm`` is False (each model's own statistics)."""
    spec = site.spec
    a, b = site.a, site.b
    if reset_batchnorm and matcher != "weight" and has_batchnorm(site.model):
        a, b = (repair_batchnorm(site.model, s, site.x) for s in (a, b))
    options = MatchOptions(method=matcher, beta=beta, sites=site.sites)
    perms = match(spec, a, b, options, model=site.model, inputs=site.x, seed=site.seed)
    return average([site.a, apply_permutations(spec, perms, site.b)], reference=site.a)


def merge_methods(
    betas: Sequence[float], np_options: NPOptions | None = None
) -> dict[str, Callable[[MergeSite], StateDict]]:
    """The weight-space merges of the table, in row order (NP Merge with ``np_options``)."""
    methods: dict[str, Callable[[MergeSite], StateDict]] = {
        "plain average": lambda s: average([s.a, s.b], reference=s.a),
        "weight matching": lambda s: _aligned_average(s, "weight"),
        "activation matching": lambda s: _aligned_average(s, "activation"),
    }
    for beta in betas:

        def dual_row(site: MergeSite, b: float = beta) -> StateDict:
            return _aligned_average(site, "dual", b)

        methods[f"dual (MuDSC) beta={beta:g}"] = dual_row
    methods["dual (MuDSC) beta=auto"] = _auto_beta_average
    # Rows that also use the merge-site *labels*: NP Merge, and its fair control, SGD
    # fine-tuning of the weight-matched average on the same labelled slice.
    options = np_options if np_options is not None else NPOptions()

    def np_row(site: MergeSite) -> StateDict:
        return np_merge_site(site, options=options)

    methods["NP Merge (weight-aligned)"] = np_row
    methods["fine-tuned matched average"] = _fine_tuned_matched_average
    methods.update(EXTRA_METHODS)
    return methods


def _auto_beta_average(
    site: MergeSite,
    *,
    grid: Sequence[float] = BETA_GRID,
    criterion: str = "accuracy",
    reset_batchnorm: bool = True,
) -> StateDict:
    """The dual-matched average at the beta of MuDSC's grid (0.9 .. 0.1) with the highest
    merge-site accuracy, MuDSC's criterion (it reads the merge-site labels, as NP Merge does);
    the chosen candidate's merge itself, not matched again."""
    from ..merging import select_beta

    choice = select_beta(
        [site.a, site.b],
        reference=site.a,
        spec=site.spec,
        model=site.model,
        inputs=site.x,
        labels=site.y,
        options=MatchOptions(
            method="dual", beta="auto", beta_criterion=criterion, bn_repair=True, sites=site.sites
        ),
        grid=grid,
        seed=site.seed,
        reset_batchnorm=reset_batchnorm,
    )
    log.info("beta=auto chose %g (accuracies %s)", choice.beta, choice.accuracies)
    return _cpu(choice.merged)


def _fine_tuned_matched_average(site: MergeSite) -> StateDict:
    """The weight-matched average, fine-tuned with SGD on the merge-site data (10 epochs)."""
    model = copy.deepcopy(site.model)
    model.load_state_dict(_aligned_average(site, "weight"))
    train(model, site.x, site.y, SGDSettings(10, 64, 0.01, momentum=0.9), seed=site.seed)
    return _cpu(model.state_dict())


class _LogitMean(nn.Module):
    """The logit ensemble of two models, as one model."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: Tensor) -> Tensor:
        return (self.a(x) + self.b(x)) / 2


def _ensemble_accuracy(
    model: nn.Module, a: StateDict, b: StateDict, x: Tensor, y: Tensor, device: torch.device
) -> float:
    ensemble = _LogitMean(_loaded(model, a, device), _loaded(model, b, device))
    return float(_correct(ensemble, x, y, 1024).double().mean())


@torch.no_grad()
def _correct(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    """Per-sample hits (bool, on the CPU) of an eval-mode ``model`` on ``(x, y)``."""
    device = next(model.parameters()).device
    hits = [
        model(x[start : start + batch_size].to(device)).argmax(1).cpu()
        == y[start : start + batch_size]
        for start in range(0, len(y), batch_size)
    ]
    return torch.cat(hits)


def _loaded(template: nn.Module, state: StateDict, device: torch.device) -> nn.Module:
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model.to(device).eval()


def one_shot_pair(
    cfg: RunConfig,  # imported for type checking only, as in connectivity.py
    *,
    pair_seed: int,
    epochs: int,
    betas: Sequence[float],
    merge_samples: int,
    model_factory: Callable[[int], nn.Module] | None = None,
) -> list[dict[str, Any]]:
    """Train one pair (seeds ``2s``, ``2s+1``) and score every merge; one row per method.

    ``model_factory(seed)`` builds each model (default: the run-config's ``model``); a user's
    model without ``permutation_spec()`` gets a spec inferred from two merge-site inputs.
    """
    from ..federation import DataSpec, load_data, make_model

    device = resolve_device(cfg.device)
    data = load_data(DataSpec.of(cfg))
    if model_factory is None:

        def model_factory(seed: int) -> nn.Module:
            return make_model(cfg, data, seed=seed)

    first, second = class_halves(data.y_train, data.num_classes)
    models, states = [], []
    for k, mask in enumerate((first, second)):
        seed = 2 * pair_seed + k
        model = model_factory(seed)
        train(
            model,
            data.x_train[mask],
            data.y_train[mask],
            SGDSettings.of(cfg, epochs=epochs),
            seed=seed,
            device=device,
        )
        models.append(model.cpu())
        states.append(_cpu(model.state_dict()))
    template = model_factory(0)
    idx = torch.from_numpy(
        merge_site_indices(data.y_train, data.num_classes, merge_samples, pair_seed)
    )
    site = MergeSite(
        template,
        states[0],
        states[1],
        data.x_train[idx],
        data.y_train[idx],
        pair_seed,
        sites=cfg.match_sites,
    )
    x_test, y_test = data.x_test, data.y_test
    test_first, _ = class_halves(y_test, data.num_classes)

    def score(name: str, state: StateDict, seconds: float) -> dict[str, Any]:
        # One pass over the test set; the per-half accuracies come from the same predictions.
        hits = _correct(_loaded(template, state, device), x_test, y_test, cfg.eval_batch_size)
        acc = float(hits.double().mean())
        acc_a = float(hits[test_first].double().mean())
        acc_b = float(hits[~test_first].double().mean())
        return {
            "method": name,
            "model": type(template).__name__,
            "pair": pair_seed,
            "accuracy": acc,
            "accuracy-first-half": acc_a,
            "accuracy-second-half": acc_b,
            "seconds": seconds,
        }

    rows = [score("model A", states[0], 0.0), score("model B", states[1], 0.0)]
    for name, method in merge_methods(betas, NPOptions.from_config(cfg)).items():
        start = time.perf_counter()
        merged = method(site)
        merged = repair_batchnorm(template, merged, site.x)  # a copy when there is no BN
        rows.append(score(name, merged, time.perf_counter() - start))
        log.info("pair %d %s: %.4f", pair_seed, name, rows[-1]["accuracy"])
    start = time.perf_counter()
    ens = _ensemble_accuracy(template, states[0], states[1], x_test, y_test, device)
    rows.append(
        {
            "method": "logit ensemble",
            "model": type(template).__name__,
            "pair": pair_seed,
            "accuracy": ens,
            "seconds": time.perf_counter() - start,
        }
    )
    return rows


def user_model_factory(ref: str) -> Callable[[int], nn.Module]:
    """A factory ``seed -> model`` for a user's ``nn.Module`` class, named ``FILE.py:Class``
    (or ``package.module:Class``); built with no arguments after ``torch.manual_seed(seed)``.

    Raises
    ------
    FedmergeError
        A reference not of that form, a file that is missing or fails to import, or a name
        that is not an ``nn.Module`` class.
    """
    import importlib
    import importlib.util
    from pathlib import Path

    from ..errors import FedmergeError

    where, sep, name = ref.rpartition(":")
    if not sep or not where or not name:
        raise FedmergeError(f"--model-class: got {ref!r}; allowed: FILE.py:Class or module:Class")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise FedmergeError(f"--model-class: no file {where}")
            spec = importlib.util.spec_from_file_location(f"_fedmerge_user_{path.stem}", path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except FedmergeError:
        raise
    except Exception as exc:  # the user's code: report what failed, not a traceback
        raise FedmergeError(f"--model-class: importing {where} failed: {exc!r}") from exc
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise FedmergeError(f"--model-class: {where} has no nn.Module class {name}")

    def factory(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return cls()

    return factory


def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over pairs per method, and the share of the average-to-ensemble gap closed."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {m: [r for r in rows if r["method"] == m] for m in methods}
    mean = {m: statistics.fmean(r["accuracy"] for r in by[m]) for m in methods}
    out = []
    # Share of the plain-average-to-ensemble gap a merge closes; not defined for the end models.
    no_gap = {"model A", "model B", "logit ensemble"}
    for m in methods:
        accs = [r["accuracy"] for r in by[m]]
        gap = mean.get("logit ensemble", math.nan) - mean.get("plain average", math.nan)
        out.append(
            {
                "method": m,
                "accuracy-mean": mean[m],
                "accuracy-std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "pairs": len(accs),
                "gap-closed": (mean[m] - mean.get("plain average", math.nan)) / gap
                if gap > 0 and m not in no_gap
                else math.nan,
                "seconds-mean": statistics.fmean(r["seconds"] for r in by[m]),
            }
        )
    return out


def one_shot_experiment(
    cfg: RunConfig,
    *,
    pairs: Sequence[int] = (0, 1, 2),
    epochs: int = 5,
    betas: Sequence[float] = (0.25, 0.5, 0.75),
    merge_samples: int = 1000,
    model_factory: Callable[[int], nn.Module] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run every pair; returns (per-pair rows, summary rows). ``progress`` gets one line per
    finished pair (the pair, its merges' best row, the seconds spent and an estimate of what
    is left)."""
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for k, pair in enumerate(pairs, start=1):
        mine = one_shot_pair(
            cfg,
            pair_seed=pair,
            epochs=epochs,
            betas=betas,
            merge_samples=merge_samples,
            model_factory=model_factory,
        )
        rows.extend(mine)
        if progress is not None:
            elapsed = time.perf_counter() - start
            merges = [
                r for r in mine if r["method"] not in ("model A", "model B", "logit ensemble")
            ]
            best = max(merges, key=lambda r: r["accuracy"]) if merges else None
            left = elapsed / k * (len(pairs) - k)
            line = f"[pair {k}/{len(pairs)}, seed {pair}] {len(merges)} merges"
            if best is not None:
                line += f", best {best['method']} {100 * best['accuracy']:.2f}%"
            progress(f"{line}; {elapsed:.0f} s elapsed, about {left / 60:.1f} min left")
    return rows, summarise(rows)


def np_merge_site(
    site: MergeSite,
    *,
    matcher: str = "weight",
    beta: float = DEFAULT_MATCH_BETA,
    options: NPOptions | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """NP Merge row of the one-shot merge table: align B to A, learn on the merge-site data.

    ``site.x``/``site.y`` is the labelled merge-site slice; ``options.holdout`` of it is held
    out for early stopping. ``device`` None picks CUDA when available.
    """
    return np_merge(
        [site.a, site.b],
        reference=site.a,
        model=site.model,
        x=site.x,
        y=site.y,
        spec=site.spec,
        match=MatchOptions(method=matcher, beta=beta, sites=site.sites),
        options=options if options is not None else NPOptions(),
        seed=site.seed,
        device=resolve_device("auto") if device is None else device,
    )
