"""Server optimizers (aggregation.optimizer): the maths against numpy written here, against Flower's own
strategies on the same arrays, their settings, and RegionFedAvg carrying the state from round to round."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi
from flwr.serverapp.strategy.fedopt import FedOpt
from flwr.supercore.task_identity import TaskIdentity

from common import keys
from common.config import OPTIMIZER_HYPERPARAMETERS, AggregationSettings
from common.errors import ConfigError
from server.aggregate import OptimizerState, ServerOptimizer
from server.strategy import RegionFedAvg

SHAPES = {"lora_A": (4, 8), "lora_B": (8, 4), "head.bias": (2,), "scalar": ()}
ROUNDS = 5


def arrays(rng: np.random.Generator, dtype: type = np.float32, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: (scale * rng.normal(size=s)).astype(dtype) for k, s in SHAPES.items()}


def trajectory(
    optimizer: ServerOptimizer, start: dict[str, np.ndarray], means: list[dict[str, np.ndarray]]
) -> tuple[list[dict[str, np.ndarray]], OptimizerState]:
    """Each round's mean is taken as an offset from the global model of that round (clients move from it)."""
    state, current, out = OptimizerState(), start, []
    for offset in means:
        mean = {k: (current[k] + offset[k]).astype(current[k].dtype) for k in current}
        current, state = optimizer.step(current, mean, state)
        out.append(current)
    return out, state


# ---------------------------------------------------------------------------------------------------------
# the maths, against numpy written independently here


