"""FedAvg over LoRA adapters, per region: Flower's FedAvg with our aggregation maths and per-region records."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from common import keys
from common.metrics import weighted_mean
from common.train import derive_seed
from server.aggregate import aggregation_weights, server_step, update_problem, weighted_average

log = logging.getLogger("fedlocale.server")


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
    rejected: list[dict[str, str]] = field(default_factory=list)  # {"node": …, "reason": …}
    bytes_down: int = 0


def record_bytes(record: ArrayRecord) -> int:
    """Serialized size of the tensors in an ArrayRecord, as they travel."""
    return sum(len(a.data) for a in record.values())


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord as a name → ndarray mapping."""
    return {k: a.numpy() for k, a in record.items()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """A name → ndarray mapping as an ArrayRecord (names kept, order kept)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


class RegionFedAvg(FedAvg):
    """FedAvg whose replies are checked, tagged with their region, and combined by ``server.aggregate``.

    A malformed or failed reply is rejected and recorded, never averaged in.
    """

    def __init__(
        self,
        region_names: Sequence[str],
        method: str = "weighted",
        server_lr: float = 1.0,
        fraction_train: float = 1.0,
        min_clients: int = 2,
        seed: int = 0,
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
        self.last_train = RoundLog()
        self.last_evaluate = RoundLog()
        self._sent: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes (seeded per round) and send them the global adapter; remember it for the server step."""
        self._sent = arrays
        # waits until min_available_nodes are connected; Flower's own sampling would use the unseeded `random`
        _, connected = sample_nodes(grid, self.min_available_nodes, self.min_train_nodes)
        size = min(len(connected), max(int(len(connected) * self.fraction_train), self.min_train_nodes))
        rng = random.Random(derive_seed(self.seed, "sample", server_round))
        chosen = sorted(rng.sample(sorted(connected), size))
        config[keys.SERVER_ROUND] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        messages = list(self._construct_messages(record, chosen, MessageType.TRAIN))
        self.last_train = RoundLog(bytes_down=record_bytes(arrays) * len(messages))
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes for evaluation of the global adapter."""
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.last_evaluate = RoundLog(bytes_down=record_bytes(arrays) * len(messages))
        return messages

    def _accept(self, replies: Iterable[Message], round_log: RoundLog, reference: ArrayRecord | None) -> None:
        for msg in replies:
            node = str(msg.metadata.src_node_id)
            if msg.has_error():
                round_log.rejected.append({"node": node, "reason": f"node failed: {msg.error.reason}"})
                continue
            problem, reply = self._parse(msg, reference)
            if problem:
                log.warning("rejected update from node %s: %s", node, problem)
                round_log.rejected.append({"node": node, "reason": problem})
            elif reply is not None:
                round_log.replies.append(reply)
        round_log.replies.sort(key=lambda r: self.region_names.index(r.region))

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
        self._accept(replies, self.last_train, self._sent)
        accepted = self.last_train.replies
        if not accepted:
            return None, None
        by_node = {m.metadata.src_node_id: m for m in replies}
        updates = [to_numpy(by_node[r.node_id].content.array_records[keys.ARRAYS]) for r in accepted]
        weights = aggregation_weights([r.num_examples for r in accepted], self.method)
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
        self._accept(replies, self.last_evaluate, None)
        scored = [r for r in self.last_evaluate.replies if r.num_examples > 0]
        if not scored:
            return None
        counts = {r.region: float(r.num_examples) for r in scored}
        out = {
            name: weighted_mean({r.region: r.metrics[name] for r in scored}, counts)
            for name in (keys.LOSS, keys.ACCURACY, keys.MACRO_F1)
        }
        return MetricRecord({**out, keys.NUM_EXAMPLES: int(sum(counts.values()))})
