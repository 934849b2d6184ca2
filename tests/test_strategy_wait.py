"""RegionFedAvg with nodes that are slow to connect, fail or go silent: a bounded wait, and rejections by region."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.server.superlink.linkstate.utils import (
    NODE_UNAVAILABLE_ERROR_REASON,
    create_message_error_unavailable_res_message,
)
from flwr.supercore.task_identity import TaskIdentity

from common import keys
from server.strategy import NodeWaitTimeout, RegionFedAvg, RoundLog

REGIONS = ("north", "south", "east")
SENT = {"lora_A": np.ones((2, 3), np.float32), "head.bias": np.zeros(2, np.float32)}


@pytest.fixture(autouse=True)
def server_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's runtime tells the ServerApp process who it is before the strategy builds any message."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class FakeClock:
    """Time that passes only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


Reply = Callable[[Message], Message | None]


class FakeGrid:
    """The two Grid calls the strategy and the server loop make: connected node ids, and send + receive.

    ``connected`` gives the node ids at a given (fake) time; ``answer`` maps a node id to how it replies (None:
    no reply before the timeout). Like Flower's grids, sending gives every message its id.
    """

    def __init__(
        self, connected: Callable[[float], list[int]], clock: FakeClock, answer: dict[int, Reply] | None = None
    ) -> None:
        self.connected = connected
        self.clock = clock
        self.answer = answer or {}
        self.calls = 0

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        return self.connected(self.clock.now)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            reply = self.answer[msg.metadata.dst_node_id](msg)
            if reply is not None:
                replies.append(reply)
        return replies


def strategy(clock: FakeClock, node_timeout: float = 300.0) -> RegionFedAvg:
    return RegionFedAvg(REGIONS, min_clients=2, node_timeout=node_timeout, clock=clock, sleep=clock.sleep)


def as_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def trained(region: int, num: int = 10) -> Reply:
    def reply(msg: Message) -> Message:
        metrics = MetricRecord({keys.NUM_EXAMPLES: num, keys.TRAIN_LOSS: 0.5, keys.REGION_INDEX: region})
        return Message(RecordDict({keys.ARRAYS: as_record(SENT), keys.METRICS: metrics}), reply_to=msg)

    return reply


def failed(reason: str) -> Reply:
    """The node's own error reply (its ClientApp raised)."""
    return lambda msg: Message(Error(code=0, reason=reason), reply_to=msg)


def gone(msg: Message) -> Message:
    """The SuperLink's reply for a node that went away: it comes from the SuperLink, not from the node."""
    return create_message_error_unavailable_res_message(msg.metadata, "node_unavail")


def silent(msg: Message) -> None:
    return None


def train_round(s: RegionFedAvg, grid: FakeGrid, server_round: int) -> RoundLog:
    messages = s.configure_train(server_round, as_record(SENT), ConfigRecord(), grid)  # type: ignore[arg-type]
    return s.aggregate_train_round(server_round, grid.send_and_receive(messages))


# ---------------------------------------------------------------------------------------------------------
# Waiting for the minimum of nodes


def test_train_sampling_gives_up_after_node_timeout_with_a_clear_message() -> None:
    clock = FakeClock()
    grid = FakeGrid(lambda now: [7], clock)
    with pytest.raises(NodeWaitTimeout) as info:
        strategy(clock, node_timeout=30).configure_train(1, as_record(SENT), ConfigRecord(), grid)  # type: ignore[arg-type]
    assert str(info.value) == (
        "1 node(s) connected, at least 2 needed; gave up after waiting 30 s (aggregation.node_timeout)"
    )
    assert (info.value.connected, info.value.needed, info.value.waited) == (1, 2, 30.0)
    # polled about once a second, and no sleep past the timeout
    assert clock.sleeps == [1.0] * 30
    assert grid.calls == 31


def test_evaluation_does_not_wait_forever_either() -> None:
    clock = FakeClock()
    grid = FakeGrid(lambda now: [], clock)
    with pytest.raises(NodeWaitTimeout, match=r"^0 node\(s\) connected, at least 2 needed; .* 2\.5 s"):
        strategy(clock, node_timeout=2.5).configure_evaluate(1, as_record(SENT), ConfigRecord(), grid)  # type: ignore[arg-type]
    assert clock.sleeps == [1.0, 1.0, 0.5]


def test_a_node_connecting_late_ends_the_wait() -> None:
    clock = FakeClock()
    grid = FakeGrid(lambda now: [5, 3] if now >= 1004 else [3], clock)
    messages = list(strategy(clock).configure_train(1, as_record(SENT), ConfigRecord(), grid))  # type: ignore[arg-type]
    assert sorted(m.metadata.dst_node_id for m in messages) == [3, 5]
    assert len(clock.sleeps) == 4


def test_no_wait_when_enough_nodes_are_connected() -> None:
    clock = FakeClock()
    grid = FakeGrid(lambda now: [9, 8, 4], clock)
    messages = list(strategy(clock).configure_evaluate(1, as_record(SENT), ConfigRecord(), grid))  # type: ignore[arg-type]
    assert [m.metadata.dst_node_id for m in messages] == [4, 8, 9]
    assert all(m.metadata.message_type == MessageType.EVALUATE for m in messages)
    assert clock.sleeps == []


# ---------------------------------------------------------------------------------------------------------
# Failed and missing replies, named by region when the node was seen before


def test_failed_and_silent_nodes_are_named_by_the_region_they_served_before() -> None:
    clock = FakeClock()
    s = strategy(clock)
    everyone = {11: trained(0), 12: trained(1), 13: trained(2)}
    grid = FakeGrid(lambda now: [11, 12, 13], clock, everyone)
    assert train_round(s, grid, 1).rejected == []
    assert s.node_regions == {11: "north", 12: "south", 13: "east"}

    grid.answer = {11: trained(0), 12: gone, 13: silent}
    second = train_round(s, grid, 2)
    assert [r.region for r in second.replies] == ["north"]
    assert second.rejected == [
        {"node": "12", "region": "south", "reason": f"node failed: {NODE_UNAVAILABLE_ERROR_REASON}"},
        {"node": "13", "region": "east", "reason": "no reply within aggregation.round_timeout"},
    ]


def test_a_node_never_seen_before_is_rejected_without_a_region() -> None:
    clock = FakeClock()
    s = strategy(clock)
    grid = FakeGrid(lambda now: [21, 22], clock, {21: trained(0), 22: failed("out of memory")})
    assert train_round(s, grid, 1).rejected == [{"node": "22", "region": None, "reason": "node failed: out of memory"}]


def test_a_malformed_reply_is_named_by_the_region_it_claims() -> None:
    clock = FakeClock()
    s = strategy(clock)
    grid = FakeGrid(lambda now: [31, 32], clock, {31: trained(0), 32: trained(1, num=0)})
    assert train_round(s, grid, 1).rejected == [{"node": "32", "region": "south", "reason": "trained on 0 examples"}]
    # only accepted replies teach the map
    assert s.node_regions == {31: "north"}
