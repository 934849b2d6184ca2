"""Aggregation maths against numpy by hand, and RegionFedAvg with real Flower messages."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common import keys
from common.audit import SERVER, Ledger, payload_hash
from server.aggregate import ServerOptimizer, aggregation_weights, update_problem, weighted_average
from server.audit import LedgerStrategy, load_kept
from server.strategy import RegionFedAvg, RoundStrategy, record_bytes

SHAPES = {"lora_A": (4, 8), "lora_B": (8, 4), "head.weight": (2, 8), "head.bias": (2,), "scalar": ()}


def random_update(rng: np.random.Generator, dtype: type = np.float32) -> dict[str, np.ndarray]:
    return {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}


# ---------------------------------------------------------------------------------------------------------
# aggregation_weights


def test_weighted_weights_are_proportional_to_examples() -> None:
    assert aggregation_weights([10, 30], "weighted") == [0.25, 0.75]
    assert aggregation_weights([0, 5], "weighted") == [0.0, 1.0]
    assert sum(aggregation_weights([7, 11, 13], "weighted")) == pytest.approx(1.0)


def test_uniform_weights_ignore_examples() -> None:
    assert aggregation_weights([10, 30, 60, 0], "uniform") == [0.25] * 4


@pytest.mark.parametrize(
    ("counts", "method", "match"),
    [
        ([], "weighted", "no updates"),
        ([], "uniform", "no updates"),
        ([0, 0], "weighted", "sum to > 0"),
        ([-1, -2], "weighted", "must be >= 0"),
        ([5, -5], "weighted", "must be >= 0"),
        ([1, 2], "median", "unknown aggregation method"),
    ],
)
def test_weights_reject_empty_zero_and_negative_totals(counts: list[int], method: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        aggregation_weights(counts, method)


def test_negative_example_count_raises_even_with_a_positive_total() -> None:
    with pytest.raises(ValueError):
        aggregation_weights([3, -1], "weighted")


# ---------------------------------------------------------------------------------------------------------
# weighted_average


@pytest.mark.parametrize("n", [3, 4, 5])
def test_weighted_average_matches_numpy_average(n: int) -> None:
    rng = np.random.default_rng(n)
    updates = [random_update(rng) for _ in range(n)]
    counts = rng.integers(1, 100, size=n).tolist()
    weights = aggregation_weights(counts, "weighted")
    out = weighted_average(updates, weights)
    assert set(out) == set(SHAPES)
    for name, shape in SHAPES.items():
        stacked = np.stack([u[name].astype(np.float64) for u in updates])
        expected = np.average(stacked, axis=0, weights=np.asarray(counts, dtype=np.float64))
        assert out[name].shape == shape
        assert out[name].dtype == np.float32
        np.testing.assert_allclose(out[name], expected, rtol=1e-6, atol=1e-7)


def test_weighted_average_uniform_is_the_plain_mean() -> None:
    rng = np.random.default_rng(7)
    updates = [random_update(rng) for _ in range(4)]
    out = weighted_average(updates, aggregation_weights([1, 50, 3, 9], "uniform"))
    for name in SHAPES:
        np.testing.assert_allclose(out[name], np.mean([u[name] for u in updates], axis=0), rtol=1e-6, atol=1e-7)


def test_weighted_average_keeps_dtype_and_rejects_mismatched_lengths() -> None:
    rng = np.random.default_rng(1)
    updates = [random_update(rng, np.float64) for _ in range(3)]
    assert weighted_average(updates, [0.2, 0.3, 0.5])["lora_A"].dtype == np.float64
    with pytest.raises(ValueError):
        weighted_average(updates, [0.5, 0.5])
    with pytest.raises(ValueError):
        weighted_average([], [])


# ---------------------------------------------------------------------------------------------------------
# update_problem


def test_update_problem_accepts_a_well_formed_update() -> None:
    rng = np.random.default_rng(0)
    assert update_problem(random_update(rng), random_update(rng)) is None


def test_update_problem_names_what_is_wrong() -> None:
    rng = np.random.default_rng(0)
    ref = random_update(rng)
    missing = {k: v for k, v in ref.items() if k != "lora_B"}
    assert update_problem(missing, ref) == "tensor names differ (missing ['lora_B'], unexpected [])"
    extra = {**ref, "sneaky": np.zeros(3, np.float32)}
    assert update_problem(extra, ref) == "tensor names differ (missing [], unexpected ['sneaky'])"
    shape = {**ref, "lora_A": np.zeros((8, 4), np.float32)}
    assert update_problem(shape, ref) == "lora_A: got float32[8, 4], expected float32[4, 8]"
    dtype = {**ref, "head.bias": ref["head.bias"].astype(np.float64)}
    assert update_problem(dtype, ref) == "head.bias: got float64[2], expected float32[2]"
    for bad in (np.nan, np.inf, -np.inf):
        poisoned = {k: v.copy() for k, v in ref.items()}
        poisoned["head.weight"][1, 3] = bad
        assert update_problem(poisoned, ref) == "head.weight: holds NaN or infinity"


# ---------------------------------------------------------------------------------------------------------
# RegionFedAvg with real Flower messages


@pytest.fixture
def server_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's runtime tells the ServerApp process who it is before the strategy builds any message (see
    flwr/superlink/runtime/run_serverapp.py); here the test plays that part, and monkeypatch restores it after."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class NodesOnlyGrid:
    """The only part of a Grid that FedAvg's sampling calls: the connected node ids."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self._ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._ids)


