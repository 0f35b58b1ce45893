"""Vectorised client training: train_many against training.train, client by client."""

from __future__ import annotations

import pytest
import torch

from fedmerge.errors import ConfigError
from fedmerge.models import build_model
from fedmerge.scopes import Scope, WSARegularizer, scope_names, scope_of
from fedmerge.training import SGDSettings, TrainResult, proximal_term, train
from fedmerge.vectorised import ClientJob, can_vectorise, choose_chunk_size, train_many

SHAPE = (1, 8, 8)  # digits-like images: small and fast
# Different sizes: ragged tails (37 = 2*16 + 5), a folded final batch of one (97 = 6*16 + 1,
# whose last batch has 17 samples) and a client with a single short batch (5).
SIZES = (37, 64, 97, 5)
SGD_SETTINGS = {"epochs": 2, "batch_size": 16, "momentum": 0.9, "weight_decay": 1e-3}
# Key -> (model name, options, lr). resnet20 trains at a lower lr: at 0.05 on random labels
# its loss rises and the trajectory amplifies rounding differences.
MODELS = {
    "mlp": ("mlp", {"hidden": (32, 16)}, 0.05),
    "cnn": ("cnn", {}, 0.05),
    "resnet20-group": ("resnet20", {"norm": "group"}, 0.01),
    "resnet20-layer": ("resnet20", {"norm": "layer"}, 0.01),
}
REGULARIZERS = {"none": (0.0, 0.0), "fedprox": (0.1, 0.0), "wsa": (0.0, 1.0), "both": (0.1, 1.0)}
# Tolerances per dtype. Why float64 for resnet20: a step of it has about 10^6 pre-ReLU values,
# so every few steps one lies within float32 rounding (1e-7) of zero, and any change of
# summation order (grouped vs plain convolutions) can flip that ReLU's gradient. The flip is a
# discrete jump of ~1e-4 in the weights; the per-client path shows the same jump when its
# starting weights are perturbed by 1e-7. In float64 such a flip needs a pre-activation within
# 1e-16 of zero, so the comparison can be tight. mlp and cnn are also checked in float32.
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-9, 1e-11)}
CASES = [(key, torch.float32) for key in ("mlp", "cnn")] + [(key, torch.float64) for key in MODELS]


def _model(key: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    name, options, _ = MODELS[key]
    return build_model(name, SHAPE, 10, seed=seed, **options).to(dtype)


def _shards(sizes=SIZES, seed=1, dtype=torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, *SHAPE, generator=g, dtype=torch.float64).to(dtype),
            torch.randint(0, 10, (n,), generator=g),
        )
        for n in sizes
    ]


def _shifted_target(state: dict[str, torch.Tensor], names=None) -> Scope:
    scope = scope_of(state, names or scope_names(state))
    return Scope(
        scope.names, tuple(m + 0.01 for m in scope.mu), tuple(s * 1.2 for s in scope.sigma)
    )


