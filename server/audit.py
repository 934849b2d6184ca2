"""The server's side of the audit: a strategy wrapper that signs what came in and what was made of it, and the
offline recomputation of each round's global adapter from kept updates.

``LedgerStrategy(strategy, ledger)`` wraps the strategy the way Flower's DP wrappers do: the same verbs, the
inner strategy does the work, the wrapper records. For every round the ledger gets the global adapter sent out
(``dispatch``), every reply (``inbound``: sender, payload hash, status) and the aggregation (``aggregate``:
participants with their payload hashes and weights, the method, the server optimizer with its hyperparameters and
the step it took, the hash of its state after the step, and the hash of the result). The optimizer's state is not
recorded itself: ``recompute`` replays it from round 1 through the kept updates.
The wrapper reads all of it from the ``RoundLog`` the inner strategy returns: the replies' tensors as the strategy
converted them, once, and the new global adapter as it was computed; the wrapper converts no reply itself.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from common import keys
from common.audit import AGGREGATE, DISPATCH, INBOUND, Ledger, LedgerCheck, payload_hash
from common.errors import InputError
from common.runfiles import GLOBAL_IN_FILE, SECURE_SUM_FILE, UPDATE_SUFFIX, round_name
from common.secagg import WEIGHTS
from server.aggregate import OptimizerState, ServerOptimizer, aggregation_weights, mean_from_sum, weighted_average
from server.strategy import ReceivedReply, RegionFedAvg, RoundAggregation, RoundLog, SecureSum, to_numpy

METRICS_KEY = "__metrics__"  # the kept update's metrics, as JSON, beside its tensors


def _utc_now() -> datetime:
    return datetime.now(UTC)


def state_hash(state: OptimizerState) -> str:
    """SHA-256 of a server optimizer's state: its buffers and its step count (``payload_hash``'s rules)."""
    return payload_hash(state.arrays, {"step": state.step})


def round_dir(keep_dir: Path, server_round: int) -> Path:
    """Where the updates of one round are kept."""
    return keep_dir / round_name(server_round)


def _save(path: Path, arrays: dict[str, np.ndarray], metrics: dict[str, int | float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    named: dict[str, Any] = {**arrays, METRICS_KEY: np.array(json.dumps(metrics, sort_keys=True))}
    np.savez(path, **named)


def load_kept(path: Path) -> tuple[dict[str, np.ndarray], dict[str, int | float]]:
    """A kept update (or incoming global adapter): its tensors and metrics; an ``InputError`` naming the file
    when it is not a readable kept update (truncated, not an .npz, metrics that are not a JSON object)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files if k != METRICS_KEY}
            metrics = json.loads(str(npz[METRICS_KEY])) if METRICS_KEY in npz.files else {}
    # what numpy and zipfile raise for a damaged .npz: BadZipFile, EOFError, ValueError (pickled or garbled
    # arrays, bad JSON), OSError (unreadable); the auditor needs the file named, not numpy's traceback
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise InputError(f"{path}: not a readable kept update ({' '.join(str(err).split())})") from err
    if not isinstance(metrics, dict):
        raise InputError(f"{path}: not a readable kept update (its metrics are not a JSON object)")
    return arrays, metrics


