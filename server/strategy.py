"""FedAvg over LoRA adapters, per region: Flower's FedAvg with our aggregation maths and per-region records."""

from __future__ import annotations

import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import keys
from common.audit import content_records, merged_payload
from common.errors import FedlocaleError
from common.metrics import weighted_mean
from common.model import LORA_A
from common.policy import refused_region
from common.secagg import LOSS_RANGE, SecAggParams
from common.seeds import derive_seed
from server.aggregate import (
    OptimizerState,
    ServerOptimizer,
    aggregation_weights,
    frozen_problem,
    mean_from_sum,
    update_problem,
    weighted_average,
)

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


@dataclass(frozen=True, eq=False)
class ReceivedReply:
    """One reply message as the server reads it, once: who it answers, and its failure or its records.

    The tensors are converted to numpy here and nowhere else (``Array.numpy`` deserialises the bytes at every
    call); the checks, the weighted average, the ledger's hash and the kept update all read these arrays.
    """

    node_id: int  # the node that was asked, found through the message the reply answers (else the sender)
    sender: int  # the reply's own src_node_id: the SuperLink's for a node that went away
    error: Error | None = None
    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # every ArrayRecord, by record key
    metrics: dict[str, dict[str, int | float]] = field(default_factory=dict)  # every MetricRecord, by record key
    sizes: dict[str, int] = field(default_factory=dict)  # serialized bytes of each ArrayRecord, as it travelled

    def payload(self) -> tuple[dict[str, np.ndarray], dict[str, int | float]]:
        """All tensors and metrics, merged as ``common.audit.payload_hash`` and the node's own hash take them."""
        return merged_payload(self.arrays, self.metrics)


def read_reply(msg: Message, node_id: int) -> ReceivedReply:
    """``msg`` read once (see ``ReceivedReply``); ``node_id`` is the node the answered message went to."""
    sender = msg.metadata.src_node_id
    if msg.has_error():
        return ReceivedReply(node_id, sender, error=msg.error)
    arrays, metrics = content_records(msg.content)
    sizes = {key: record_bytes(record) for key, record in msg.content.array_records.items()}
    return ReceivedReply(node_id, sender, arrays=arrays, metrics=metrics, sizes=sizes)


@dataclass(frozen=True, eq=False)
class RegionReply:
    """One region's accepted reply in a round."""

    region: str
    node_id: int
    num_examples: int
    metrics: dict[str, float]
    received: ReceivedReply  # the whole reply, for the ledger's hash and the kept update
    update: dict[str, np.ndarray] = field(default_factory=dict)  # the trained adapter (train replies only)
    bytes_up: int = 0


@dataclass(frozen=True, eq=False)
class RoundLog:
    """What one message exchange (train or evaluate) of a round produced, as the strategy returns it.

    ``arrays`` and ``metrics`` are what Flower's ``aggregate_train`` / ``aggregate_evaluate`` return. The rest is
    per region and per reply (who took part, who was rejected and why, each region's own metrics, the weights),
    which a MetricRecord, a flat mapping of numbers, cannot hold: the federation and the ledger read it here.
    """

    received: list[ReceivedReply]  # every reply, in the order the grid gave them
    replies: list[RegionReply]  # the accepted ones, in region order
    rejected: list[dict[str, str | None]]  # {"node": …, "region": …, "reason": …}
    bytes_down: int  # serialized tensors sent out for this exchange, all messages together
    metrics: MetricRecord | None = None
    arrays: ArrayRecord | None = None  # train: the new global adapter
    global_arrays: dict[str, np.ndarray] | None = None  # train: ``arrays`` as computed, before serialization
    weights: list[float] = field(default_factory=list)  # train: the aggregation weight of each accepted reply
    optimizer_state: OptimizerState | None = None  # train: the server optimizer's state after this round's step
    secure: SecureSum | None = None  # a secure round: what the server learned (its sum), in place of replies
    bytes_up: int | None = None  # a secure round: every byte of its four stages; None: the replies' adapters

    @property
    def participants(self) -> list[str]:
        """The regions whose updates the new global adapter holds, in region order."""
        return list(self.secure.regions) if self.secure is not None else [r.region for r in self.replies]


