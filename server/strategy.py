"""FedAvg over LoRA adapters, per region: Flower's FedAvg with our aggregation maths and per-region records."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import keys
from common.errors import FedlocaleError
from common.metrics import weighted_mean
from common.policy import refused_region
from common.seeds import derive_seed
from server.aggregate import aggregation_weights, server_step, update_problem, weighted_average

log = logging.getLogger("fedlocale.server")

_POLL_SECONDS = 1.0


class NodeWaitTimeout(FedlocaleError):
    """Fewer nodes than the minimum were connected for the whole ``node_timeout``."""

    def __init__(self, connected: int, needed: int, waited: float) -> None:
        self.connected, self.needed, self.waited = connected, needed, waited
        super().__init__(
            f"{connected} node(s) connected, at least {needed} needed; gave up after waiting {round(waited, 1):g} s "
            "(aggregation.node_timeout)"
        )


@dataclass
class RegionReply:
    """One region's accepted reply in a round."""

    region: str
    node_id: int
    num_examples: int
    metrics: dict[str, float]
    bytes_up: int = 0


@dataclass
class RoundLog:
    """What happened in one message exchange (train or evaluate) of a round."""

    replies: list[RegionReply] = field(default_factory=list)
    rejected: list[dict[str, str | None]] = field(default_factory=list)  # {"node": …, "region": …, "reason": …}
    bytes_down: int = 0
    weights: list[float] = field(default_factory=list)  # the aggregation weight of each accepted reply, in order


def record_bytes(record: ArrayRecord) -> int:
    """Serialized size of the tensors in an ArrayRecord, as they travel."""
    return sum(len(a.data) for a in record.values())


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord as a name → ndarray mapping."""
    return {k: a.numpy() for k, a in record.items()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """A name → ndarray mapping as an ArrayRecord (names kept, order kept)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


class RoundStrategy(Protocol):
    """The verbs the federation loop calls, and the records it reads after each exchange."""

    @property
    def last_train(self) -> RoundLog: ...

    @property
    def last_evaluate(self) -> RoundLog: ...

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]: ...

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]: ...

    def configure_evaluate(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        extra: Mapping[str, ArrayRecord] | None = None,
    ) -> Iterable[Message]: ...

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None: ...