class LedgerStrategy(RoundAggregation):
    """A strategy that records, in a signed ledger, every update it receives and every aggregation it makes."""

    def __init__(
        self,
        strategy: RegionFedAvg,
        ledger: Ledger,
        keep_dir: Path | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.strategy = strategy
        self.ledger = ledger
        self.keep_dir = keep_dir
        self.clock = clock
        self._run: int | None = None
        self._sent_hash: str | None = None
        self._split = ""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send as the inner strategy does; record the global adapter that went out."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._run = messages[0].metadata.run_id if messages else self._run
        sent = to_numpy(arrays)
        self._sent_hash = payload_hash(sent)
        self.ledger.append(
            {
                "kind": DISPATCH,
                "run": self._run,
                "round": server_round,
                "message": "train",
                "global_sha256": self._sent_hash,
                "nodes": sorted(m.metadata.dst_node_id for m in messages),
            },
            self.clock(),
        )
        if self.keep_dir is not None:
            _save(round_dir(self.keep_dir, server_round) / GLOBAL_IN_FILE, sent, {})
        return messages

    def aggregate_train_round(self, server_round: int, replies: Iterable[Message]) -> RoundLog:
        """Aggregate as the inner strategy does; record each reply, the participants and the result.

        Everything recorded comes from the inner strategy's RoundLog: the replies' tensors as it converted them.
        """
        result = self.strategy.aggregate_train_round(server_round, replies)
        hashes = self._record_inbound(server_round, "train", result.received)
        participants = [
            {
                "region": r.region,
                "node": r.node_id,
                "sha256": hashes[r.node_id],
                "num_examples": r.num_examples,
                "weight": w,
            }
            for r, w in zip(result.replies, result.weights, strict=True)
        ]
        self.ledger.append(
            {
                "kind": AGGREGATE,
                "run": self._run,
                "round": server_round,
                "method": self.strategy.method,
                **self._stepped(result),
                "base_sha256": self._sent_hash,
                "participants": participants,
                "rejected": result.rejected,
                "global_sha256": payload_hash(result.global_arrays) if result.global_arrays is not None else None,
            },
            self.clock(),
        )
        if self.keep_dir is not None:
            for reply in result.replies:
                path = round_dir(self.keep_dir, server_round) / f"{reply.region}{UPDATE_SUFFIX}"
                _save(path, *reply.received.payload())
        return result

    def _stepped(self, result: RoundLog) -> dict[str, Any]:
        """How the round's mean became the new global adapter: the server optimizer and its state after it."""
        state = result.optimizer_state
        return {
            "server_lr": self.strategy.optimizer.server_lr,
            "optimizer": self.strategy.optimizer.to_record(),
            "optimizer_step": state.step if state else None,
            "optimizer_state_sha256": state_hash(state) if state else None,
        }

    def aggregate_train_sum(
        self, server_round: int, secure: SecureSum, received: list[ReceivedReply], rejected: list[dict[str, str | None]]
    ) -> RoundLog:
        """Aggregate a secure round's sum as the inner strategy does; record each masked upload, the
        participants, the sum's hash and the result (and keep the sum, from which ``recompute`` checks it)."""
        result = self.strategy.aggregate_train_sum(server_round, secure, received, rejected)
        hashes = self._record_inbound(server_round, "train", result.received)
        total = secure_sum_arrays(secure)
        params = secure.params
        self.ledger.append(
            {
                "kind": AGGREGATE,
                "run": self._run,
                "round": server_round,
                "method": self.strategy.method,
                **self._stepped(result),
                "base_sha256": self._sent_hash,
                "participants": [
                    {"region": region, "node": node, "sha256": hashes.get(node)}
                    for region, node in zip(secure.regions, secure.nodes, strict=True)
                ],
                "secure": {
                    "sum_sha256": payload_hash(total),
                    "dropped": list(secure.dropped),
                    "threshold": params.threshold,
                    "clipping_range": params.clipping_range,
                    "target_range": params.target_range,
                    "modulus": params.modulus,
                },
                "rejected": result.rejected,
                "global_sha256": payload_hash(result.global_arrays) if result.global_arrays is not None else None,
            },
            self.clock(),
        )
        if self.keep_dir is not None:
            _save(round_dir(self.keep_dir, server_round) / SECURE_SUM_FILE, total, {})
        return result

    def configure_evaluate(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        extra: Mapping[str, ArrayRecord] | None = None,
    ) -> Iterable[Message]:
        """Send as the inner strategy does."""
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid, extra))
        self._run = messages[0].metadata.run_id if messages else self._run
        self._split = str(config.get(keys.SPLIT, ""))
        return messages

    def aggregate_evaluate_round(self, server_round: int, replies: Iterable[Message]) -> RoundLog:
        """Aggregate as the inner strategy does; record each reply."""
        result = self.strategy.aggregate_evaluate_round(server_round, replies)
        self._record_inbound(server_round, "evaluate", result.received, self._split)
        return result

    def _record_inbound(
        self, server_round: int, message: str, received: list[ReceivedReply], split: str = keys.TRAIN
    ) -> dict[int, str]:
        """One inbound entry per reply, in the order they came; the payload hash of each by sending node."""
        hashes: dict[int, str] = {}
        now = self.clock()
        for got in received:
            node = got.sender
            body: dict[str, Any] = {
                "kind": INBOUND,
                "run": self._run,
                "round": server_round,
                "message": message,
                "split": split,
            }
            if got.error is not None:
                body.update(node=node, status="error", reason=got.error.reason)
            else:
                arrays, metrics = got.payload()
                hashes[node] = payload_hash(arrays, metrics)
                index = metrics.get(self.strategy.region_key)
                body.update(node=node, region_index=index, sha256=hashes[node], status="received")
            self.ledger.append(body, now)
        return hashes


