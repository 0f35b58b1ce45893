"""The strategies as a library: MergeStrategy, per-method options, proxy data, client terms."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
from fedmerge.strategies import (
    FedAvgFineTuned,
    FedMatch,
    FedMatchFineTuned,
    FedNPMerge,
    FedWSA,
    FineTuneOptions,
    MatchOptions,
    MergeStrategy,
    NPOptions,
    WSAOptions,
    fedavg_average,
)
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy import fedavg as flower_fedavg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from strategy_harness import train_reply, train_requests
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedmerge.client_side import RequestedTerms, loss_terms
from fedmerge.config import RunConfig
from fedmerge.errors import ConfigError
from fedmerge.models import build_model, model_spec
from fedmerge.permutations import apply_permutations, random_permutations
from fedmerge.proxy import Proxy, as_proxy
from fedmerge.scopes import Scope, target_to_config

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = (MatchOptions, WSAOptions, FineTuneOptions, NPOptions)


def _mlp(seed=0, hidden=(16,)):
    return build_model("mlp", (1, 8, 8), 10, hidden=hidden, seed=seed)


def _bn_model():
    return build_model("resnet20", (1, 8, 8), 10, seed=0)


def _replies(strategy, states, sizes):
    requests = train_requests(strategy, states[0], len(states))
    return [train_reply(r, s, n) for r, s, n in zip(requests, states, sizes, strict=True)]


def _states(n=3):
    states = [_mlp(seed=i).state_dict() for i in range(n)]
    states.append(_bn_model().state_dict())  # unused by the MLP tests; int buffers below
    return states[:n]


# -- MergeStrategy ---------------------------------------------------------------------------


def test_fedavg_average_is_flowers_mean_to_the_bit_integer_buffers_included():
    states = [_bn_model().state_dict() for _ in range(3)]
    for i, state in enumerate(states):
        for key, value in state.items():
            if value.is_floating_point():
                state[key] = value + 0.37 * i  # distinct models
            else:
                state[key] = value + 7 * i
    weights = [13, 40, 7]
    records = [
        RecordDict({"arrays": ArrayRecord(s), "metrics": train_reply_metrics(n)})
        for s, n in zip(states, weights, strict=True)
    ]
    flower = aggregate_arrayrecords(records, "num-examples")
    ours = ArrayRecord(fedavg_average(states, weights))
    assert list(ours) == list(flower)
    for key in flower:
        a, b = ours[key].numpy(), flower[key].numpy()
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), key


def train_reply_metrics(n):
    from flwr.app import MetricRecord

    return MetricRecord({"num-examples": n})


def test_merge_strategy_without_a_merge_function_is_fedavg(monkeypatch):
    states = _states(3)
    ours, flower = MergeStrategy(fraction_evaluate=0.0), FedAvg(fraction_evaluate=0.0)
    arrays, metrics = ours.aggregate_train(1, _replies(ours, states, [5, 9, 2]))
    expected, expected_metrics = flower.aggregate_train(1, _replies(flower, states, [5, 9, 2]))
    for key in expected:
        assert arrays[key].numpy().tobytes() == expected[key].numpy().tobytes()
    assert dict(metrics) == dict(expected_metrics)


def test_merge_strategy_calls_the_merge_function_and_never_averages(monkeypatch):
    def no_average(*args, **kwargs):
        raise AssertionError("FedAvg's average was computed")

    monkeypatch.setattr(flower_fedavg, "aggregate_arrayrecords", no_average)
    calls = []

    def keep_largest(states, weights, reference, *, seed):
        calls.append((len(states), list(weights), seed, reference))
        best = max(range(len(states)), key=lambda i: weights[i])
        return dict(states[best]), {"picked": float(best)}

    strategy = MergeStrategy(merge=keep_largest, seed=100, fraction_evaluate=0.0)
    states = _states(3)
    replies = _replies(strategy, states, [5, 9, 2])
    arrays, metrics = strategy.aggregate_train(4, replies)
    (n, weights, seed, reference) = calls[0]
    assert (n, weights, seed) == (3, [5.0, 9.0, 2.0], 104)
    assert all(torch.equal(reference[k], states[0][k]) for k in states[0])  # the model sent
    assert all(torch.equal(arrays.to_torch_state_dict()[k], states[1][k]) for k in states[1])
    assert metrics["picked"] == 1.0 and metrics["merge-time"] >= 0
    assert strategy.merge_name == "keep_largest"


@pytest.mark.parametrize(("merge_threads", "inside"), [(1, 1), (2, 2), (0, 3)])
def test_the_merge_runs_on_merge_threads_and_torch_gets_its_setting_back(merge_threads, inside):
    seen = []

    def first(states, weights, reference):
        seen.append(torch.get_num_threads())
        return dict(states[0])

    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        strategy = MergeStrategy(merge=first, merge_threads=merge_threads)
        strategy.aggregate_train(1, _replies(strategy, _states(2), [1, 1]))
        assert seen == [inside] and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(previous)
    with pytest.raises(ValueError, match="merge_threads must be >= 0"):
        MergeStrategy(merge=first, merge_threads=-1)


def test_registry_strategies_take_merge_threads_from_the_run_config():
    from fedmerge.strategies.registry import build_strategy

    cfg = RunConfig.from_mapping({"strategy": "fedmatch", "merge-threads": 2})
    assert build_strategy(cfg).merge_threads == 2
    with pytest.raises(ConfigError, match="merge-threads"):
        RunConfig.from_mapping({"merge-threads": -1})


def test_a_merge_function_may_omit_seed_and_the_report():
    strategy = MergeStrategy(merge=lambda states, weights, reference: dict(states[0]))
    arrays, metrics = strategy.aggregate_train(1, _replies(strategy, _states(2), [1, 1]))
    assert arrays is not None and "merge-time" in metrics
    with pytest.raises(TypeError, match="merge must be a function"):
        MergeStrategy(merge="average")


def test_no_valid_reply_gives_nothing():
    strategy = MergeStrategy(merge=lambda s, w, r: dict(s[0]))
    assert strategy.aggregate_train(1, []) == (None, None)


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", OPTIONS, ids=lambda c: c.__name__)
def test_option_defaults_are_the_run_configs_and_pyprojects(cls):
    assert cls.from_config(RunConfig()) == cls()
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert cls.from_run_config(table) == cls()
    assert set(cls.keys()) <= set(table), "every option key is a run-config key"


def test_options_name_the_key_of_a_bad_value():
    with pytest.raises(ConfigError, match="match-method.*weight"):
        MatchOptions(method="hungarian")
    with pytest.raises(ConfigError, match="match-beta"):
        MatchOptions(beta=1.5)
    with pytest.raises(ConfigError, match="wsa-lambda"):
        WSAOptions(lam=-1.0)
    with pytest.raises(ConfigError, match="finetune-epochs"):
        FineTuneOptions(epochs=0)
    with pytest.raises(ConfigError, match="match-bn-repair"):
        MatchOptions.from_run_config({"match-bn-repair": "yes"})
    with pytest.raises(ConfigError, match="match-sweeps.*match-max-sweeps"):
        MatchOptions.from_run_config({"match-sweeps": 3})
    # Other prefixes are not this class's business.
    assert MatchOptions.from_run_config({"num-server-rounds": 3, "wsa-lambda": 1.0}) == (
        MatchOptions()
    )
    assert WSAOptions.from_run_config({"wsa-lambda": 2}).lam == 2
    assert WSAOptions.key_of("lam") == "wsa-lambda"


def test_keyword_options_reach_the_strategy_and_the_rest_reach_fedavg():
    model = _mlp()
    x = torch.randn(20, 1, 8, 8)
    strategy = FedMatch(model=model, proxy=x, method="dual", beta=0.3, fraction_train=0.5)
    assert strategy.options == MatchOptions(method="dual", beta=0.3)
    assert strategy.fraction_train == 0.5
    base = MatchOptions(reference="largest")
    assert FedMatch(model=model, options=base, iterations=2).options == MatchOptions(
        reference="largest", iterations=2
    )
    wsa = FedWSA(lam=1.0, fusion="mean", min_train_nodes=3)
    assert wsa.options == WSAOptions(lam=1.0, fusion="mean") and wsa.min_train_nodes == 3
    with pytest.raises(TypeError):  # a misspelt option is not silently dropped
        FedMatch(model=model, methd="dual")


# -- proxy data ------------------------------------------------------------------------------


def test_proxy_data_from_tensors_a_dataset_or_a_dataloader_is_the_same():
    x, y = torch.randn(10, 1, 8, 8), torch.arange(10) % 3
    expected = Proxy(x, y)
    for form in (
        (x, y),
        [x, y],
        TensorDataset(x, y),
        DataLoader(TensorDataset(x, y), batch_size=3),
        expected,
    ):
        got = as_proxy(form)
        assert torch.equal(got.x, x) and torch.equal(got.y, y), type(form)
    unlabelled = as_proxy(x)
    assert unlabelled.y is None and not unlabelled.labelled
    assert as_proxy(None) is None and as_proxy(x[:0]) is None
    with pytest.raises(TypeError, match="proxy data"):
        as_proxy("data/")
    with pytest.raises(ValueError, match="10 inputs but 3 labels"):
        Proxy(x, y[:3])


class _DictImages(Dataset):
    """Samples shaped as Flower's quickstart-pytorch serves them from flwr-datasets
    (``partition.with_transform(apply_transforms)``): ``{"img": tensor, "label": int}``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, keys=("img", "label")) -> None:
        self.x, self.y, self.keys = x, y, keys

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {self.keys[0]: self.x[i], self.keys[1]: int(self.y[i]), "id": f"sample-{i}"}