def _reference(
    key: str, job: ClientJob, lr: float, settings: dict | None = None
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """What the per-client path (as clients/client_app.py runs it) gives for one job."""
    model = _model(key, dtype=job.x.dtype)
    model.load_state_dict(job.state)
    regs = []
    if job.proximal_mu > 0:
        regs.append(
            proximal_term([p.detach().clone() for p in model.parameters()], job.proximal_mu)
        )
    if job.wsa_target is not None and job.wsa_lambda > 0:
        regs.append(WSARegularizer(job.wsa_target, job.wsa_lambda, reverse=job.wsa_reverse))
    settings = SGD_SETTINGS if settings is None else settings
    sgd = SGDSettings(lr=lr, **settings)
    result = train(model, job.x, job.y, sgd, seed=job.seed, regularizers=regs)
    return model.state_dict(), result


def _assert_same(
    key: str, jobs: list[ClientJob], out, lr: float, settings: dict | None = None
) -> None:
    assert len(out) == len(jobs)
    for job, (state, result) in zip(jobs, out, strict=True):
        ref_state, ref_result = _reference(key, job, lr, settings)
        rtol, atol = TOLERANCES[job.x.dtype]
        assert list(state) == list(ref_state)
        for name, tensor in ref_state.items():
            assert state[name].dtype == tensor.dtype
            torch.testing.assert_close(state[name], tensor, rtol=rtol, atol=atol)
        assert (result.steps, result.num_examples) == (ref_result.steps, ref_result.num_examples)
        assert result.loss == pytest.approx(ref_result.loss, rel=rtol * 10, abs=atol)
        assert result.seconds >= 0


@pytest.mark.parametrize("reg", list(REGULARIZERS))
@pytest.mark.parametrize(("key", "dtype"), CASES, ids=[f"{k}-{str(d)[6:]}" for k, d in CASES])
def test_matches_per_client_training(key: str, dtype: torch.dtype, reg: str) -> None:
    mu, lam = REGULARIZERS[reg]
    model = _model(key, dtype=dtype)
    state = model.state_dict()
    target = _shifted_target(state)
    jobs = [
        ClientJob(state, x, y, seed=10 + i, proximal_mu=mu, wsa_target=target, wsa_lambda=lam)
        for i, (x, y) in enumerate(_shards(dtype=dtype))
    ]
    lr = MODELS[key][2]
    _assert_same(key, jobs, train_many(model, jobs, SGDSettings(lr=lr, **SGD_SETTINGS)), lr)


@pytest.mark.parametrize(
    "settings",
    [
        {"epochs": 1, "batch_size": 8, "momentum": 0.0, "weight_decay": 0.0},
        {"epochs": 3, "batch_size": 32, "momentum": 0.5, "weight_decay": 0.0},
        {"epochs": 1, "batch_size": 200, "momentum": 0.0, "weight_decay": 1e-2},
    ],
)
def test_other_sgd_settings(settings: dict) -> None:
    model = _model("cnn")
    state = model.state_dict()
    jobs = [ClientJob(state, x, y, seed=i, proximal_mu=0.1) for i, (x, y) in enumerate(_shards())]
    _assert_same(
        "cnn", jobs, train_many(model, jobs, SGDSettings(lr=0.05, **settings)), 0.05, settings
    )


def test_per_client_settings_starting_states_and_targets() -> None:
    # Every client its own starting state, coefficients, KL direction and WSA layer set.
    states = [_model("cnn", seed=s).state_dict() for s in range(4)]
    full = scope_names(states[0])
    targets = [
        _shifted_target(states[0]),
        _shifted_target(states[1], full[:2]),
        None,
        _shifted_target(states[3], full[1:]),
    ]
    settings = [(0.0, 1.0, True), (0.1, 0.5, False), (0.2, 1.0, False), (0.0, 2.0, False)]
    jobs = [
        ClientJob(
            state, x, y, seed=3 * i, proximal_mu=mu, wsa_target=t, wsa_lambda=lam, wsa_reverse=rev
        )
        for i, (state, (x, y), t, (mu, lam, rev)) in enumerate(
            zip(states, _shards(), targets, settings, strict=True)
        )
    ]
    _assert_same(
        "cnn",
        jobs,
        train_many(_model("cnn", seed=9), jobs, SGDSettings(lr=0.05, **SGD_SETTINGS)),
        0.05,
    )


def test_chunks_give_the_same_result_as_one_chunk() -> None:
    model = _model("cnn")
    state = model.state_dict()
    jobs = [
        ClientJob(
            state, x, y, seed=i, proximal_mu=0.1, wsa_target=_shifted_target(state), wsa_lambda=1.0
        )
        for i, (x, y) in enumerate(_shards())
    ]
    one = train_many(model, jobs, SGDSettings(lr=0.05, **SGD_SETTINGS))
    for chunk_size in (1, 2, 3):
        chunked = train_many(
            model, jobs, SGDSettings(lr=0.05, **SGD_SETTINGS), chunk_size=chunk_size
        )
        for (s1, r1), (s2, r2) in zip(one, chunked, strict=True):
            for name in s1:
                torch.testing.assert_close(s2[name], s1[name], rtol=1e-5, atol=1e-6)
            assert (r1.steps, r1.num_examples) == (r2.steps, r2.num_examples)
            assert r2.loss == pytest.approx(r1.loss, rel=1e-5)


def test_deterministic_and_leaves_inputs_model_and_rng_alone() -> None:
    model = _model("resnet20-group").eval()
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    state = _model("resnet20-group", seed=1).state_dict()
    jobs = [
        ClientJob(
            state, x, y, seed=i, proximal_mu=0.1, wsa_target=_shifted_target(state), wsa_lambda=1.0
        )
        for i, (x, y) in enumerate(_shards(sizes=(20, 9)))
    ]
    copies = [({k: v.clone() for k, v in j.state.items()}, j.x.clone(), j.y.clone()) for j in jobs]
    rng = torch.get_rng_state()
    runs = [train_many(model, jobs, SGDSettings(lr=0.01, **SGD_SETTINGS)) for _ in range(2)]
    assert torch.equal(rng, torch.get_rng_state())
    for (s1, r1), (s2, r2) in zip(*runs, strict=True):
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
        assert (r1.loss, r1.steps) == (r2.loss, r2.steps)
    for job, (state_copy, x, y) in zip(jobs, copies, strict=True):
        assert all(torch.equal(job.state[k], v) for k, v in state_copy.items())
        assert torch.equal(job.x, x) and torch.equal(job.y, y)
    # The model is only a template: weights untouched, eval mode restored.
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before_model.items())
    assert not any(m.training for m in model.modules())
    # Trained states do not share memory with each other or with the inputs.
    a, b = runs[0][0][0]["fc.weight"], runs[0][1][0]["fc.weight"]
    assert a.data_ptr() != b.data_ptr() and a.data_ptr() != state["fc.weight"].data_ptr()