@dataclass(frozen=True, eq=False)
class SecureSum:
    """What a secure round lets the server learn: the unmasked sums over its regions, never one region's input.

    ``total`` is Σ w_r·q(θ_r) per tensor (integers), ``total_weight`` Σ w_r and ``loss_total`` Σ w_r·q(loss_r);
    a sum over fewer than two regions would be that region's update, so it cannot be made.
    """

    regions: tuple[str, ...]  # whose inputs the sum holds, in region order
    nodes: tuple[int, ...]
    dropped: tuple[str, ...]  # regions that shared keys but whose input is not in the sum (their masks removed)
    total: dict[str, np.ndarray]
    total_weight: int
    loss_total: int
    params: SecAggParams
    # region -> the privacy its DP-SGD node reports spent (keys.DP_METRICS), sent beside the masked upload in the
    # clear: computed from public settings and step counts, not from data (client.dp)
    dp: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.nodes) < 2 or len(self.nodes) < self.params.threshold:
            raise ValueError(
                f"a secure sum needs at least max(2, threshold {self.params.threshold}) inputs, got {len(self.nodes)}"
            )

    @property
    def mean_loss(self) -> float:
        """The weighted mean train loss of the regions in the sum."""
        step = 2.0 * LOSS_RANGE / self.params.target_range
        return self.loss_total / self.total_weight * step - LOSS_RANGE


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
    """The verbs the federation loop calls: Flower's ``configure_*``, and the aggregations that return the whole
    ``RoundLog`` (see ``RoundAggregation``)."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]: ...

    def aggregate_train_round(self, server_round: int, replies: Iterable[Message]) -> RoundLog: ...

    def aggregate_train_sum(
        self, server_round: int, secure: SecureSum, received: list[ReceivedReply], rejected: list[dict[str, str | None]]
    ) -> RoundLog: ...

    def configure_evaluate(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        extra: Mapping[str, ArrayRecord] | None = None,
    ) -> Iterable[Message]: ...

    def aggregate_evaluate_round(self, server_round: int, replies: Iterable[Message]) -> RoundLog: ...


class RoundAggregation(ABC):
    """Flower's ``aggregate_train`` / ``aggregate_evaluate``, answered from ``aggregate_*_round``.

    The round methods return everything an exchange produced as one ``RoundLog``, because its per-region part
    cannot travel in Flower's MetricRecord; Flower's verbs, with their own signatures, return its ``arrays`` and
    ``metrics``. Nothing is kept between the call and a later read.
    """

    @abstractmethod
    def aggregate_train_round(self, server_round: int, replies: Iterable[Message]) -> RoundLog:
        """Aggregate a train exchange; everything it produced."""

    @abstractmethod
    def aggregate_evaluate_round(self, server_round: int, replies: Iterable[Message]) -> RoundLog:
        """Aggregate an evaluate exchange; everything it produced."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's verb: the new global adapter and the round's train metrics (None, None: nothing accepted)."""
        result = self.aggregate_train_round(server_round, replies)
        return result.arrays, result.metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Flower's verb: the round's evaluation metrics (None: no region had examples to score)."""
        return self.aggregate_evaluate_round(server_round, replies).metrics


@dataclass(frozen=True, eq=False)
class _Sent:
    """What a ``configure_*`` call sent, for the aggregation of the same exchange (Flower's protocol has the
    strategy remember it in between, as FedOpt remembers the arrays it sent)."""

    messages: list[Message]
    bytes_down: int
    reference: dict[str, np.ndarray] | None = None  # train: the global adapter sent, as numpy


class RegionFedAvg(RoundAggregation, FedAvg):
    """FedAvg whose replies are checked, tagged with their region, and combined by ``server.aggregate``.

    A malformed, failed or missing reply is rejected and recorded, never averaged in. The example-weighted mean
    becomes the new global adapter through ``optimizer`` (``server_update``), whose state the strategy keeps
    between rounds as Flower's FedOpt keeps its moments; ``optimizer_state`` is where a resumed run starts it
    (default: fresh) and every train RoundLog returns it after the round's step. Sampling waits at most
    ``node_timeout`` seconds for ``min_clients`` nodes (``clock`` and ``sleep`` are injectable for tests).
    The record keys are Flower's (``arrayrecord_key``, ``configrecord_key``, ``weighted_by_key``) plus the
    MetricRecord that carries a reply's metrics and the metric that names its region.
    """

    def __init__(
        self,
        region_names: Sequence[str],
        method: str = "weighted",
        optimizer: ServerOptimizer | None = None,
        fraction_train: float = 1.0,
        min_clients: int = 2,
        seed: int = 0,
        node_timeout: float = 300.0,
        lora: str = "fedit",
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        *,
        arrayrecord_key: str = keys.ARRAYS,
        configrecord_key: str = keys.CONFIG,
        metricrecord_key: str = keys.METRICS,
        weighted_by_key: str = keys.NUM_EXAMPLES,
        region_key: str = keys.REGION_INDEX,
        optimizer_state: OptimizerState | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=1.0,
            min_train_nodes=min_clients,
            min_evaluate_nodes=min_clients,
            min_available_nodes=min_clients,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
        )
        self.metricrecord_key = metricrecord_key
        self.region_key = region_key
        self.region_names = tuple(region_names)
        self.method = method
        self.optimizer = optimizer or ServerOptimizer()  # plain FedAvg
        self.optimizer_state = optimizer_state or OptimizerState()
        self.seed = seed
        self.node_timeout = node_timeout
        self.lora = lora  # aggregation.lora: with ffa a reply whose lora_A changed is rejected
        self.clock = clock
        self.sleep = sleep
        # a node's region is known only from its accepted replies; a failed node is named by what it was before
        self.node_regions: dict[int, str] = {}
        self._train: _Sent | None = None
        self._evaluate = _Sent([], 0)

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
        # Flower's own sampling would wait forever and draw from the unseeded `random`
        connected = self.wait_for_nodes(grid)
        size = min(len(connected), max(int(len(connected) * self.fraction_train), self.min_train_nodes))
        rng = random.Random(derive_seed(self.seed, "sample", server_round))
        chosen = sorted(rng.sample(connected, size))
        config[keys.SERVER_ROUND] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        messages = list(self._construct_messages(record, chosen, MessageType.TRAIN))
        # converted once here: every reply is checked against it and the server step starts from it
        self._train = _Sent(messages, record_bytes(arrays) * len(messages), to_numpy(arrays))
        return messages

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
        messages = list(self._construct_messages(record, nodes, MessageType.EVALUATE))
        sent = record_bytes(arrays) + sum(record_bytes(r) for r in extra.values())
        self._evaluate = _Sent(messages, sent * len(messages))
        return messages

    def _accept(
        self, replies: Iterable[Message], sent: _Sent
    ) -> tuple[list[ReceivedReply], list[RegionReply], list[dict[str, str | None]]]:
        """Read every reply once; the accepted ones (in region order) and the rejections."""
        # The grid gives each sent message its id. The SuperLink's reply for a node that went away comes from the
        # SuperLink itself, so the node is found through the message the reply answers.
        waiting = {m.metadata.message_id: m.metadata.dst_node_id for m in sent.messages if m.metadata.message_id}
        received: list[ReceivedReply] = []
        accepted: list[RegionReply] = []
        rejected: list[dict[str, str | None]] = []
        for msg in replies:
            got = read_reply(msg, waiting.pop(msg.metadata.reply_to_message_id, msg.metadata.src_node_id))
            received.append(got)
            if got.error is not None:
                reason = got.error.reason or ""
                rejected.append(self._reject(got.node_id, refused_region(reason), f"node failed: {reason}"))
                continue
            problem, reply = self._parse(got, sent.reference)
            if problem:
                rejected.append(self._reject(got.node_id, reply.region if reply else None, problem))
            elif reply is not None:
                self.node_regions[reply.node_id] = reply.region
                accepted.append(reply)
        for node_id in waiting.values():
            rejected.append(self._reject(node_id, None, "no reply within aggregation.round_timeout"))
        accepted.sort(key=lambda r: self.region_names.index(r.region))
        return received, accepted, rejected

    def _reject(self, node_id: int, region: str | None, reason: str) -> dict[str, str | None]:
        region = region or self.node_regions.get(node_id)
        log.warning("rejected reply of node %s (region %s): %s", node_id, region or "unknown", reason)
        return {"node": str(node_id), "region": region, "reason": reason}

    def _parse(
        self, got: ReceivedReply, reference: dict[str, np.ndarray] | None
    ) -> tuple[str | None, RegionReply | None]:
        """Why ``got`` cannot be accepted (with the region it claims, when it names one), or the region's reply."""
        if self.metricrecord_key not in got.metrics:
            return f"no {self.metricrecord_key!r} MetricRecord", None
        metrics = {k: float(v) for k, v in got.metrics[self.metricrecord_key].items()}
        index = int(metrics.get(self.region_key, -1))
        if not 0 <= index < len(self.region_names):
            return f"bad {self.region_key} {index}", None
        num = metrics.get(self.weighted_by_key, -1.0)
        if num < 0 or num != int(num):
            return f"bad {self.weighted_by_key} {num}", None
        region = self.region_names[index]
        if reference is None:
            return None, RegionReply(region, got.sender, int(num), metrics, got)
        if self.arrayrecord_key not in got.arrays:
            return f"no {self.arrayrecord_key!r} ArrayRecord", None
        update = got.arrays[self.arrayrecord_key]
        problem = update_problem(update, reference)
        if problem is None and self.lora == "ffa":
            problem = frozen_problem(update, reference, LORA_A)
        if problem is None and num == 0:
            problem = "trained on 0 examples"
        reply = RegionReply(region, got.sender, int(num), metrics, got, update, got.sizes[self.arrayrecord_key])
        return problem, reply

    def aggregate_train_round(self, server_round: int, replies: Iterable[Message]) -> RoundLog:
        """Check replies, average the accepted adapters by example count, and take the server optimizer's step.

        The MetricRecord holds the example-weighted train loss and the number of examples trained on; it is None,
        as the new adapter is, when no reply was accepted.
        """
        sent = self._train
        if sent is None or sent.reference is None:
            raise RuntimeError("aggregate_train called before configure_train")
        received, accepted, rejected = self._accept(replies, sent)
        if not accepted:
            return RoundLog(received, accepted, rejected, sent.bytes_down)
        weights = aggregation_weights([r.num_examples for r in accepted], self.method)
        new, state = self.server_update(sent.reference, weighted_average([r.update for r in accepted], weights))
        losses = {r.region: r.metrics[keys.TRAIN_LOSS] for r in accepted}
        counts = {r.region: float(r.num_examples) for r in accepted}
        metrics = MetricRecord(
            {keys.TRAIN_LOSS: weighted_mean(losses, counts), self.weighted_by_key: int(sum(counts.values()))}
        )
        return RoundLog(received, accepted, rejected, sent.bytes_down, metrics, to_record(new), new, weights, state)

    def server_update(
        self, current: dict[str, np.ndarray], mean: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], OptimizerState]:
        """The new global adapter from the one the round started from and the round's weighted mean, by the
        server optimizer, and its state after the step (kept for the next round).

        The one place a round's mean becomes the new global model: a strategy that obtains the mean another way
        (e.g. from the unmasked sum of secure aggregation) calls this too, so that every optimizer, its resume
        and its audit replay apply unchanged.
        """
        new, self.optimizer_state = self.optimizer.step(current, mean, self.optimizer_state)
        return new, self.optimizer_state

    def aggregate_train_sum(
        self, server_round: int, secure: SecureSum, received: list[ReceivedReply], rejected: list[dict[str, str | None]]
    ) -> RoundLog:
        """A secure round's aggregation: the weighted mean from the unmasked sum, then the same server step.

        The strategy gets only ``secure`` (sums over at least two regions, see ``SecureSum``) and the masked
        uploads as they arrived (``received``, for the ledger's hashes); no region's update exists here.
        """
        sent = self._train
        if sent is None or sent.reference is None:
            raise RuntimeError("aggregate_train_sum called before configure_train")
        mean = mean_from_sum(
            secure.total, secure.total_weight, secure.params.clipping_range, secure.params.target_range
        )
        average = {k: mean[k].astype(np.asarray(ref).dtype) for k, ref in sent.reference.items()}
        new, state = self.server_update(sent.reference, average)
        metrics: dict[str, int | float | list[int] | list[float]] = {keys.TRAIN_LOSS: secure.mean_loss}
        if not secure.params.uniform:
            metrics[self.weighted_by_key] = secure.total_weight
        return RoundLog(
            received,
            [],
            rejected,
            sent.bytes_down,
            MetricRecord(metrics),
            to_record(new),
            new,
            optimizer_state=state,
            secure=secure,
        )

    def aggregate_evaluate_round(self, server_round: int, replies: Iterable[Message]) -> RoundLog:
        """Example-weighted means of the regions' evaluation metrics (regions without the split carry no weight);
        the MetricRecord is None when no region had examples to score."""
        sent = self._evaluate
        received, accepted, rejected = self._accept(replies, sent)
        scored = [r for r in accepted if r.num_examples > 0]
        if not scored:
            return RoundLog(received, accepted, rejected, sent.bytes_down)
        counts = {r.region: float(r.num_examples) for r in scored}
        out = {
            name: weighted_mean({r.region: r.metrics[name] for r in scored}, counts)
            for name in (keys.LOSS, keys.ACCURACY, keys.MACRO_F1)
        }
        metrics = MetricRecord({**out, self.weighted_by_key: int(sum(counts.values()))})
        return RoundLog(received, accepted, rejected, sent.bytes_down, metrics)