REGIONS = ("north", "south", "east", "west")


def as_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def reply(to: Message, arrays: dict[str, np.ndarray] | None, num: int, loss: float, region: int) -> Message:
    content = RecordDict(
        {keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: num, keys.TRAIN_LOSS: loss, keys.REGION_INDEX: region})}
    )
    if arrays is not None:
        content[keys.ARRAYS] = as_record(arrays)
    return Message(content, reply_to=to)


def send(strategy: RoundStrategy, sent: dict[str, np.ndarray], node_ids: list[int]) -> dict[int, Message]:
    messages = list(strategy.configure_train(1, as_record(sent), ConfigRecord({"lr": 0.1}), NodesOnlyGrid(node_ids)))
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(node_ids)
    assert all(m.metadata.message_type == MessageType.TRAIN for m in messages)
    return {m.metadata.dst_node_id: m for m in messages}


@pytest.mark.usefixtures("server_task_identity")
def test_aggregate_train_rejects_malformed_and_nan_and_averages_the_rest() -> None:
    rng = np.random.default_rng(42)
    sent = random_update(rng)
    good_a, good_b = random_update(rng), random_update(rng)
    extra = {**random_update(rng), "base_model.embeddings.weight": np.ones((3, 8), np.float32)}
    nan = random_update(rng)
    nan["lora_B"][0, 0] = np.nan
    strategy = RegionFedAvg(REGIONS, method="weighted", min_clients=2)
    by_node = send(strategy, sent, [11, 12, 13, 14])
    replies = [
        reply(by_node[12], good_b, 10, 0.9, region=1),  # south
        reply(by_node[11], good_a, 30, 0.5, region=0),  # north
        reply(by_node[13], extra, 20, 0.1, region=2),
        reply(by_node[14], nan, 20, 0.2, region=3),
    ]
    train = strategy.aggregate_train_round(1, replies)
    record, metrics = train.arrays, train.metrics

    assert train.bytes_down == 4 * record_bytes(as_record(sent))
    assert [got.node_id for got in train.received] == [12, 11, 13, 14]  # every reply, in the order received
    rejected = {r["node"]: r["reason"] for r in train.rejected}
    assert rejected == {
        "13": "tensor names differ (missing [], unexpected ['base_model.embeddings.weight'])",
        "14": "lora_B: holds NaN or infinity",
    }
    accepted = train.replies
    assert [(r.region, r.node_id, r.num_examples) for r in accepted] == [("north", 11, 30), ("south", 12, 10)]
    assert all(r.bytes_up == record_bytes(as_record(sent)) for r in accepted)

    assert record is not None and metrics is not None
    result = {k: a.numpy() for k, a in record.items()}
    assert set(result) == set(SHAPES)
    for name in SHAPES:
        expected = np.average(np.stack([good_a[name], good_b[name]]).astype(np.float64), axis=0, weights=[30, 10])
        assert result[name].dtype == np.float32
        np.testing.assert_allclose(result[name], expected, rtol=1e-6, atol=1e-7)
    assert metrics[keys.NUM_EXAMPLES] == 40
    assert metrics[keys.TRAIN_LOSS] == pytest.approx((0.5 * 30 + 0.9 * 10) / 40)


