"""FedProx Synthetic(alpha, beta): generated, no files."""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from .common import _STREAM_SYNTHETIC, _read_only, _rng
from .loaders import _Arrays, _labels

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# FedProx Synthetic(alpha, beta)
# --------------------------------------------------------------------------------------------

_SYNTHETIC_DIM = 60
_SYNTHETIC_CLASSES = 10


@functools.lru_cache(maxsize=4)
def _synthetic_arrays(num_users: int, alpha: float, beta: float, seed: int) -> _Arrays:
    """Generate FedProx's Synthetic(alpha, beta) (Li et al., MLSys 2020).

    Follows ``generate_synthetic(alpha, beta, iid=False)`` of the FedProx repository:

    - samples of user k: ``int(lognormal(4, 2)) + 50`` -- uncapped, as in FedProx. The tail
      is heavy (median about 105, mean about 450, and a user with tens of thousands of
      samples is possible with many users), but one sample is 240 bytes, so memory stays
      small;
    - ``u_k ~ N(0, alpha)``, ``W_k ~ N(u_k, 1)`` (60x10), ``b_k ~ N(u_k, 1)`` (10);
    - ``B_k ~ N(0, beta)``, ``v_k ~ N(B_k, 1)`` (60), ``x ~ N(v_k, Sigma)`` with
      ``Sigma = diag(j ** -1.2)``, j = 1..60;
    - ``y = argmax(softmax(x W_k + b_k))``.

    As in FedProx's code, alpha and beta are passed as the *scale* (standard deviation) of
    the normal draws. A property of FedProx's generator worth knowing: ``u_k`` shifts every
    entry of ``W_k`` and ``b_k`` alike, hence every logit of a sample by the same amount, so
    the labels do not depend on alpha at all (here, for one seed, alpha changes neither
    ``x`` nor ``y``: the normal draws are ``loc + scale * z`` from the same stream). Even
    Synthetic(0, 0) is strongly non-IID, since each user has its own ``W_k`` and ``v_k``.

    Each user's samples are split 90% train / 10% test (FedProx's ``int(0.9 * n)``); the
    test split is the union of the users' test parts. Features are left as generated (not
    standardised), as FedProx trains on them; ``mean``/``std`` stay empty to say so.
    """
    rng = _rng(seed, _STREAM_SYNTHETIC)
    sizes = rng.lognormal(4, 2, num_users).astype(np.int64) + 50
    u = rng.normal(0.0, alpha, num_users)  # mean of W_k and of b_k
    big_b = rng.normal(0.0, beta, num_users)
    v = rng.normal(big_b[:, None], 1.0, (num_users, _SYNTHETIC_DIM))
    # Sigma is diagonal, so independent normals with these std devs equal the
    # multivariate_normal draw of FedProx (and cost far less).
    sd = np.arange(1, _SYNTHETIC_DIM + 1, dtype=np.float64) ** (-1.2 / 2)

    parts: dict[str, list[np.ndarray]] = {"xtr": [], "ytr": [], "xte": [], "yte": [], "g": []}
    for k in range(num_users):
        w = rng.normal(u[k], 1.0, (_SYNTHETIC_DIM, _SYNTHETIC_CLASSES))
        b = rng.normal(u[k], 1.0, _SYNTHETIC_CLASSES)
        x = v[k] + rng.standard_normal((int(sizes[k]), _SYNTHETIC_DIM)) * sd
        y = np.argmax(x @ w + b, axis=1)  # softmax is monotone: argmax of the logits
        n_tr = int(0.9 * sizes[k])
        parts["xtr"].append(x[:n_tr])
        parts["ytr"].append(y[:n_tr])
        parts["xte"].append(x[n_tr:])
        parts["yte"].append(y[n_tr:])
        parts["g"].append(np.full(n_tr, k, dtype=np.int64))
    logger.info(
        "dataset synthetic(%g, %g): %d users, %d samples (seed %d)",
        alpha,
        beta,
        num_users,
        int(sizes.sum()),
        seed,
    )

    def cat(key: str) -> np.ndarray:
        return np.concatenate(parts[key])

    return _Arrays(
        x_train=torch.from_numpy(cat("xtr").astype(np.float32)),
        y_train=_labels(cat("ytr")),
        x_test=torch.from_numpy(cat("xte").astype(np.float32)),
        y_test=_labels(cat("yte")),
        classes=tuple(str(i) for i in range(_SYNTHETIC_CLASSES)),
        groups=_read_only(cat("g")),
    )
