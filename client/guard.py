"""The egress guard: one Flower mod that every reply of the ClientApp passes on its way out.

It asks the region's policy (``common.policy.egress_problems``) whether the reply may leave; if not, the reply
is replaced by an error message naming every violation, which the server records as that region's failure.
Either way the node's signed ledger gets an entry: what left (tensor manifest, payload hash, bytes, metrics,
the policy's hash, the PII redaction counts) or what was stopped and why. Training code knows nothing of this.

The guard also locates the node once per message (region and settings, whose policy, augmentation and
personalization files are parsed there) and hands that to the handler as a ``NodeMessage``; the handler loads
the region's data through it, which leaves the counts the ledger entry needs (``DataCounts``) for the guard,
so a message reads and redacts its region's data once.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp.typing import Mod

from client.pipeline import DataCounts, NodeData
from client.task import NodeSettings, load_data
from common import keys
from common.audit import EGRESS, FAILED, REFUSED, SENT, Ledger, content_payload, payload_hash
from common.config import ClientTask, Region
from common.policy import (
    DpRecord,
    Outbound,
    PolicyError,
    Protections,
    TensorInfo,
    egress_problems,
    refusal_reason,
)

log = logging.getLogger("fedlocale.node")

# Flower reserves small codes for its own errors; ours says "the node's policy stopped this reply"
POLICY_REFUSED = 4031


@dataclass
class NodeMessage:
    """One message on this node, shared by the guard and the handler: which region and node settings it runs
    on (parsed once, by the guard) and, once the handler has loaded the region's data (``load``), the counts
    the guard records about it."""

    region: Region
    node: NodeSettings
    counts: DataCounts | None = None
    # the privacy this run has spent of the region's data, when its policy requires DP (client.dp.spent): the
    # handler sets it, the guard checks it against the policy and records it
    dp: DpRecord | None = None

    def load(self, task: ClientTask, *, training: bool = False) -> NodeData:
        """The region's data through the node's pipeline (``client.task.load_data``); keeps its counts for the
        guard, so the guard never reads the data again."""
        data = load_data(self.region, task, self.node, training=training)
        self.counts = data.counts
        return data


class InFlight:
    """The ``NodeMessage`` of each message between the guard and its handler.

    Flower's ``call_next(msg, context)`` carries nothing else, so the guard leaves it here for the duration of
    the call, keyed by the identity of the message object: Flower hands the handler the very object the mod got
    (flwr.clientapp.mod.utils.make_ffn), the guard keeps it alive until it takes the slot back, and two messages
    in flight at once cannot collide (``message_id`` can: it is empty on a message built outside a SuperLink).
    ``context.state`` would not do: it outlives the message (a simulated node keeps its context from message to
    message, so a handler that failed to fill it in would leave the last message's counts) and holds records,
    not the node's parsed settings. One ``InFlight`` belongs to one ClientApp (``client.app.make_app``).
    """

    def __init__(self) -> None:
        self._open: dict[int, NodeMessage] = {}

    @contextmanager
    def hold(self, msg: Message, here: NodeMessage) -> Iterator[None]:
        """Make ``here`` the ``NodeMessage`` of ``msg`` while the handler runs."""
        self._open[id(msg)] = here
        try:
            yield
        finally:
            del self._open[id(msg)]

    def of(self, msg: Message) -> NodeMessage:
        """The ``NodeMessage`` the guard left for ``msg``; a handler reached without the guard is an error."""
        here = self._open.get(id(msg))
        if here is None:
            raise RuntimeError("a message reached the ClientApp's handler without passing the egress guard")
        return here


def _utc_now() -> datetime:
    return datetime.now(UTC)


_PLAIN = Protections()  # a reply sent in the clear


def describe(
    reply: Message, message: str, region: str, train_examples: int, protections: Protections = _PLAIN
) -> tuple[Outbound, str]:
    """The reply as the policy sees it, and the SHA-256 of its payload (tensors and metrics)."""
    arrays, metrics = content_payload(reply.content)
    tensors = tuple(TensorInfo(n, tuple(a.shape), str(a.dtype), int(a.nbytes)) for n, a in arrays.items())
    out = Outbound(message, region, tensors, metrics, train_examples, protections, tuple(reply.content.config_records))
    return out, payload_hash(arrays, metrics)


def _action(msg: Message) -> str:
    """The action of a ``train.<action>`` message (secure aggregation's stages), else ""."""
    category, _, action = msg.metadata.message_type.partition(".")
    return action if category == MessageType.TRAIN else ""


def _entry(
    msg: Message, out: Outbound, digest: str | None, node: NodeSettings, redactions: dict[str, int]
) -> dict[str, Any]:
    return {
        **_header(msg, out.region),
        "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in out.tensors],
        "metrics": {k: v if isinstance(v, int) or math.isfinite(v) else str(v) for k, v in out.metrics.items()},
        "sha256": digest,
        "bytes": out.nbytes,
        "policy": node.policy.digest() if node.policy else None,
        "redactions": redactions,
        "train_examples": out.train_examples,
        "protections": {
            "dp": out.protections.dp.to_json() if out.protections.dp else None,
            "secure_aggregation": out.protections.secure_aggregation,
        },
    }


def _header(msg: Message, region: str) -> dict[str, Any]:
    """Which message of which run and round an entry is about (and the split, for an evaluation)."""
    config = msg.content.config_records.get(keys.CONFIG)
    round_value = config.get(keys.SERVER_ROUND) if config else None
    split = config.get(keys.SPLIT) if config else None
    return {
        "kind": EGRESS,
        "run": msg.metadata.run_id,
        "round": int(round_value) if isinstance(round_value, int | float) else None,
        "message": _message_name(msg),
        "split": split if isinstance(split, str) else keys.TRAIN,
        "region": region,
    }


def _refusal(msg: Message, region: str, problems: list[str]) -> Message:
    return Message(error=Error(code=POLICY_REFUSED, reason=refusal_reason(region, problems)), reply_to=msg)


def release(msg: Message, reply: Message, where: NodeMessage, ledger: Ledger | None, now: datetime) -> Message:
    """Let ``reply`` leave if the node's policy allows it, else an error reply; record either in the ledger.

    The counts come from the handler's loading of the data (``NodeMessage.load``); a reply made without it
    has nothing the policy could check it against, so it does not leave (recorded as a failure).
    """
    message = _message_name(msg)
    if reply.has_error():
        _record_failure(msg, where, ledger, reply.error.reason or "", now)
        return reply
    if _action(msg) in keys.SECAGG_PROTOCOL_STAGES:
        return _release_protocol(msg, reply, where, ledger, now)
    if where.counts is None:
        reason = f"the {message} handler replied without loading the region's data, so the policy cannot judge it"
        _record_failure(msg, where, ledger, reason, now)
        raise RuntimeError(reason)
    # the masked-input stage's reply is this node's update under secure aggregation's masks (client.secagg)
    protections = Protections(secure_aggregation=_action(msg) == keys.SECAGG_MASK, dp=where.dp)
    out, digest = describe(reply, message, where.region.name, where.counts.train_examples, protections)
    problems = egress_problems(where.node.policy, out) if where.node.policy else []
    entry = _entry(msg, out, None if problems else digest, where.node, where.counts.redactions)
    entry.update({"status": REFUSED, "reasons": problems} if problems else {"status": SENT})
    if ledger is not None:
        ledger.append(entry, now)
    if problems:
        log.warning("%s: %s reply refused by the region policy: %s", where.region.name, message, "; ".join(problems))
        return _refusal(msg, where.region.name, problems)
    return reply


def _release_protocol(
    msg: Message, reply: Message, where: NodeMessage, ledger: Ledger | None, now: datetime
) -> Message:
    """A secure-aggregation protocol reply (public keys, encrypted shares, shares to unmask): it holds no data of
    the region, only the protocol's own record; anything else in it is refused. Recorded like any reply."""
    content = reply.content
    problems = [f"tensors {sorted(content.array_records)} in a protocol reply"] if content.array_records else []
    problems += [f"metrics {sorted(content.metric_records)} in a protocol reply"] if content.metric_records else []
    extra = sorted(set(content.config_records) - {keys.SECAGG})
    problems += [f"config record {name!r} is not allowed to leave" for name in extra]
    text = (
        str(content.config_records[keys.SECAGG][keys.SECAGG_PAYLOAD]) if keys.SECAGG in content.config_records else ""
    )
    entry = {
        **_header(msg, where.region.name),
        "sha256": None if problems else hashlib.sha256(text.encode()).hexdigest(),
        "bytes": len(text.encode()),
        "policy": where.node.policy.digest() if where.node.policy else None,
    }
    entry.update({"status": REFUSED, "reasons": problems} if problems else {"status": SENT})
    if ledger is not None:
        ledger.append(entry, now)
    return _refusal(msg, where.region.name, problems) if problems else reply


def _message_name(msg: Message) -> str:
    """The ledger's name of a message: train (a plain update or a masked one), a protocol stage, or evaluate."""
    action = _action(msg)
    if msg.metadata.message_type == MessageType.TRAIN or action == keys.SECAGG_MASK:
        return "train"
    return action or "evaluate"


def _record_failure(msg: Message, where: NodeMessage, ledger: Ledger | None, reason: str, now: datetime) -> None:
    if ledger is not None:
        ledger.append({**_header(msg, where.region.name), "status": FAILED, "reason": reason}, now)


def egress_guard(
    locate: Callable[[Message, Context], NodeMessage],
    inflight: InFlight,
    clock: Callable[[], datetime] = _utc_now,
) -> Mod:
    """A ClientApp mod that checks and records every reply; ``locate`` says which region and node it runs on,
    and the handler finds that in ``inflight`` (``InFlight.of``)."""

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        where = locate(msg, context)
        audit_dir = where.node.audit_dir
        ledger = Ledger.in_folder(audit_dir, where.region.name) if audit_dir else None
        try:
            with inflight.hold(msg, where):
                reply = call_next(msg, context)
        except PolicyError as err:
            # the handler found the policy forbids the work itself (a privacy budget spent): a refusal like any
            # other, recorded as one, and the run goes on without this region
            problems = [str(err)]
            if ledger is not None:
                ledger.append({**_header(msg, where.region.name), "status": REFUSED, "reasons": problems}, clock())
            log.warning("%s: %s refused by the region policy: %s", where.region.name, _message_name(msg), err)
            return _refusal(msg, where.region.name, problems)
        except Exception as err:
            # the reply Flower makes of this error carries only the reason; the ledger says it left nothing else
            _record_failure(msg, where, ledger, f"{type(err).__name__}: {err}", clock())
            raise
        return release(msg, reply, where, ledger, clock())

    return mod