@pytest.mark.usefixtures("server_task_identity")
def test_aggregate_train_server_lr_and_uniform() -> None:
    rng = np.random.default_rng(5)
    sent, a, b = random_update(rng), random_update(rng), random_update(rng)
    strategy = RegionFedAvg(REGIONS[:2], method="uniform", optimizer=ServerOptimizer(server_lr=2.0), min_clients=2)
    by_node = send(strategy, sent, [1, 2])
    record, _ = strategy.aggregate_train(1, [reply(by_node[1], a, 90, 0.3, 0), reply(by_node[2], b, 10, 0.4, 1)])
    assert record is not None
    for name, arr in record.items():
        mean = (a[name].astype(np.float64) + b[name]) / 2
        np.testing.assert_allclose(arr.numpy(), sent[name] + 2 * (mean - sent[name]), rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("server_task_identity")
def test_aggregate_train_rejects_failed_and_incomplete_replies() -> None:
    rng = np.random.default_rng(9)
    sent = random_update(rng)
    strategy = RegionFedAvg(REGIONS, min_clients=2)
    by_node = send(strategy, sent, [1, 2, 3, 4, 5, 6])
    replies = [
        Message(Error(code=0, reason="out of memory"), reply_to=by_node[1]),
        reply(by_node[2], None, 10, 0.5, 0),  # no arrays
        reply(by_node[3], random_update(rng), 10, 0.5, 9),  # region index outside the run
        reply(by_node[4], random_update(rng), 0, 0.5, 1),  # trained on nothing
        reply(by_node[5], {**sent, "lora_A": np.zeros((4, 9), np.float32)}, 10, 0.5, 2),  # wrong shape
        Message(RecordDict({keys.ARRAYS: as_record(sent)}), reply_to=by_node[6]),  # no metrics
    ]
    assert strategy.aggregate_train(1, replies) == (None, None)
    train = strategy.aggregate_train_round(1, replies)
    assert (train.arrays, train.metrics, train.global_arrays, train.replies) == (None, None, None, [])
    assert {r["node"]: r["reason"] for r in train.rejected} == {
        "1": "node failed: out of memory",
        "2": "no 'arrays' ArrayRecord",
        "3": "bad region-index 9",
        "4": "trained on 0 examples",
        "5": "lora_A: got float32[4, 9], expected float32[4, 8]",
        "6": "no 'metrics' MetricRecord",
    }


def test_aggregate_train_before_configure_train_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="before configure_train"):
        RegionFedAvg(REGIONS).aggregate_train(1, [])


