"""quickstart-fedmerge: the model, the data and the training loop (plain PyTorch)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import MNIST

MEAN, STD = 0.1307, 0.3081  # MNIST pixel statistics


class Net(nn.Module):
    """The quickstart CNN for 1x28x28 MNIST digits (LeNet-5 style)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images."""
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@lru_cache(maxsize=2)
def _mnist(data_root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's images (uint8) and labels, read once per process."""
    ds = MNIST(data_root, train=train, download=False)
    return ds.data, ds.targets.long()


def _dataset(data_root: str, train: bool, idx: np.ndarray | None = None) -> TensorDataset:
    """The samples ``idx`` (default: all) of a split, as normalised 1x28x28 float images."""
    images, labels = _mnist(data_root, train)
    if idx is not None:
        images, labels = images[torch.as_tensor(idx)], labels[torch.as_tensor(idx)]
    return TensorDataset(((images.float() / 255.0 - MEAN) / STD).unsqueeze(1), labels)


def _split(num_train: int, proxy_size: int, max_train_samples: int, seed: int):
    """Shuffle the training split by ``seed``: the server's proxy, then the clients' pool."""
    order = np.random.default_rng(seed).permutation(num_train)
    pool = order[proxy_size:]
    if max_train_samples > 0:
        pool = pool[:max_train_samples]
    return order[:proxy_size], pool


def _partition(labels: np.ndarray, num_partitions: int, alpha: float, seed: int) -> list:
    """Share indices of ``labels`` out to the partitions: IID (``alpha`` = 0) or, per class,
    by proportions drawn from Dirichlet(``alpha``)."""
    rng = np.random.default_rng(seed + 1)
    if alpha <= 0:
        return np.array_split(rng.permutation(len(labels)), num_partitions)
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet([alpha] * num_partitions)
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
            part.extend(chunk.tolist())
    return [np.sort(np.array(p, dtype=int)) for p in parts]


def load_data(
    partition_id: int,
    num_partitions: int,
    data_root: str,
    *,
    batch_size: int = 32,
    max_train_samples: int = 0,
    proxy_size: int = 0,
    alpha: float = 1.0,
    seed: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """One node's partition of MNIST's training split: (train loader, validation loader).

    Every node computes the same split from ``seed``: the first ``proxy_size`` shuffled samples
    belong to the server (:func:`load_proxy`), at most ``max_train_samples`` of the rest are
    shared out; 10% of the partition is held out for federated evaluation.
    """
    _, labels = _mnist(data_root, True)
    _, pool = _split(len(labels), proxy_size, max_train_samples, seed)
    mine = pool[_partition(labels[pool].numpy(), num_partitions, alpha, seed)[partition_id]]
    mine = np.random.default_rng(seed + 2 + partition_id).permutation(mine)
    n_val = len(mine) // 10
    trainloader = DataLoader(_dataset(data_root, True, mine[n_val:]), batch_size, shuffle=True)
    valloader = DataLoader(_dataset(data_root, True, mine[:n_val]), batch_size=256)
    return trainloader, valloader


def load_proxy(
    data_root: str, proxy_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The server's labelled proxy samples (never given to a node), or None."""
    if proxy_size <= 0:
        return None
    _, labels = _mnist(data_root, True)
    proxy, _ = _split(len(labels), proxy_size, 0, seed)
    return _dataset(data_root, True, proxy).tensors


def load_test(data_root: str, batch_size: int = 1000) -> DataLoader:
    """MNIST's test split, for the server's central evaluation."""
    return DataLoader(_dataset(data_root, False), batch_size=batch_size)


def train(net: nn.Module, loader: DataLoader, epochs: int, lr: float, device, terms) -> float:
    """Local SGD with cross-entropy plus the loss terms the strategy asked for.

    ``terms(net)`` is fedmerge's extra loss (FedWSA's scope regularizer; zero for the other
    strategies). Returns the mean training loss.
    """
    net.to(device).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    total, steps = 0.0, 0
    for _ in range(epochs):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(net(images), labels) + terms(net)
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
    return total / max(steps, 1)


def test(net: nn.Module, loader: DataLoader, device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``net`` on ``loader``."""
    net.to(device).eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = net(images)
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
    n = len(loader.dataset)
    return loss / n, correct / n