def test_results_steps_fold_epochs_zero_and_seconds() -> None:
    model = _model("mlp")
    state = model.state_dict()
    jobs = [ClientJob(state, x, y, seed=0) for x, y in _shards(sizes=(17, 1, 48))]
    out = train_many(model, jobs, SGDSettings(3, 16, 0.05))
    # 17 samples: one batch of 16 and one of 1, folded into one batch of 17 per epoch.
    assert [r.steps for _, r in out] == [3, 3, 9]
    assert [r.num_examples for _, r in out] == [17, 1, 48]
    assert all(r.seconds > 0 for _, r in out)
    idle = train_many(model, jobs, SGDSettings(0, 16, 0.05))
    for job, (trained, result) in zip(jobs, idle, strict=True):
        assert (result.steps, result.loss) == (0, 0.0)
        assert all(torch.equal(trained[k], v) for k, v in job.state.items())


def test_can_vectorise_refuses_dropout_and_batchnorm() -> None:
    ok, reason = can_vectorise(build_model("vgg9", SHAPE, 10, seed=0))
    assert not ok and "Dropout" in reason
    ok, reason = can_vectorise(build_model("resnet20", SHAPE, 10, norm="batch", seed=0))
    assert not ok and "BatchNorm" in reason
    for key in MODELS:
        assert can_vectorise(_model(key)) == (True, "")
    vgg = build_model("vgg9", SHAPE, 10, seed=0)
    x, y = _shards(sizes=(8,))[0]
    with pytest.raises(ValueError, match="Dropout"):
        train_many(
            vgg, [ClientJob(vgg.state_dict(), x, y, seed=0)], SGDSettings(lr=0.1, **SGD_SETTINGS)
        )


def test_bad_jobs_are_refused() -> None:
    model = _model("mlp")
    state = model.state_dict()
    x, y = _shards(sizes=(8,))[0]
    assert train_many(model, [], SGDSettings(lr=0.1, **SGD_SETTINGS)) == []
    wrong = {k: v for k, v in state.items() if k != "fc1.bias"}
    with pytest.raises(ValueError, match="missing"):
        train_many(model, [ClientJob(wrong, x, y, seed=0)], SGDSettings(lr=0.1, **SGD_SETTINGS))
    with pytest.raises(ValueError, match="non-empty"):
        train_many(
            model, [ClientJob(state, x[:0], y[:0], seed=0)], SGDSettings(lr=0.1, **SGD_SETTINGS)
        )
    target = Scope(("nope.weight",), (0.0,), (1.0,))
    with pytest.raises(ConfigError, match="wsa-layers"):
        job = ClientJob(state, x, y, seed=0, wsa_target=target, wsa_lambda=1.0)
        train_many(model, [job], SGDSettings(lr=0.1, **SGD_SETTINGS))


def test_choose_chunk_size() -> None:
    small = _model("cnn")
    big = build_model("resnet20", (3, 32, 32), 10, norm="group", width=4, seed=0)
    before = {k: v.clone() for k, v in big.state_dict().items()}
    k_small = choose_chunk_size(small, 64, "cpu", input_shape=SHAPE)
    k_big = choose_chunk_size(big, 64, "cpu", input_shape=(3, 32, 32))
    assert isinstance(k_small, int) and 1 <= k_big <= k_small <= 64
    assert choose_chunk_size(small, 64, "cpu") >= 1
    assert all(torch.equal(big.state_dict()[k], v) for k, v in before.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_matches_per_client_training_on_cuda() -> None:
    model = _model("resnet20-group")
    state = model.state_dict()
    jobs = [
        ClientJob(
            state, x, y, seed=i, proximal_mu=0.1, wsa_target=_shifted_target(state), wsa_lambda=1.0
        )
        for i, (x, y) in enumerate(_shards())
    ]
    assert choose_chunk_size(model, 16, "cuda", input_shape=SHAPE) >= 1
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        out = train_many(model, jobs, SGDSettings(lr=0.01, **SGD_SETTINGS), device="cuda")
        for job, (trained, result) in zip(jobs, out, strict=True):
            ref = _model("resnet20-group")
            ref.load_state_dict(job.state)
            regs = [
                proximal_term([p.detach().clone().cuda() for p in ref.parameters()], 0.1),
                WSARegularizer(job.wsa_target, 1.0, device="cuda"),
            ]
            ref_result = train(
                ref,
                job.x,
                job.y,
                SGDSettings(lr=0.01, **SGD_SETTINGS),
                seed=job.seed,
                device="cuda",
                regularizers=regs,
            )
            for name, tensor in ref.state_dict().items():
                assert trained[name].device.type == "cuda"
                torch.testing.assert_close(trained[name], tensor, rtol=1e-4, atol=1e-5)
            assert result.steps == ref_result.steps
            assert result.loss == pytest.approx(ref_result.loss, rel=1e-4)