def test_proxy_data_as_dictionary_batches_is_read_by_its_keys():
    x, y = torch.randn(10, 1, 8, 8), torch.arange(10) % 3
    for keys in (("img", "label"), ("image", "fine_label"), ("pixel_values", "labels")):
        for form in (_DictImages(x, y, keys), DataLoader(_DictImages(x, y, keys), batch_size=4)):
            got = as_proxy(form)
            assert torch.equal(got.x, x) and torch.equal(got.y, y), keys
    odd = DataLoader(_DictImages(x, y, ("pixels", "class")), batch_size=4)
    with pytest.raises(TypeError, match=r"keys \['class', 'id', 'pixels'\].*keys="):
        as_proxy(odd)
    got = as_proxy(odd, keys=("pixels", "class"))
    assert torch.equal(got.x, x) and torch.equal(got.y, y)
    assert as_proxy(odd, keys=("pixels", None)).y is None
    with pytest.raises(KeyError, match="no key 'img'"):
        as_proxy(odd, keys=("img", "class"))


def test_fednpmerge_merges_with_a_dataloader_of_dictionary_batches():
    """The quickstart's own loader shape, end to end through a FedNPMerge round: the same
    merge as with the tensors it holds."""
    model = _QuickstartNet()
    x, y = torch.randn(40, 1, 8, 8), torch.arange(40) % 10
    loader = DataLoader(_DictImages(x, y), batch_size=16, shuffle=False)
    strategy = FedNPMerge(model=model, proxy=loader, epochs=1)
    assert torch.equal(strategy.np.proxy.x, x) and torch.equal(strategy.np.proxy.y, y)
    reference = FedNPMerge(model=model, proxy=(x, y), epochs=1)
    torch.manual_seed(1)
    states = [_QuickstartNet().state_dict() for _ in range(2)]
    merged, metrics = strategy.aggregate_train(1, _replies(strategy, states, [1, 1]))
    expected, _ = reference.aggregate_train(1, _replies(reference, states, [1, 1]))
    assert metrics["np-steps"] > 0
    merged, expected = merged.to_torch_state_dict(), expected.to_torch_state_dict()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_strategies_take_any_proxy_form_and_refuse_what_they_cannot_use():
    model, bn = _mlp(), _bn_model()
    x, y = torch.randn(40, 1, 8, 8), torch.arange(40) % 10
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    assert len(FedNPMerge(model=model, proxy=loader).np.proxy) == 40
    assert FedAvgFineTuned(model=model, proxy=TensorDataset(x, y), epochs=2).finetune.options == (
        FineTuneOptions(epochs=2)
    )
    with pytest.raises(ConfigError, match="proxy-size.*labelled"):
        FedNPMerge(model=model, proxy=x)  # NP Merge needs labels
    with pytest.raises(ConfigError, match="proxy-size"):
        FedAvgFineTuned(model=model, proxy=None)
    with pytest.raises(ConfigError, match="finetune-budget.*epochs"):
        FedAvgFineTuned(model=model, proxy=(x, y), budget="steps")
    with pytest.raises(ConfigError, match="proxy-size"):
        FedMatchFineTuned(model=model, proxy=None)
    with pytest.raises(ConfigError, match="BatchNorm"):
        FedMatch(model=bn)
    FedMatch(model=bn, proxy=x)  # unlabelled inputs are enough for repair
    with pytest.raises(ConfigError, match="match-beta.*labelled"):
        FedMatch(model=model, proxy=x, method="dual", beta="auto")