# -------------------------------------------------------------------------------------------- recomputation


def recompute(server: LedgerCheck, keep_dir: Path) -> tuple[int, list[str]]:
    """Recompute every round's global adapter from the kept updates and compare with the ledger's hashes.

    A server optimizer with state (fedavgm, fedadam, fedyogi, fedadagrad) is replayed from round 1: round r
    starts from the state the recomputation of round r − 1 produced, so a round whose predecessor cannot be
    recomputed cannot be either (and is a problem). Returns the number of rounds whose kept updates were found
    and recomputed, and the problems found (each naming the ledger line; a round without kept updates is one).
    A ``keep_dir`` that is missing or holds none of the recorded rounds is an ``InputError``; a damaged kept file
    is one naming the file.
    """
    rounds = [e for e in server.entries if e["body"].get("kind") == AGGREGATE and e["body"].get("global_sha256")]
    if not keep_dir.is_dir():
        what = "not a folder" if keep_dir.exists() else "no such folder"
        raise InputError(f"{keep_dir}: {what}; kept updates are a run's audit/updates folder")
    if rounds and not any(round_dir(keep_dir, int(e["body"]["round"])).is_dir() for e in rounds):
        # nothing to recompute is not a pass: most likely another run's folder, or not an updates folder at all
        first = round_name(int(rounds[0]["body"]["round"]))
        raise InputError(
            f"{keep_dir}: holds none of the {len(rounds)} round(s) the server ledger records ({first}/, …); "
            "give the run's audit/updates folder"
        )
    problems: list[str] = []
    recomputed = 0
    # the optimizer state after each round whose recomputation matched the ledger (a round redone after a crash
    # replaces its earlier entry's)
    after: dict[int, OptimizerState] = {}
    for entry in rounds:
        body = entry["body"]
        server_round = int(body["round"])
        where = f"{server.path}:{entry['_line']}: round {server_round}"
        folder = round_dir(keep_dir, server_round)
        after.pop(server_round, None)
        problem, state = _recompute_round(body, folder, after)
        if problem:
            problems.append(f"{where}: {problem}")
        elif state is not None:
            after[server_round] = state
        if (folder / GLOBAL_IN_FILE).is_file():
            recomputed += 1
    return recomputed, problems


def recorded_optimizer(body: dict[str, Any]) -> ServerOptimizer:
    """The server optimizer an aggregate entry records (entries written before optimizers existed name only
    ``server_lr``: fedavg); a ValueError when the record is not one."""
    record = body.get("optimizer")
    if record is None:
        return ServerOptimizer("fedavg", server_lr=float(body["server_lr"]))
    if not isinstance(record, dict):
        raise ValueError(f"optimizer is {record!r}, not a record")
    return ServerOptimizer.from_record(record)


def _state_before(
    optimizer: ServerOptimizer, server_round: int, after: dict[int, OptimizerState]
) -> OptimizerState | str:
    """The state round ``server_round`` started from, or why it is not known."""
    if server_round == 1:
        return OptimizerState()
    if optimizer.name == "fedavg":
        return OptimizerState(step=server_round - 1)  # fedavg keeps nothing but the count
    if server_round - 1 not in after:
        return (
            f"{optimizer.name} carries its state from round to round, and round {server_round - 1} could not be "
            "recomputed, so this one cannot be either"
        )
    return after[server_round - 1]


