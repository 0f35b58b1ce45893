"""The dataset registry: what each dataset is, its files, and the in-memory result type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# --------------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------------


# eq=False: the generated __eq__ would compare tensors element-wise and raise; identity
# equality (and hashing) is what a container of large arrays wants anyway.
@dataclass(frozen=True, eq=False)
class FederatedDataset:
    """One loaded dataset, whole, in memory.

    The tensors may be shared with the per-process cache (see the module docstring): never
    modify them in place.

    Attributes
    ----------
    name : str
        Registry name (``"digits"``, ``"mnist"``, ...).
    x_train : torch.Tensor
        ``float32`` training inputs, normalised; images ``(N, C, H, W)``, vectors ``(N, D)``.
    y_train : torch.Tensor
        ``int64`` training labels in ``[0, num_classes)``.
    x_test, y_test : torch.Tensor
        The split central evaluation scores: the fixed test split, or a validation split
        held out of the training split (``eval_split``); normalised with the training
        statistics.
    x_proxy, y_proxy : torch.Tensor
        The server's proxy slice, held out of the training split (0 rows unless
        ``proxy_size > 0``); normalised like the rest.
    num_classes : int
        Number of classes.
    input_shape : tuple of int
        Shape of one input, e.g. ``(1, 28, 28)`` or ``(60,)``.
    classes : tuple of str
        Class names, indexed by label.
    groups : numpy.ndarray or None
        For ``synthetic``: the generating user (natural client id) of each training sample,
        aligned with ``x_train``; ``None`` for datasets without a natural partition.
    mean, std : tuple of float
        Per-channel statistics (in [0, 1] pixel units) of the full training split that were
        used to normalise; empty for ``synthetic``, whose features are left as generated.
    eval_split : {"test", "validation"}
        What ``x_test``/``y_test`` hold (``validation-size`` > 0: training samples held out
        for choosing hyper-parameters, so that the test split is never read).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_proxy: torch.Tensor
    y_proxy: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    classes: tuple[str, ...]
    groups: np.ndarray | None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    eval_split: str = "test"


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a registered dataset.

    Attributes
    ----------
    name : str
        Registry name.
    input_shape : tuple of int
        Shape of one input.
    num_classes : int
        Number of classes.
    train_size, test_size : int or None
        Sizes of the full training and test splits; ``None`` where they depend on the run
        (``synthetic``).
    source : str
        ``"embedded"`` (ships with an installed package), ``"needs files"`` (read from
        ``data-root``) or ``"generated"`` (made from the seed).
    description : str
        One line for listings.
    files : tuple of str
        The files expected under ``data-root`` (paths relative to it); empty when none.
    training : TrainingDefaults
        The clients' SGD settings a run uses when it leaves ``lr``, ``batch-size`` or
        ``local-epochs`` at 0.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    train_size: int | None
    test_size: int | None
    source: str
    description: str
    files: tuple[str, ...] = ()
    training: TrainingDefaults = field(default_factory=lambda: SMALL_DATA_TRAINING)


@dataclass(frozen=True)
class TrainingDefaults:
    """A dataset's default client training: learning rate, batch size, local epochs."""

    lr: float
    batch_size: int
    local_epochs: int
    source: str  # where the values come from, for listings


#: fedmerge's settings for the small embedded and generated datasets (tuned on digits).
SMALL_DATA_TRAINING: TrainingDefaults = TrainingDefaults(0.05, 16, 2, "fedmerge")
#: NIID-Bench's (Li et al., ICDE 2022, arXiv 2102.02079): SGD lr 0.01, batch 64, 10 local
#: epochs (momentum 0.9 and weight decay 1e-5 are every dataset's defaults).
NIID_BENCH_TRAINING = TrainingDefaults(0.01, 64, 10, "NIID-Bench")


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR100_DIR = "cifar-100-python"
_CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
_CIFAR100_FILES = ("train", "test", "meta")

_DIGIT_CLASSES = tuple(str(i) for i in range(10))
_FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: The registered datasets, by name.
DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "digits",
            (1, 8, 8),
            10,
            1437,
            360,
            "embedded",
            "UCI handwritten digits 8x8 bundled in scikit-learn (fixed 80/20 stratified split)",
        ),
        DatasetInfo(
            "mnist",
            (1, 28, 28),
            10,
            60000,
            10000,
            "needs files",
            "MNIST handwritten digits 28x28 (torchvision layout)",
            tuple(f"MNIST/raw/{f}" for f in _MNIST_FILES),
            NIID_BENCH_TRAINING,
        ),
        DatasetInfo(
            "fashion-mnist",
            (1, 28, 28),
            10,
            60000,
            10000,
            "needs files",
            "Fashion-MNIST clothing images 28x28 (torchvision layout)",
            tuple(f"FashionMNIST/raw/{f}" for f in _MNIST_FILES),
            NIID_BENCH_TRAINING,
        ),
        DatasetInfo(
            "cifar10",
            (3, 32, 32),
            10,
            50000,
            10000,
            "needs files",
            "CIFAR-10 colour images 32x32 (python-pickle layout)",
            tuple(f"{_CIFAR10_DIR}/{f}" for f in _CIFAR10_FILES),
            NIID_BENCH_TRAINING,
        ),
        DatasetInfo(
            "cifar100",
            (3, 32, 32),
            100,
            50000,
            10000,
            "needs files",
            "CIFAR-100 colour images 32x32, 100 fine labels (python-pickle layout)",
            tuple(f"{_CIFAR100_DIR}/{f}" for f in _CIFAR100_FILES),
            NIID_BENCH_TRAINING,
        ),
        DatasetInfo(
            "synthetic",
            (60,),
            10,
            None,
            None,
            "generated",
            "FedProx Synthetic(alpha, beta): 60-dim vectors, one generating user per client",
        ),
    )
}


def describe_datasets() -> list[dict[str, Any]]:
    """Describe every registered dataset, for a ``fedmerge datasets`` listing.

    Returns
    -------
    list of dict
        One dict per dataset with keys ``name``, ``input_shape`` (tuple), ``num_classes``,
        ``train_size`` and ``test_size`` (``None`` where they vary), ``source``
        (``"embedded"``, ``"needs files"`` or ``"generated"``), ``description`` and
        ``files`` (paths expected under ``data-root``, possibly empty).
    """
    return [
        {
            "name": info.name,
            "input_shape": info.input_shape,
            "num_classes": info.num_classes,
            "train_size": info.train_size,
            "test_size": info.test_size,
            "source": info.source,
            "description": info.description,
            "files": list(info.files),
            "training": {
                "lr": info.training.lr,
                "batch-size": info.training.batch_size,
                "local-epochs": info.training.local_epochs,
                "source": info.training.source,
            },
        }
        for info in DATASETS.values()
    ]