@pytest.mark.usefixtures("server_task_identity")
def test_aggregate_evaluate_weights_by_examples_and_skips_empty_regions() -> None:
    strategy = RegionFedAvg(REGIONS[:3], min_clients=2)
    instructions = list(
        strategy.configure_evaluate(
            1, as_record(random_update(np.random.default_rng(0))), ConfigRecord(), NodesOnlyGrid([1, 2, 3])
        )
    )
    by_node = {m.metadata.dst_node_id: m for m in instructions}

    def ev(node: int, num: int, loss: float, acc: float, f1: float, region: int) -> Message:
        metrics = {
            keys.NUM_EXAMPLES: num,
            keys.LOSS: loss,
            keys.ACCURACY: acc,
            keys.MACRO_F1: f1,
            keys.REGION_INDEX: region,
        }
        return Message(RecordDict({keys.METRICS: MetricRecord(metrics)}), reply_to=by_node[node])

    evaluation = strategy.aggregate_evaluate_round(
        1, [ev(1, 30, 0.2, 0.9, 0.8, 0), ev(2, 10, 0.6, 0.5, 0.4, 1), ev(3, 0, 9.0, 0.0, 0.0, 2)]
    )
    out = evaluation.metrics
    assert out is not None
    assert out[keys.NUM_EXAMPLES] == 40
    assert out[keys.LOSS] == pytest.approx(0.3)
    assert out[keys.ACCURACY] == pytest.approx(0.8)
    assert out[keys.MACRO_F1] == pytest.approx(0.7)
    assert [r.region for r in evaluation.replies] == ["north", "south", "east"]
    # Flower's verb returns the same record
    assert strategy.aggregate_evaluate(1, [ev(1, 30, 0.2, 0.9, 0.8, 0), ev(2, 10, 0.6, 0.5, 0.4, 1)]) == out


@pytest.mark.usefixtures("server_task_identity")
def test_partial_sampling_is_seeded_per_round() -> None:
    sent = as_record(random_update(np.random.default_rng(0)))
    grid = NodesOnlyGrid(range(10, 20))

    def sample(seed: int, rnd: int) -> list[int]:
        strategy = RegionFedAvg([f"r{i}" for i in range(10)], fraction_train=0.5, min_clients=2, seed=seed)
        return sorted(m.metadata.dst_node_id for m in strategy.configure_train(rnd, sent, ConfigRecord(), grid))

    assert len(sample(0, 1)) == 5
    assert sample(0, 1) == sample(0, 1)
    assert len({tuple(sample(0, r)) for r in range(1, 6)}) > 1  # different rounds draw different regions


# ---------------------------------------------------------------------------------------------------------
# The server's whole path: LedgerStrategy around RegionFedAvg, and Flower's own round loop


T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


@pytest.mark.usefixtures("server_task_identity")
def test_the_server_converts_each_reply_to_numpy_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(11)
    sent, north, south, nan = (random_update(rng) for _ in range(4))
    nan["lora_A"][1, 1] = np.nan
    keep = tmp_path / "updates"
    ledger = Ledger.in_folder(tmp_path / "server", SERVER)
    strategy = LedgerStrategy(RegionFedAvg(REGIONS[:3], min_clients=2), ledger, keep_dir=keep, clock=lambda: T0)
    by_node = send(strategy, sent, [1, 2, 3, 4])
    replies = [
        reply(by_node[1], north, 30, 0.5, region=0),
        reply(by_node[2], south, 10, 0.9, region=1),
        reply(by_node[3], nan, 20, 0.1, region=2),  # rejected, but hashed for the ledger all the same
        Message(Error(code=0, reason="out of memory"), reply_to=by_node[4]),
    ]
    reply_arrays = {
        id(a) for m in replies if not m.has_error() for r in m.content.array_records.values() for a in r.values()
    }
    assert len(reply_arrays) == 3 * len(SHAPES)

    # Array.numpy deserialises the bytes at every call, and ArrayRecord.to_numpy_ndarrays goes through it
    conversions: Counter[int] = Counter()
    convert: Callable[[Array], np.ndarray] = Array.numpy

    def counted(array: Array) -> np.ndarray:
        conversions[id(array)] += 1
        return convert(array)

    monkeypatch.setattr(Array, "numpy", counted)
    record, metrics = strategy.aggregate_train(1, replies)
    monkeypatch.undo()

    # each reply's tensors once, and nothing else: not the global adapter sent, not the new one
    assert conversions == Counter(dict.fromkeys(reply_arrays, 1))
    # ... and every consumer had them: the average, the ledger and the kept updates
    assert record is not None and metrics is not None
    for name, array in record.items():
        expected = np.average(np.stack([north[name], south[name]]).astype(np.float64), axis=0, weights=[30, 10])
        np.testing.assert_allclose(array.numpy(), expected, rtol=1e-6, atol=1e-7)
    bodies = [json.loads(line)["body"] for line in ledger.path.read_text().splitlines()]
    assert [b["kind"] for b in bodies] == ["dispatch", "inbound", "inbound", "inbound", "inbound", "aggregate"]
    assert [b["status"] for b in bodies[1:5]] == ["received", "received", "received", "error"]
    aggregate = bodies[-1]
    assert [(p["region"], p["weight"]) for p in aggregate["participants"]] == [("north", 0.75), ("south", 0.25)]
    assert aggregate["global_sha256"] == payload_hash({k: a.numpy() for k, a in record.items()})
    for region, update, num in (("north", north, 30), ("south", south, 10)):
        kept, kept_metrics = load_kept(keep / "round-001" / f"{region}.npz")
        assert kept_metrics[keys.NUM_EXAMPLES] == num
        assert set(kept) == set(update)
        for name in update:
            np.testing.assert_array_equal(kept[name], update[name])
    assert sorted(p.name for p in (keep / "round-001").iterdir()) == ["global-in.npz", "north.npz", "south.npz"]