class RegionFedAvg(FedAvg):
    """FedAvg whose replies are checked, tagged with their region, and combined by ``server.aggregate``.

    A malformed, failed or missing reply is rejected and recorded, never averaged in. Sampling waits at most
    ``node_timeout`` seconds for ``min_clients`` nodes (``clock`` and ``sleep`` are injectable for tests).
    """

    def __init__(
        self,
        region_names: Sequence[str],
        method: str = "weighted",
        server_lr: float = 1.0,
        fraction_train: float = 1.0,
        min_clients: int = 2,
        seed: int = 0,
        node_timeout: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=1.0,
            min_train_nodes=min_clients,
            min_evaluate_nodes=min_clients,
            min_available_nodes=min_clients,
        )
        self.region_names = tuple(region_names)
        self.method = method
        self.server_lr = server_lr
        self.seed = seed
        self.node_timeout = node_timeout
        self.clock = clock
        self.sleep = sleep
        self.last_train = RoundLog()
        self.last_evaluate = RoundLog()
        # a node's region is known only from its accepted replies; a failed node is named by what it was before
        self.node_regions: dict[int, str] = {}
        self._sent: ArrayRecord | None = None
        self._train_messages: list[Message] = []
        self._evaluate_messages: list[Message] = []

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """The connected node ids, sorted, once at least ``min_available_nodes`` are; else NodeWaitTimeout."""
        started = self.clock()
        reported = -1
        while len(nodes := sorted(grid.get_node_ids())) < self.min_available_nodes:
            waited = self.clock() - started
            if waited >= self.node_timeout:
                raise NodeWaitTimeout(len(nodes), self.min_available_nodes, waited)
            if len(nodes) != reported:
                # a line when the count changes, not Flower's line every second
                log.info(
                    "waiting for nodes: %d connected, %d needed (at most %.0f s)",
                    len(nodes),
                    self.min_available_nodes,
                    self.node_timeout,
                )
                reported = len(nodes)
            self.sleep(min(_POLL_SECONDS, self.node_timeout - waited))
        return nodes

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes (seeded per round) and send them the global adapter; remember it for the server step."""
        self._sent = arrays
        # Flower's own sampling would wait forever and draw from the unseeded `random`
        connected = self.wait_for_nodes(grid)
        size = min(len(connected), max(int(len(connected) * self.fraction_train), self.min_train_nodes))
        rng = random.Random(derive_seed(self.seed, "sample", server_round))
        chosen = sorted(rng.sample(connected, size))
        config[keys.SERVER_ROUND] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        self._train_messages = list(self._construct_messages(record, chosen, MessageType.TRAIN))
        self.last_train = RoundLog(bytes_down=record_bytes(arrays) * len(self._train_messages))
        return self._train_messages

    def configure_evaluate(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        extra: Mapping[str, ArrayRecord] | None = None,
    ) -> Iterable[Message]:
        """Send the global adapter (and ``extra`` array records beside it) to every connected node (after waiting
        for the minimum) for evaluation."""
        nodes = self.wait_for_nodes(grid)
        config[keys.SERVER_ROUND] = server_round
        extra = dict(extra or {})
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config, **extra})
        self._evaluate_messages = list(self._construct_messages(record, nodes, MessageType.EVALUATE))
        sent = record_bytes(arrays) + sum(record_bytes(r) for r in extra.values())
        self.last_evaluate = RoundLog(bytes_down=sent * len(self._evaluate_messages))
        return self._evaluate_messages

    def _accept(
        self, replies: Iterable[Message], sent: Sequence[Message], round_log: RoundLog, reference: ArrayRecord | None
    ) -> None:
        # The grid gives each sent message its id. The SuperLink's reply for a node that went away comes from the
        # SuperLink itself, so the node is found through the message the reply answers.
        waiting = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
        for msg in replies:
            node_id = waiting.pop(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            if msg.has_error():
                reason = msg.error.reason or ""
                self._reject(round_log, node_id, refused_region(reason), f"node failed: {reason}")
                continue
            problem, reply = self._parse(msg, reference)
            if problem:
                self._reject(round_log, node_id, reply.region if reply else None, problem)
            elif reply is not None:
                self.node_regions[reply.node_id] = reply.region
                round_log.replies.append(reply)
        for node_id in waiting.values():
            self._reject(round_log, node_id, None, "no reply within aggregation.round_timeout")
        round_log.replies.sort(key=lambda r: self.region_names.index(r.region))

    def _reject(self, round_log: RoundLog, node_id: int, region: str | None, reason: str) -> None:
        region = region or self.node_regions.get(node_id)
        log.warning("rejected reply of node %s (region %s): %s", node_id, region or "unknown", reason)
        round_log.rejected.append({"node": str(node_id), "region": region, "reason": reason})

    def _parse(self, msg: Message, reference: ArrayRecord | None) -> tuple[str | None, RegionReply | None]:
        content = msg.content
        if keys.METRICS not in content.metric_records:
            return f"no {keys.METRICS!r} MetricRecord", None
        metrics = {k: float(v) for k, v in content.metric_records[keys.METRICS].items()}  # type: ignore[arg-type]
        index = int(metrics.get(keys.REGION_INDEX, -1))
        if not 0 <= index < len(self.region_names):
            return f"bad {keys.REGION_INDEX} {index}", None
        num = metrics.get(keys.NUM_EXAMPLES, -1.0)
        if num < 0 or num != int(num):
            return f"bad {keys.NUM_EXAMPLES} {num}", None
        reply = RegionReply(self.region_names[index], msg.metadata.src_node_id, int(num), metrics)
        if reference is None:
            return None, reply
        if keys.ARRAYS not in content.array_records:
            return f"no {keys.ARRAYS!r} ArrayRecord", None
        arrays = content.array_records[keys.ARRAYS]
        problem = update_problem(to_numpy(arrays), to_numpy(reference))
        if problem is None and num == 0:
            problem = "trained on 0 examples"
        reply.bytes_up = record_bytes(arrays)
        return problem, reply

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check replies, average the accepted adapters by example count, and take the server step."""
        if self._sent is None:
            raise RuntimeError("aggregate_train called before configure_train")
        replies = list(replies)
        self._accept(replies, self._train_messages, self.last_train, self._sent)
        accepted = self.last_train.replies
        if not accepted:
            return None, None
        by_node = {m.metadata.src_node_id: m for m in replies}
        updates = [to_numpy(by_node[r.node_id].content.array_records[keys.ARRAYS]) for r in accepted]
        weights = aggregation_weights([r.num_examples for r in accepted], self.method)
        self.last_train.weights = weights
        average = weighted_average(updates, weights)
        new = server_step(to_numpy(self._sent), average, self.server_lr)
        losses = {r.region: r.metrics[keys.TRAIN_LOSS] for r in accepted}
        counts = {r.region: float(r.num_examples) for r in accepted}
        metrics = MetricRecord(
            {keys.TRAIN_LOSS: weighted_mean(losses, counts), keys.NUM_EXAMPLES: int(sum(counts.values()))}
        )
        return to_record(new), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted means of the regions' evaluation metrics (regions without the split carry no weight)."""
        self._accept(replies, self._evaluate_messages, self.last_evaluate, None)
        scored = [r for r in self.last_evaluate.replies if r.num_examples > 0]
        if not scored:
            return None
        counts = {r.region: float(r.num_examples) for r in scored}
        out = {
            name: weighted_mean({r.region: r.metrics[name] for r in scored}, counts)
            for name in (keys.LOSS, keys.ACCURACY, keys.MACRO_F1)
        }
        return MetricRecord({**out, keys.NUM_EXAMPLES: int(sum(counts.values()))})
