"""Feature noise: the ``noise`` scheme's per-client Gaussian noise on the inputs."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from .common import _is_int, _is_real

# ---------------------------------------------------------------------------------------------
# feature noise
# ---------------------------------------------------------------------------------------------


def add_feature_noise(
    x: torch.Tensor, client_id: int, num_clients: int, sigma: float, seed: int
) -> torch.Tensor:
    """Return ``x`` plus Gaussian noise of std ``sigma * client_id / num_clients``.

    The noise is drawn from a ``torch.Generator`` seeded from ``(seed, client_id)``, so it is the
    same for the same arguments and independent across clients. Client 0 gets no noise. ``x`` is
    never modified; a new tensor is returned (floating point: integer inputs are converted to the
    default float dtype).

    Parameters
    ----------
    x : torch.Tensor
        Inputs of one client (any shape, any device).
    client_id : int
        The client's id, ``0 <= client_id < num_clients``.
    num_clients : int
        Number of clients.
    sigma : float
        Noise scale (``partition-sigma``), ``>= 0``.
    seed : int
        Run seed (``seed``), ``>= 0``.

    Returns
    -------
    torch.Tensor
        ``x + N(0, (sigma * client_id / num_clients)^2)``, same shape and device as ``x``.
    """
    if not _is_int(num_clients) or num_clients < 1:
        raise ConfigError("num-clients", num_clients, "an integer >= 1")
    if not _is_int(client_id) or not 0 <= client_id < num_clients:
        raise ConfigError(
            "num-clients",
            num_clients,
            f"an integer > client id {client_id!r} (client ids run 0 .. num-clients - 1)",
        )
    if not _is_real(sigma) or not np.isfinite(sigma) or sigma < 0:
        raise ConfigError("partition-sigma", sigma, "a finite float >= 0")
    if not _is_int(seed) or seed < 0:
        raise ConfigError("seed", seed, "an integer >= 0")
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    std = float(sigma) * int(client_id) / int(num_clients)
    if std == 0.0:
        return x.to(dtype=dtype, copy=True)
    torch_seed = int(np.random.SeedSequence([int(seed), int(client_id)]).generate_state(1)[0])
    gen = torch.Generator(device="cpu").manual_seed(torch_seed)
    eps = torch.randn(x.shape, generator=gen, dtype=torch.float32)
    return x.to(dtype=dtype) + (std * eps).to(device=x.device, dtype=dtype)