class AnsweringGrid:
    """A grid whose nodes answer at once: a train message with a fixed update, an evaluate message with metrics."""

    def __init__(self, answers: dict[int, tuple[dict[str, np.ndarray], int, int]]) -> None:
        self.answers = answers  # node id → (update, examples, region index)

    def get_node_ids(self) -> list[int]:
        return list(self.answers)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        out = []
        for msg in messages:
            update, num, region = self.answers[msg.metadata.dst_node_id]
            if msg.metadata.message_type == MessageType.TRAIN:
                out.append(reply(msg, update, num, loss=0.1 * region + 0.5, region=region))
            else:
                values = {keys.NUM_EXAMPLES: num, keys.LOSS: 1.0 + region, keys.ACCURACY: 0.5, keys.MACRO_F1: 0.25}
                out.append(
                    Message(
                        RecordDict({keys.METRICS: MetricRecord({**values, keys.REGION_INDEX: region})}), reply_to=msg
                    )
                )
        return out


@pytest.mark.usefixtures("server_task_identity")
def test_flowers_own_round_loop_gets_each_rounds_outcome_from_the_returned_records() -> None:
    rng = np.random.default_rng(4)
    north, south = random_update(rng), random_update(rng)
    grid = AnsweringGrid({7: (north, 30, 0), 8: (south, 10, 1)})
    strategy = RegionFedAvg(REGIONS[:2], min_clients=2)
    result = strategy.start(grid, as_record(random_update(rng)), num_rounds=2)  # type: ignore[arg-type]

    # what aggregate_train returned each round, as Flower's loop kept it: the example-weighted train loss and
    # the number of examples trained on
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    for metrics in result.train_metrics_clientapp.values():
        assert metrics[keys.NUM_EXAMPLES] == 40
        assert metrics[keys.TRAIN_LOSS] == pytest.approx((0.5 * 30 + 0.6 * 10) / 40)
    for metrics in result.evaluate_metrics_clientapp.values():
        assert metrics[keys.LOSS] == pytest.approx((1.0 * 30 + 2.0 * 10) / 40)
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2]
    for name, array in result.arrays.items():
        expected = np.average(np.stack([north[name], south[name]]).astype(np.float64), axis=0, weights=[30, 10])
        np.testing.assert_allclose(array.numpy(), expected, rtol=1e-6, atol=1e-7)