def secure_sum_arrays(secure: SecureSum) -> dict[str, np.ndarray]:
    """A secure round's sum as kept and hashed: the tensors' sums and [Σ w, Σ w·q(loss)] under ``WEIGHTS``."""
    return {**secure.total, WEIGHTS: np.array([secure.total_weight, secure.loss_total], dtype=np.int64)}


def _recompute_round(
    body: dict[str, Any], folder: Path, after: dict[int, OptimizerState]
) -> tuple[str | None, OptimizerState | None]:
    """Why round ``body`` cannot be recomputed from what ``folder`` kept (its updates, or a secure round's sum),
    or None and the optimizer state after it."""
    if not (folder / GLOBAL_IN_FILE).is_file():
        return f"no kept updates in {folder}", None
    try:
        optimizer = recorded_optimizer(body)
    except (ValueError, KeyError, TypeError) as err:
        return f"the recorded server optimizer is not one this program knows ({err})", None
    before = _state_before(optimizer, int(body["round"]), after)
    if isinstance(before, str):
        return before, None
    base, _ = load_kept(folder / GLOBAL_IN_FILE)
    if payload_hash(base) != body["base_sha256"]:
        return f"{folder / GLOBAL_IN_FILE} is not the global adapter the round started from", None
    secure = body.get("secure")
    mean = _secure_mean(secure, base, folder) if isinstance(secure, dict) else _plain_mean(body, folder)
    if isinstance(mean, str):
        return mean, None
    try:
        result, state = optimizer.step(base, mean, before)
    except ValueError as err:
        return f"the kept updates cannot be stepped by {optimizer.name}: {err}", None
    if payload_hash(result) != body["global_sha256"]:
        kept = "the kept sum" if isinstance(secure, dict) else "the kept updates"
        return (
            f"{kept}, stepped by {optimizer.name} {optimizer.hyperparameters()} from the replayed state, do not "
            "aggregate to the global adapter the ledger records"
        ), None
    recorded_state = body.get("optimizer_state_sha256")
    if recorded_state is not None and state_hash(state) != recorded_state:
        return f"the replayed {optimizer.name} state does not hash to the state the ledger records", None
    return None, state


def _plain_mean(body: dict[str, Any], folder: Path) -> dict[str, np.ndarray] | str:
    """The round's weighted mean from its kept updates, or why it cannot be had."""
    updates, counts = [], []
    for part in body["participants"]:
        path = folder / f"{part['region']}{UPDATE_SUFFIX}"
        if not path.is_file():
            return f"the update of {part['region']} was not kept ({path})"
        arrays, metrics = load_kept(path)
        if payload_hash(arrays, metrics) != part["sha256"]:
            return f"{path} does not hash to the update the ledger records for {part['region']}"
        count = metrics.get(keys.NUM_EXAMPLES)
        if not isinstance(count, int | float):
            return f"{path} records no example count"
        updates.append(arrays)
        counts.append(int(count))
    weights = aggregation_weights(counts, str(body["method"]))
    if weights != [p["weight"] for p in body["participants"]]:
        return f"the recorded weights {[p['weight'] for p in body['participants']]} are not {weights}"
    return weighted_average(updates, weights)


def _secure_mean(secure: dict[str, Any], base: dict[str, np.ndarray], folder: Path) -> dict[str, np.ndarray] | str:
    """A secure round's weighted mean from its kept sum (the only thing the server ever had of the regions'
    updates), or why it cannot be had."""
    path = folder / SECURE_SUM_FILE
    if not path.is_file():
        return f"the sum of this secure round was not kept ({path})"
    total, _ = load_kept(path)
    if payload_hash(total) != secure["sum_sha256"]:
        return f"{path} does not hash to the sum the ledger records"
    weights = total.pop(WEIGHTS, None)
    if weights is None or weights.shape != (2,) or set(total) != set(base):
        return f"{path} is not the sum of this round's adapter"
    mean = mean_from_sum(total, int(weights[0]), float(secure["clipping_range"]), int(secure["target_range"]))
    return {k: mean[k].astype(np.asarray(ref).dtype) for k, ref in base.items()}