def test_fedmatch_merges_permuted_replies_back_with_a_dataloader_proxy():
    model = _mlp(hidden=(24, 12))
    spec, state = model_spec(model), model.state_dict()
    x = torch.randn(64, 1, 8, 8)
    strategy = FedMatch(
        model=model, proxy=DataLoader(TensorDataset(x), batch_size=10), method="activation"
    )
    generator = torch.Generator().manual_seed(0)
    permuted = [apply_permutations(spec, random_permutations(spec, generator), state)]
    arrays, metrics = strategy.aggregate_train(1, _replies(strategy, [state, *permuted], [1, 1]))
    merged = arrays.to_torch_state_dict()
    assert all(torch.allclose(merged[k], state[k], atol=1e-6) for k in state)
    assert metrics["units-moved"] > 0 and metrics["proxy-size"] == 64


class _QuickstartNet(nn.Module):
    """Flower's quickstart CNN shape for 1x8x8 inputs: no permutation_spec()."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1, self.fc2 = nn.Linear(8 * 2 * 2, 24), nn.Linear(24, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_fedmatch_on_a_model_without_a_spec_merges_permuted_replies_back(method):
    torch.manual_seed(0)
    model = _QuickstartNet()
    x = torch.randn(32, 1, 8, 8)
    with pytest.raises(TypeError, match="example input"):
        FedMatch(model=model)  # nothing to infer the spec from
    strategy = FedMatch(model=model, example_input=x[:2], proxy=x, method=method)
    spec, state = strategy.matched.spec, model.state_dict()
    assert set(spec.perms) == {"P_conv1", "P_conv2", "P_fc1"}
    generator = torch.Generator().manual_seed(1)
    permuted = apply_permutations(spec, random_permutations(spec, generator), state)
    arrays, metrics = strategy.aggregate_train(1, _replies(strategy, [state, permuted], [3, 1]))
    merged = arrays.to_torch_state_dict()
    assert all(torch.allclose(merged[k], state[k], atol=1e-6) for k in state)
    assert metrics["units-moved"] > 0.3  # the mean over both clients; one did not move


def test_fednpmerge_infers_the_spec_from_its_proxy_inputs():
    torch.manual_seed(0)
    x, y = torch.randn(40, 1, 8, 8), torch.arange(40) % 10
    strategy = FedNPMerge(model=_QuickstartNet(), proxy=(x, y), epochs=1)
    assert "P_fc1" in strategy.np.spec.perms
    states = [_QuickstartNet().state_dict() for _ in range(2)]
    arrays, metrics = strategy.aggregate_train(1, _replies(strategy, states, [1, 1]))
    assert arrays is not None and metrics["np-steps"] > 0


def test_fedwsa_matched_from_keywords_needs_a_model():
    with pytest.raises(TypeError, match="model="):
        FedWSA(merge="matched")
    strategy = FedWSA(merge="matched", model=_mlp(), lam=0.5)
    assert strategy.merge_name == "matched-weight" and strategy.options.merge == "matched"


# -- client side -----------------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _message(config: dict) -> Message:
    strategy = MergeStrategy()
    request = train_requests(strategy, _Tiny().state_dict(), 2)[0]
    for key, value in config.items():
        request.content["config"][key] = value
    return request


def test_loss_terms_are_zero_without_a_request():
    model = _Tiny()
    terms = loss_terms(_message({}), model)
    assert not terms and terms(model).item() == 0.0


def test_loss_terms_add_fedprox_and_the_wsa_target_a_server_sent():
    torch.manual_seed(0)
    model = _Tiny()
    names = ("fc1.weight", "fc2.weight")
    target = Scope(names, (0.0, 0.0), (0.5, 0.5))
    config = {"proximal-mu": 0.1, **target_to_config(target, 2.0, False)}
    terms = loss_terms(_message(config), model)
    assert terms and terms(model).item() > 0  # the WSA KL of a fresh model is not 0
    prox_only = loss_terms(ConfigRecord({"proximal-mu": 0.1}), model)
    assert prox_only(model).item() == 0.0  # at the received weights
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
    assert prox_only(model).item() == pytest.approx(0.5 * 0.1 * model.fc1.weight.numel())
    loss = terms(model)
    loss.backward()  # differentiable
    assert model.fc1.weight.grad is not None
    assert RequestedTerms.of(ConfigRecord(config)).wsa_lambda == 2.0
    assert RequestedTerms.of({**config, "wsa-lambda": 0.0}).wsa_target is None


def test_loss_terms_name_wsa_layers_when_the_target_does_not_fit_the_model():
    target = Scope(("conv1.weight",), (0.0,), (1.0,))
    terms = loss_terms(target_to_config(target, 1.0, False), _Tiny())
    with pytest.raises(ConfigError, match="wsa-layers"):
        terms(_Tiny())
    with pytest.raises(TypeError, match="Flower Message"):
        loss_terms(42, _Tiny())


# -- fedavg-bn: the control for BatchNorm repair --------------------------------------------


def test_repaired_average_is_fedavg_with_statistics_recomputed_on_the_proxy():
    from fedmerge.strategies import FedAvgRepaired, RepairedAverage

    from fedmerge.merging import repair_batchnorm

    model = _bn_model()
    states = []
    for i in range(2):
        torch.manual_seed(i)
        states.append(_bn_model().state_dict())
        states[-1] = {k: v + 0.1 * i if v.is_floating_point() else v for k, v in states[-1].items()}
    x = torch.randn(50, 1, 8, 8)
    merge = RepairedAverage(model, DataLoader(TensorDataset(x), batch_size=20))
    merged, report = merge(states, [1.0, 3.0], states[0])
    plain = fedavg_average(states, [1.0, 3.0])
    expected = repair_batchnorm(model, plain, x)
    stats = [k for k in merged if k.endswith(("running_mean", "running_var"))]
    assert stats and report == {"proxy-size": 50}
    for key in merged:
        if key in stats:
            assert torch.allclose(merged[key], expected[key])
            assert not torch.allclose(merged[key], plain[key].float(), atol=1e-3)
        elif merged[key].is_floating_point():
            assert torch.equal(merged[key], plain[key].to(merged[key].dtype)), key
    mlp_states = _states(2)
    no_bn, _ = RepairedAverage(_mlp(), x)(mlp_states, [1, 1], mlp_states[0])
    assert all(torch.equal(no_bn[k], v) for k, v in fedavg_average(mlp_states, [1, 1]).items())
    with pytest.raises(ConfigError, match="proxy-size.*fedavg-bn"):
        FedAvgRepaired(model=model, proxy=None)
    with pytest.raises(ConfigError, match="proxy-size.*fedavg-bn"):
        RunConfig.from_mapping({"strategy": "fedavg-bn"})


def test_fedmatch_fine_tuned_aligns_then_fine_tunes_through_the_library_api():
    # Permuted copies of one model: the matched average is that model again (units moved),
    # then NP Merge's budget of Adam steps on the proxy slice changes it.
    model = _mlp()
    spec, state = model.permutation_spec(), model.state_dict()
    x, y = torch.randn(40, 1, 8, 8), torch.arange(40) % 10
    strategy = FedMatchFineTuned(model=model, proxy=(x, y), fraction_evaluate=0.0)
    requests = train_requests(strategy, state, 3)
    g = torch.Generator().manual_seed(0)
    copies = [apply_permutations(spec, random_permutations(spec, g), state) for _ in requests]
    replies = [train_reply(r, c, 10) for r, c in zip(requests, copies, strict=True)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["units-moved"] > 0.5
    assert metrics["finetune-steps"] > 0 and metrics["finetune-epochs"] >= 1
    merged = arrays.to_torch_state_dict()
    assert not all(torch.equal(merged[k], state[k]) for k in state)  # fine-tuned