def reference(
    name: str, hp: dict[str, float], start: dict[str, np.ndarray], offsets: list[dict[str, np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    """Reddi et al. 2021, Algorithm 2 (and FedAvgM), tensor by tensor, zeros as the initial buffers; the global
    model is float32 between rounds, the arithmetic float64."""
    out = []
    x = dict(start)
    m = {k: np.zeros(np.shape(a)) for k, a in x.items()}
    v = {k: np.zeros(np.shape(a)) for k, a in x.items()}
    for offset in offsets:
        new = {}
        for k in x:
            base = x[k].astype(np.float64)
            d = (x[k] + offset[k]).astype(np.float32).astype(np.float64) - base
            if name == "fedavg":
                step = hp["server_lr"] * d
            elif name == "fedavgm":
                m[k] = hp["momentum"] * m[k] + d
                step = hp["server_lr"] * m[k]
            else:
                m[k] = hp["beta_1"] * m[k] + (1.0 - hp["beta_1"]) * d
                if name == "fedadagrad":
                    v[k] = v[k] + d * d
                elif name == "fedadam":
                    v[k] = hp["beta_2"] * v[k] + (1.0 - hp["beta_2"]) * d * d
                else:  # fedyogi
                    v[k] = v[k] - (1.0 - hp["beta_2"]) * d * d * np.sign(v[k] - d * d)
                step = hp["server_lr"] * m[k] / (np.sqrt(v[k]) + hp["tau"])
            new[k] = (base + step).astype(np.float32)
        x = new
        out.append(new)
    return out


@pytest.mark.parametrize("name", list(OPTIMIZER_HYPERPARAMETERS))
def test_each_optimizer_matches_the_papers_update_rules_over_rounds(name: str) -> None:
    rng = np.random.default_rng(len(name))
    hp = {"server_lr": 0.3, "momentum": 0.7, "beta_1": 0.6, "beta_2": 0.95, "tau": 0.05}
    hp = {k: hp[k] for k in OPTIMIZER_HYPERPARAMETERS[name]}
    optimizer = ServerOptimizer(name, **hp)
    assert optimizer.hyperparameters() == hp
    start = arrays(rng)
    offsets = [arrays(rng, scale=0.1) for _ in range(ROUNDS)]
    got, state = trajectory(optimizer, start, offsets)
    want = reference(name, hp, start, offsets)
    for g, w in zip(got, want, strict=True):
        for k in SHAPES:
            assert g[k].dtype == np.float32 and g[k].shape == SHAPES[k]
            np.testing.assert_allclose(g[k], w[k], rtol=1e-6, atol=1e-7)
    assert state.step == ROUNDS
    buffers = {"fedavg": set(), "fedavgm": {"momentum"}}.get(name, {"m", "v"})
    assert {key.split("/", 1)[0] for key in state.arrays} == buffers
    assert all(a.dtype == np.float64 for a in state.arrays.values())
    # the trajectory moved, and differently from plain FedAvg except for fedavg itself
    fedavg, _ = trajectory(ServerOptimizer("fedavg", server_lr=hp["server_lr"]), start, offsets)
    differs = any(not np.array_equal(got[-1][k], fedavg[-1][k]) for k in SHAPES)
    assert differs == (name != "fedavg")


def test_fedavg_at_lr_1_returns_the_mean_bit_for_bit_and_otherwise_the_old_server_step() -> None:
    rng = np.random.default_rng(3)
    current, mean = arrays(rng), arrays(rng)
    same, state = ServerOptimizer().step(current, mean, OptimizerState())
    for k in SHAPES:
        np.testing.assert_array_equal(same[k], mean[k])
        assert same[k] is not mean[k]
    assert state.step == 1 and not state.arrays
    for lr in (0.5, 2.0):
        stepped, _ = ServerOptimizer("fedavg", server_lr=lr).step(current, mean, state)
        for k in SHAPES:
            # the formula server_step used before optimizers existed, in float64, cast back
            old = (np.asarray(current[k], np.float64) + lr * (np.asarray(mean[k], np.float64) - current[k])).astype(
                np.float32
            )
            np.testing.assert_array_equal(stepped[k], old)


def test_fedavgm_with_no_momentum_is_fedavg_and_a_step_leaves_its_inputs_alone() -> None:
    rng = np.random.default_rng(4)
    start = arrays(rng)
    offsets = [arrays(rng, scale=0.1) for _ in range(3)]
    plain, _ = trajectory(ServerOptimizer("fedavg", server_lr=0.5), start, offsets)
    still, _ = trajectory(ServerOptimizer("fedavgm", server_lr=0.5, momentum=0.0), start, offsets)
    for a, b in zip(plain, still, strict=True):
        for k in SHAPES:
            np.testing.assert_array_equal(a[k], b[k])
    optimizer = ServerOptimizer("fedadam", 0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    mean = arrays(rng)
    _, state = optimizer.step(start, mean, OptimizerState())
    snapshot = {k: v.copy() for k, v in state.arrays.items()}
    kept = {k: v.copy() for k, v in start.items()}
    optimizer.step(start, mean, state)
    assert all(np.array_equal(state.arrays[k], snapshot[k]) for k in snapshot)  # pure: the old state is intact
    assert all(np.array_equal(start[k], kept[k]) for k in kept)


def test_a_state_that_is_not_the_optimizers_is_refused() -> None:
    rng = np.random.default_rng(5)
    current, mean = arrays(rng), arrays(rng)
    adam = ServerOptimizer("fedadam", 0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    _, adam_state = adam.step(current, mean, OptimizerState())
    momentum = ServerOptimizer("fedavgm", 1.0, momentum=0.9)
    assert momentum.state_problem(adam_state, current) is not None
    with pytest.raises(ValueError, match="not a fedavgm state"):
        momentum.step(current, mean, adam_state)
    with pytest.raises(ValueError, match="not a fedadam state"):
        adam.step(current, mean, OptimizerState(step=2))  # steps taken but no moments: never silently zeros
    nan = {k: v.copy() for k, v in adam_state.arrays.items()}
    nan["v/lora_A"][0, 0] = np.nan
    assert "v/lora_A" in str(adam.state_problem(OptimizerState(1, nan), current))
    with pytest.raises(ValueError, match="unknown server optimizer"):
        ServerOptimizer("fedsgd")


def test_records_round_trip_and_name_what_is_wrong() -> None:
    yogi = ServerOptimizer("fedyogi", 0.02, beta_1=0.8, beta_2=0.9, tau=1e-2)
    record = yogi.to_record()
    assert record == {"name": "fedyogi", "server_lr": 0.02, "beta_1": 0.8, "beta_2": 0.9, "tau": 1e-2}
    assert ServerOptimizer.from_record(record) == yogi
    with pytest.raises(ValueError, match="expected"):
        ServerOptimizer.from_record({**record, "momentum": 0.9})
    with pytest.raises(ValueError, match="unknown server optimizer"):
        ServerOptimizer.from_record({"name": "adam"})


# ---------------------------------------------------------------------------------------------------------
# against Flower's own strategies


@pytest.fixture
def server_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class OneNodeGrid:
    def get_node_ids(self) -> list[int]:
        return [7]


def as_record(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in values.items()})


def flower_round(strategy: FedOpt | FedAvgM, server_round: int, current: dict[str, np.ndarray], mean: dict) -> dict:
    """One round of Flower's strategy whose only reply is ``mean``, so that Flower's average is the mean itself."""
    (sent,) = strategy.configure_train(server_round, as_record(current), ConfigRecord(), OneNodeGrid())
    content = RecordDict({"arrays": as_record(mean), "metrics": MetricRecord({"num-examples": 10})})
    record, _ = strategy.aggregate_train(server_round, [Message(content, reply_to=sent)])
    assert record is not None
    return {k: a.numpy() for k, a in record.items()}


FLOWER: dict[str, Callable[[dict[str, float]], FedOpt | FedAvgM]] = {
    "fedavgm": lambda hp: FedAvgM(
        min_train_nodes=1, min_available_nodes=1, server_learning_rate=hp["server_lr"], server_momentum=hp["momentum"]
    ),
    "fedadagrad": lambda hp: FedAdagrad(min_train_nodes=1, min_available_nodes=1, eta=hp["server_lr"], tau=hp["tau"]),
    "fedyogi": lambda hp: FedYogi(
        min_train_nodes=1,
        min_available_nodes=1,
        eta=hp["server_lr"],
        beta_1=hp["beta_1"],
        beta_2=hp["beta_2"],
        tau=hp["tau"],
    ),
    "fedadam": lambda hp: FedAdam(
        min_train_nodes=1,
        min_available_nodes=1,
        eta=hp["server_lr"],
        beta_1=hp["beta_1"],
        beta_2=hp["beta_2"],
        tau=hp["tau"],
    ),
}


def flower_eta(name: str, hp: dict[str, float], server_round: int) -> float:
    """The step size Flower uses in a round: FedAdam's bias-corrected η (with its exponent t + 1), else η."""
    if name != "fedadam":
        return hp["server_lr"]
    return float(
        hp["server_lr"]
        * np.sqrt(1 - np.power(hp["beta_2"], server_round + 1.0))
        / (1 - np.power(hp["beta_1"], server_round + 1.0))
    )


@pytest.mark.usefixtures("server_task_identity")
@pytest.mark.parametrize("name", list(FLOWER))
def test_ours_gives_flowers_bits_over_rounds_where_the_maths_is_the_same(name: str) -> None:
    """FedAvgM, FedAdagrad (β1 = 0, as Flower fixes it) and FedYogi: the same bits. FedAdam: the same once our η
    is Flower's bias-corrected one for that round (the moments do not depend on η, so the state carries)."""
    rng = np.random.default_rng(11)
    hp = {"server_lr": 0.05, "momentum": 0.8, "beta_1": 0.0 if name == "fedadagrad" else 0.9, "beta_2": 0.97}
    hp["tau"] = 1e-3
    hp = {k: hp[k] for k in OPTIMIZER_HYPERPARAMETERS[name]}
    flower = FLOWER[name](hp)
    # no 0-d tensor: Flower's Array turns one into shape (1,)
    current = {k: v for k, v in arrays(rng, np.float64).items() if v.ndim}
    ours, state = dict(current), OptimizerState()
    for server_round in range(1, ROUNDS + 1):
        mean = {k: current[k] + 0.1 * rng.normal(size=np.shape(current[k])) for k in current}
        theirs = flower_round(flower, server_round, current, mean)
        step = ServerOptimizer(name, **{**hp, "server_lr": flower_eta(name, hp, server_round)})
        ours, state = step.step(current, mean, state)
        assert set(ours) == set(theirs) == set(current)
        for k in current:
            np.testing.assert_array_equal(ours[k], theirs[k], err_msg=f"round {server_round}, {k}")
        current = theirs
    if name == "fedadam":
        # and without Flower's correction (the paper's Algorithm 2) the steps differ
        plain, _ = ServerOptimizer(name, **hp).step(current, mean, OptimizerState())
        assert not np.array_equal(plain["lora_A"], flower_round(FLOWER[name](hp), 1, current, mean)["lora_A"])


# ---------------------------------------------------------------------------------------------------------
# settings


def test_defaults_are_fedavg_at_lr_1_and_each_optimizer_fills_in_what_it_reads() -> None:
    assert AggregationSettings().optimizer_settings() == {"server_lr": 1.0}
    assert ServerOptimizer.from_settings(AggregationSettings()) == ServerOptimizer()
    adam = AggregationSettings(optimizer="fedadam", beta_2=0.9)
    assert adam.optimizer_settings() == {"server_lr": 0.01, "beta_1": 0.9, "beta_2": 0.9, "tau": 1e-3}
    assert ServerOptimizer.from_settings(adam) == ServerOptimizer("fedadam", 0.01, beta_1=0.9, beta_2=0.9, tau=1e-3)
    assert AggregationSettings(optimizer="fedavgm", server_lr=0.5).optimizer_settings() == {
        "server_lr": 0.5,
        "momentum": 0.9,
    }


@pytest.mark.parametrize(
    ("values", "problems"),
    [
        ({"optimizer": "fedadam", "momentum": 0.9}, ["momentum: is read by fedavgm only, and optimizer is fedadam"]),
        ({"optimizer": "fedavg", "tau": 0.1}, ["tau: is read by fedadam and fedyogi and fedadagrad only"]),
        ({"optimizer": "fedadagrad", "beta_2": 0.9}, ["beta_2: is read by fedadam and fedyogi only"]),
        ({"optimizer": "fedavgm", "momentum": 1.0}, ["momentum: must be in [0, 1), got 1.0"]),
        ({"optimizer": "fedyogi", "beta_1": -0.1, "beta_2": float("nan")}, ["beta_1: must be in [0, 1), got -0.1"]),
        ({"optimizer": "fedyogi", "tau": 0.0}, ["tau: must be in (0, 1], got 0.0"]),
        ({"server_lr": 0.0}, ["server_lr: must be in (0, 10], got 0.0"]),
        ({"optimizer": "sgd"}, ["optimizer: must be one of fedavg, fedavgm, fedadam, fedyogi, fedadagrad, got 'sgd'"]),
    ],
)
def test_bad_optimizer_settings_name_field_and_value(values: dict, problems: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        AggregationSettings(**values)
    for problem in problems:
        assert any(p.startswith(problem) for p in err.value.problems), err.value.problems
    if "beta_2" in values and values["beta_2"] != values["beta_2"]:
        assert any(p.startswith("beta_2: must be in [0, 1), got nan") for p in err.value.problems)


def test_the_config_file_names_the_line_of_a_bad_optimizer_field(tmp_path, tiny_bert, two_regions) -> None:
    from common.config import load_config
    from tests.conftest import tiny_config

    path = tiny_config(
        tmp_path / "run.yaml", tiny_bert, two_regions, aggregation={"optimizer": "fedadam", "momentum": 0.5}
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert any(
        "aggregation.momentum: is read by fedavgm only, and optimizer is fedadam" in p for p in err.value.problems
    )
    assert all(f"{path}:" in p for p in err.value.problems)


# ---------------------------------------------------------------------------------------------------------
# RegionFedAvg keeps the state between rounds


def reply(to: Message, update: dict[str, np.ndarray], num: int, region: int) -> Message:
    metrics = MetricRecord({keys.NUM_EXAMPLES: num, keys.TRAIN_LOSS: 0.5, keys.REGION_INDEX: region})
    return Message(RecordDict({keys.METRICS: metrics, keys.ARRAYS: as_record(update)}), reply_to=to)


class Nodes:
    def __init__(self, ids: Iterable[int]) -> None:
        self.ids = list(ids)

    def get_node_ids(self) -> list[int]:
        return list(self.ids)


@pytest.mark.usefixtures("server_task_identity")
def test_region_fedavg_carries_the_optimizer_state_and_returns_it_each_round() -> None:
    rng = np.random.default_rng(21)
    optimizer = ServerOptimizer("fedyogi", 0.05, beta_1=0.9, beta_2=0.99, tau=1e-3)
    strategy = RegionFedAvg(("north", "south"), optimizer=optimizer, min_clients=2)
    shapes = [k for k, shape in SHAPES.items() if shape]  # Flower's Array turns a 0-d tensor 1-d
    current = {k: v for k, v in arrays(rng).items() if k in shapes}
    expected, state = current, OptimizerState()
    for server_round in (1, 2, 3):
        sent = {
            m.metadata.dst_node_id: m
            for m in strategy.configure_train(server_round, as_record(current), ConfigRecord(), Nodes([1, 2]))
        }
        north, south = ({k: v for k, v in arrays(rng).items() if k in shapes} for _ in range(2))
        log = strategy.aggregate_train_round(server_round, [reply(sent[1], north, 30, 0), reply(sent[2], south, 10, 1)])
        mean = {k: (0.75 * north[k].astype(np.float64) + 0.25 * south[k]).astype(np.float32) for k in shapes}
        expected, state = optimizer.step(current, mean, state)
        assert log.optimizer_state is not None and log.optimizer_state.step == server_round
        assert log.global_arrays is not None
        assert set(log.global_arrays) == set(shapes)
        for k in shapes:
            np.testing.assert_allclose(log.global_arrays[k], expected[k], rtol=1e-6, atol=1e-7)
        current = log.global_arrays
    # a strategy started from a saved state goes on where the other stopped
    resumed = RegionFedAvg(
        ("north", "south"), optimizer=optimizer, min_clients=2, optimizer_state=strategy.optimizer_state
    )
    assert resumed.optimizer_state.step == 3
