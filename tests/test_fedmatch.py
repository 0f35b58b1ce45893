"""FedMatch: the neuron-matched averaging strategy, with mocked replies and end to end."""

from __future__ import annotations

import pytest
import torch
from fedmerge.strategies.fedmatch import FedMatch
from strategy_harness import train_reply, train_requests

from fedmerge.config import RunConfig
from fedmerge.errors import ConfigError
from fedmerge.federation import DataSpec, load_data, make_model
from fedmerge.merging import BETA_GRID, average
from fedmerge.models import build_model, model_spec
from fedmerge.options import MatchOptions
from fedmerge.permutations import apply_permutations, random_permutations
from fedmerge.results import read_metrics
from fedmerge.runner import run


def _cfg(tmp_path, **over):
    base = {
        "dataset": "digits",
        "num-clients": 4,
        "num-rounds": 2,
        "local-epochs": 1,
        "model": "mlp",
        "mlp-hidden": "32",
        "strategy": "fedmatch",
        "output-dir": str(tmp_path),
        "save-model": False,
        "device": "cpu",
    }
    return RunConfig.from_mapping({**base, **over})


@pytest.mark.parametrize("reference", ["global", "largest", "barycenter"])
def test_permuted_client_replies_merge_back_into_the_global_model(reference):
    model = build_model("mlp", (1, 8, 8), 10, hidden=(24, 12), seed=0)
    spec, state = model_spec(model), model.state_dict()
    strategy = FedMatch(model=model, reference=reference, iterations=2, fraction_evaluate=0.0)
    requests = train_requests(strategy, model.state_dict(), 3)
    g = torch.Generator().manual_seed(0)
    copies = [apply_permutations(spec, random_permutations(spec, g), state) for _ in requests]
    pairs = zip(requests, copies, strict=True)
    replies = [train_reply(r, c, 10 * (i + 1)) for i, (r, c) in enumerate(pairs)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    merged = arrays.to_torch_state_dict()
    if reference == "global":
        assert all(torch.allclose(merged[k], state[k], atol=1e-5) for k in state)
    # Other references keep the largest client's unit order: the same function.
    x = torch.randn(8, 1, 8, 8, generator=g)
    twin = build_model("mlp", (1, 8, 8), 10, hidden=(24, 12), seed=5)
    twin.load_state_dict(merged)
    assert torch.allclose(twin(x), model(x), atol=1e-5)
    assert metrics["units-moved"] > 0.5 and metrics["match-time"] > 0
    assert metrics["proxy-size"] == 0
    # FedAvg on the same replies is far from the model.
    plain = average(copies, [10, 20, 30])
    assert not all(torch.allclose(plain[k], state[k], atol=1e-2) for k in state)


def test_data_based_matching_needs_the_proxy_slice():
    model = build_model("mlp", (1, 8, 8), 10, hidden=(8,), seed=0)
    with pytest.raises(ConfigError, match="proxy-size"):
        FedMatch(model=model, method="activation")
    with pytest.raises(ConfigError, match="proxy-size"):
        RunConfig.from_mapping({"strategy": "fedmatch", "match-method": "dual"})
    RunConfig.from_mapping({"strategy": "fedmatch", "match-method": "dual", "match-beta": 1.0})
    with pytest.raises(ConfigError, match="match-method.*weight"):
        RunConfig.from_mapping({"match-method": "hungarian"})
    bn = build_model("resnet20", (1, 8, 8), 10, seed=0)
    with pytest.raises(ConfigError, match="BatchNorm"):
        FedMatch(model=bn)
    FedMatch(model=bn, bn_repair=False)


@pytest.mark.parametrize(
    "over",
    [
        {},
        {"match-method": "activation", "proxy-size": 200},
        {"match-method": "dual", "match-beta": 0.5, "proxy-size": 200},
        {"match-reference": "barycenter", "match-iterations": 2},
    ],
    ids=["weight", "activation", "dual", "barycenter"],
)
def test_fedmatch_runs_end_to_end_on_the_local_engine(tmp_path, over):
    rows = read_metrics(run(_cfg(tmp_path, **over), "local"))
    assert len(rows) == 3
    last = rows[-1]
    assert last["test-accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert last["proxy-size"] == over.get("proxy-size", 0)
    assert last["match-time"] >= 0 and 0 <= last["units-moved"] <= 1


def test_fedmatch_repairs_batchnorm_on_the_proxy_slice(tmp_path):
    cfg = _cfg(tmp_path, model="resnet20", **{"proxy-size": 100, "num-rounds": 1})
    run_dir = run(cfg.replace(save_model=True), "local")
    rows = read_metrics(run_dir)
    assert rows[-1]["proxy-size"] == 100 and rows[-1]["test-accuracy"] > 0.1
    # The merged model's BatchNorm statistics are its own on the proxy slice: the mean and
    # (unbiased) variance of each BatchNorm layer's inputs over the 100 proxy samples (one
    # batch), not the clients' averaged statistics.
    state = torch.load(run_dir / "model.pt")
    data = load_data(DataSpec.of(cfg))
    model = make_model(cfg, data)
    model.load_state_dict(state)
    inputs = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.register_forward_pre_hook(
                lambda _m, args, name=name: inputs.__setitem__(name, args[0].detach())
            )
    model.train()  # batch statistics, as the repair pass normalises
    with torch.no_grad():
        model(data.x_proxy)
    assert len(inputs) > 10 and len(data.x_proxy) == 100
    for name, x in inputs.items():
        dims = [0, *range(2, x.ndim)]
        mean, var = x.mean(dims), x.var(dims, correction=1)
        torch.testing.assert_close(state[f"{name}.running_mean"], mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(state[f"{name}.running_var"], var, rtol=1e-4, atol=1e-5)


def test_fedwsa_can_aggregate_by_matched_averaging(tmp_path):
    cfg = _cfg(tmp_path, strategy="fedwsa", **{"wsa-merge": "matched", "wsa-lambda": 0.1})
    rows = read_metrics(run(cfg, "local"))
    assert rows[-1]["test-accuracy"] > 0.5 and "wsa-target-sigma" in rows[-1]


def test_fedavg_fine_tuned_on_the_proxy_slice(tmp_path):
    # The control for NP Merge: FedAvg plus server SGD on the same labelled proxy slice
    # (budget "epochs": finetune-epochs of SGD).
    with pytest.raises(ConfigError, match="proxy-size"):
        _cfg(tmp_path, strategy="fedavg-ft")
    over = {"proxy-size": 200, "finetune-epochs": 2, "finetune-budget": "epochs"}
    cfg = _cfg(tmp_path, strategy="fedavg-ft", **over)
    rows = read_metrics(run(cfg, "local"))
    assert rows[-1]["proxy-size"] == 200 and rows[-1]["merge-time"] > 0
    assert rows[-1]["finetune-steps"] == 2 * 4  # 2 epochs of 200 samples at batch 64
    assert rows[-1]["test-accuracy"] > 0.5
    plain = read_metrics(run(cfg.replace(strategy="fedavg", run_name="plain"), "local"))
    assert rows[-1]["test-accuracy"] != plain[-1]["test-accuracy"]  # the server step acts


def test_fedwsa_matched_merge_aligns_to_the_model_it_sent():
    """With ``wsa-merge=matched`` the reference is the global model sent, as for FedMatch.

    Permuted copies of the sent model merge back into it exactly; aligning to the round's
    FedAvg average of those copies (the reference before this was fixed) does not.
    """
    from fedmerge.strategies.registry import build_strategy

    cfg = RunConfig.from_mapping(
        {"strategy": "fedwsa", "wsa-merge": "matched", "model": "mlp", "num-clients": 3}
    )
    strategy = build_strategy(cfg)
    model = make_model(cfg, load_data(DataSpec.of(cfg)), seed=cfg.seed)
    spec, state = model_spec(model), model.state_dict()
    requests = train_requests(strategy, state, 3)
    g = torch.Generator().manual_seed(1)
    copies = [apply_permutations(spec, random_permutations(spec, g), state) for _ in requests]
    replies = [train_reply(r, c, 10) for r, c in zip(requests, copies, strict=True)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    merged = arrays.to_torch_state_dict()
    assert all(torch.allclose(merged[k], state[k], atol=1e-5) for k in state)
    assert "wsa-target-sigma" in metrics


# -- match-beta = auto (MuDSC's selection of the weight/activation mix) ----------------------
@pytest.mark.parametrize("criterion", ["accuracy", "loss"])
def test_auto_beta_picks_the_candidate_whose_merge_scores_best_on_the_proxy(criterion):
    import copy

    from fedmerge.datasets import load_dataset
    from fedmerge.merging import BETA_GRID, matched_average, select_beta
    from fedmerge.training import SGDSettings, evaluate, train

    assert BETA_GRID == (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)  # MuDSC's, its order
    data = load_dataset("digits", seed=0)
    x, y = data.x_train, data.y_train
    states = []
    for k, mask in enumerate((y < 5, y >= 5)):  # two models that disagree: merges differ
        m = build_model("mlp", (1, 8, 8), 10, hidden=(24,), seed=k)
        train(m, x[mask], y[mask], SGDSettings(3, 32, 0.05, momentum=0.9), seed=k)
        states.append({n: v.detach().clone() for n, v in m.state_dict().items()})
    spec, xp, yp = model_spec(m), x[:300], y[:300]
    choice = select_beta(
        states, [1, 1], reference=states[0], spec=spec, model=m, inputs=xp, labels=yp,
        options=MatchOptions(method="dual", beta="auto", beta_criterion=criterion),
    )  # fmt: skip
    assert tuple(choice.losses) == tuple(choice.accuracies) == BETA_GRID
    assert len(set(choice.losses.values())) > 1  # the candidates really differ
    # Each candidate's scores, recomputed independently: the choice is the best by criterion.
    probe = copy.deepcopy(m)
    for beta, loss in choice.losses.items():
        merged = matched_average(
            states, [1, 1], reference=states[0], spec=spec,
            options=MatchOptions(method="dual", beta=beta), model=m, inputs=xp,
        )  # fmt: skip
        probe.load_state_dict(merged)
        got_loss, got_accuracy = evaluate(probe, xp, yp)
        assert got_loss == pytest.approx(loss, rel=1e-6)
        assert got_accuracy == pytest.approx(choice.accuracies[beta])
        if beta == choice.beta:  # the merge returned is the chosen candidate's own
            assert all(torch.equal(merged[k], choice.merged[k]) for k in merged)
    if criterion == "loss":
        assert choice.losses[choice.beta] == min(choice.losses.values())
    else:
        best = max(choice.accuracies.values())
        first = next(b for b in BETA_GRID if choice.accuracies[b] == best)
        assert choice.beta == first  # ties keep the first (larger) beta, as MuDSC's loop
    with pytest.raises(ValueError, match="labelled"):
        select_beta(states, reference=states[0], spec=spec, model=m, inputs=xp, labels=yp[:5])
    assert torch.equal(xp, x[:300])  # inputs untouched


def test_auto_beta_runs_in_fedmatch_and_is_refused_where_one_beta_is_needed(tmp_path):
    over = {"match-method": "dual", "match-beta": "auto", "proxy-size": 200}
    rows = read_metrics(run(_cfg(tmp_path, **over), "local"))
    assert all(r["match-beta"] in BETA_GRID for r in rows[1:])
    with pytest.raises(ConfigError, match="match-beta.*fednpmerge"):
        from fedmerge.strategies.registry import build_strategy

        build_strategy(_cfg(tmp_path, strategy="fednpmerge", **over))
    model = build_model("mlp", (1, 8, 8), 10, hidden=(8,), seed=0)
    with pytest.raises(ConfigError, match="match-beta.*labelled"):
        FedMatch(model=model, method="dual", beta="auto", proxy=torch.zeros(4, 1, 8, 8))
    with pytest.raises(ConfigError, match="match-beta"):
        RunConfig.from_mapping({"match-beta": "sometimes"})


@pytest.mark.parametrize("reference", ["global", "largest"])
def test_when_no_unit_moves_the_merge_is_flowers_fedavg_byte_for_byte(reference, caplog):
    # Clients a small step from a shared start: every matching is the identity, so the round
    # must be Flower's FedAvg exactly (its arrays, dtype and bytes), not up to rounding.
    from flwr.serverapp.strategy import FedAvg

    model = build_model("mlp", (1, 8, 8), 10, hidden=(24, 12), seed=0)
    state = model.state_dict()
    g = torch.Generator().manual_seed(1)
    clients = [{k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in state.items()}]
    clients += [{k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in state.items()}]
    clients += [{k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in state.items()}]
    ours = FedMatch(model=model, reference=reference, fraction_evaluate=0.0)
    theirs = FedAvg(fraction_evaluate=0.0)
    merged = {}
    for name, strategy in (("fedmatch", ours), ("fedavg", theirs)):
        requests = train_requests(strategy, state, 3)
        pairs = zip(requests, clients, strict=True)
        replies = [train_reply(r, c, 7 * (i + 1)) for i, (r, c) in enumerate(pairs)]
        with caplog.at_level("INFO"):
            arrays, metrics = strategy.aggregate_train(1, replies)
        merged[name] = arrays
    assert metrics is not None
    a, b = merged["fedmatch"], merged["fedavg"]
    assert list(a.keys()) == list(b.keys())
    for key in b.keys():
        x, y = a[key].numpy(), b[key].numpy()
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), key
    assert "matching moved no unit this round: the merge is FedAvg's" in caplog.text


@pytest.mark.parametrize("control", ["fedavg-ft", "fedmatch-ft"])
def test_a_budget_matched_control_takes_np_merges_steps_in_the_same_round(tmp_path, control):
    # Without a held-out part nothing stops early: NP Merge runs np-epochs epochs for each of
    # its N - 1 = 3 pairwise problems, and the matched control as many Adam steps.
    over = {"proxy-size": 200, "np-holdout": 0.0, "np-epochs": 2, "run-name": "np"}
    rows = read_metrics(run(_cfg(tmp_path, strategy="fednpmerge", **over), "local"))
    over["run-name"] = control
    ft = read_metrics(run(_cfg(tmp_path, strategy=control, **over), "local"))
    for np_row, ft_row in zip(rows[1:], ft[1:], strict=True):
        assert np_row["np-steps"] == ft_row["finetune-steps"] == 3 * 2 * 4  # 200 at batch 64
        assert ft_row["finetune-epochs"] == 3 * 2
    assert ft[-1]["test-accuracy"] > 0.5
    if control == "fedmatch-ft":
        assert "units-moved" in ft[-1] and "match-time" in ft[-1]
    # With a held-out part both stop by the same rule, within the same cap.
    over = {"proxy-size": 200, "np-epochs": 2, "np-patience": 1, "run-name": "held"}
    held = read_metrics(run(_cfg(tmp_path, strategy=control, **over), "local"))
    assert all(0 < r["finetune-steps"] <= 3 * 2 * 3 for r in held[1:])  # 160 fit at batch 64
    assert all("finetune-holdout-loss-end" in r for r in held[1:])


def test_auto_beta_keeps_the_chosen_candidates_merge_without_matching_again(monkeypatch):
    # MuDSC matches once per candidate beta; the strategy must not match a tenth time.
    import fedmerge.strategies.merges as merges

    def refuse(*args, **kwargs):
        raise AssertionError("matched again at the chosen beta")

    monkeypatch.setattr(merges, "matched_average", refuse)
    model = build_model("mlp", (1, 8, 8), 10, hidden=(12,), seed=0)
    x, y = torch.randn(60, 1, 8, 8), torch.arange(60) % 10
    merge = merges.MatchedMerge(model, merges.MatchOptions(method="dual", beta="auto"), (x, y))
    other = build_model("mlp", (1, 8, 8), 10, hidden=(12,), seed=1).state_dict()
    _, report = merge([model.state_dict(), other], [1.0, 1.0], model.state_dict())
    assert report["match-beta"] in BETA_GRID and report["units-moved"] > 0
