"""One training step: the per-client and the vectorised path run the same math (fedmerge.step).

If either path's loss (cross-entropy, FedProx's proximal term, the WSA term) or its SGD update
drifts from the other's, one vectorised step on two clients stops matching two per-client
steps, and these tests fail.
"""

from __future__ import annotations

import dataclasses

import torch

from fedmerge import step
from fedmerge.client_side import RequestedTerms
from fedmerge.models import build_model
from fedmerge.scopes import Scope, scope_names, scope_of
from fedmerge.training import SGDSettings, train
from fedmerge.vectorised import ClientJob, train_many

SHAPE = (1, 8, 8)
SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}


def _shifted(state: dict[str, torch.Tensor], names=None) -> Scope:
    scope = scope_of(state, names or scope_names(state))
    return Scope(
        scope.names, tuple(m + 0.05 for m in scope.mu), tuple(s * 1.5 for s in scope.sigma)
    )


def _per_client(model: torch.nn.Module, job: ClientJob, **settings) -> dict[str, torch.Tensor]:
    """``training.train`` with the terms the ClientApp builds (``RequestedTerms``)."""
    model.load_state_dict(job.state)
    terms = RequestedTerms(job.proximal_mu, job.wsa_target, job.wsa_lambda, job.wsa_reverse)
    train(
        model,
        job.x,
        job.y,
        SGDSettings(**settings),
        seed=job.seed,
        regularizers=terms.regularizers(model, "cpu"),
    )
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_vectorised_steps_equal_per_client_steps_with_both_terms() -> None:
    # Float64 so that the tolerance can be tight: a dropped or rescaled term moves the weights
    # by far more than summation-order rounding.
    model = build_model("cnn", SHAPE, 10, seed=0).double()
    states = [build_model("cnn", SHAPE, 10, seed=s).double().state_dict() for s in (1, 2)]
    g = torch.Generator().manual_seed(0)
    # Batches of 8: client 0 (12 samples) takes steps of 8 and 4, client 1 (9 samples) one step
    # of 9 (8 + a folded 1) per epoch. So the vectorised steps pad and mask ragged batches and
    # run the first client alone at its second step. Two epochs: the proximal term's gradient
    # is zero at the first step (the weights are still the reference), not later.
    shards = [
        (
            torch.randn(n, *SHAPE, generator=g, dtype=torch.float64),
            torch.randint(0, 10, (n,), generator=g),
        )
        for n in (12, 9)
    ]
    jobs = [
        ClientJob(states[0], *shards[0], seed=3, proximal_mu=0.5,
                  wsa_target=_shifted(states[0]), wsa_lambda=2.0),
        # Its own target (a subset of layers), coefficients and KL direction.
        ClientJob(states[1], *shards[1], seed=4, proximal_mu=0.2,
                  wsa_target=_shifted(states[1], scope_names(states[1])[1:]), wsa_lambda=1.0,
                  wsa_reverse=True),
    ]  # fmt: skip
    settings = {"epochs": 2, "batch_size": 8, **SGD}
    out = train_many(model, jobs, SGDSettings(**settings))
    assert [result.steps for _, result in out] == [4, 2]
    for job, (state, _) in zip(jobs, out, strict=True):
        template = build_model("cnn", SHAPE, 10, seed=0).double()
        reference = _per_client(template, job, **settings)
        for name, tensor in reference.items():
            torch.testing.assert_close(
                state[name], tensor, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}"
            )
        # Each term matters at this size: without it the step lands far outside the tolerance.
        for without in ({"proximal_mu": 0.0}, {"wsa_target": None, "wsa_lambda": 0.0}):
            other = _per_client(template, dataclasses.replace(job, **without), **settings)
            assert max(float((other[k] - reference[k]).abs().max()) for k in other) > 1e-6


def test_step_functions_on_one_model_and_under_vmap() -> None:
    # The pure functions give the same values on one client's tensors and mapped over clients.
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((2, 4, 3), (2, 5))]
    refs = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    mu = torch.tensor([0.3, 0.0], dtype=torch.float64)
    logits = torch.randn(2, 6, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (2, 6), generator=g)
    mask = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2], dtype=torch.float64)
    mu_t, sigma_t = torch.tensor([0.1, -0.2]), torch.tensor([0.5, 2.0])
    lam = torch.tensor([1.5, 0.0])
    include = torch.tensor([[True, True], [False, False]])

    def client(ps, rs, m, lg, yy, mk, lm, inc):
        terms = (step.proximal(ps, rs, m), step.wsa(ps, mu_t, sigma_t, lm, True, inc))
        return step.loss(lg, yy, terms, mk)

    full, task = torch.func.vmap(client)(params, refs, mu, logits, y, mask, lam, include)
    for k in range(2):
        ps = [p[k] for p in params]
        n = int(mask[k].sum())
        one_task = torch.nn.functional.cross_entropy(logits[k, :n], y[k, :n])
        one = one_task.clone()
        if mu[k] > 0:
            one = one + step.proximal(ps, [r[k] for r in refs], float(mu[k]))
        if lam[k] > 0:
            one = one + step.wsa(ps, mu_t, sigma_t, float(lam[k]), reverse=True)
        torch.testing.assert_close(task[k], one_task)
        torch.testing.assert_close(full[k], one)
    # A client without terms (coefficients 0, no WSA layers) gets exactly its cross-entropy.
    assert full[1] == task[1]


def test_sgd_update_on_stacked_rows_equals_one_client_at_a_time() -> None:
    g = torch.Generator().manual_seed(0)
    stacked = [torch.randn(3, 4, generator=g), torch.randn(3, 2, 2, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in stacked] for _ in range(3)]
    rows = [[p[k].clone() for p in stacked] for k in range(3)]
    buf, bufs = None, [None] * 3
    for grad in grads:
        buf = step.sgd_update(stacked, grad, buf, lr=0.1, momentum=0.9, weight_decay=0.01)
        for k in range(3):
            bufs[k] = step.sgd_update(
                rows[k], [t[k] for t in grad], bufs[k], lr=0.1, momentum=0.9, weight_decay=0.01
            )
    for k in range(3):
        for p, r in zip(stacked, rows[k], strict=True):
            torch.testing.assert_close(p[k], r, rtol=0, atol=0)
