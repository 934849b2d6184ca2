"""The egress guard: one Flower mod that every reply of the ClientApp passes on its way out.

It asks the region's policy (``common.policy.egress_problems``) whether the reply may leave; if not, the reply
is replaced by an error message naming every violation, which the server records as that region's failure.
Either way the node's signed ledger gets an entry: what left (tensor manifest, payload hash, bytes, metrics,
the policy's hash, the PII redaction counts) or what was stopped and why. Training code knows nothing of this.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp.typing import Mod

from client.task import NodeSettings, region_data
from common import keys
from common.audit import EGRESS, FAILED, REFUSED, SENT, Ledger, content_payload, payload_hash
from common.config import ClientTask, Region
from common.policy import Outbound, Protections, TensorInfo, egress_problems, refusal_reason

log = logging.getLogger("fedlocale.node")

# Flower reserves small codes for its own errors; ours says "the node's policy stopped this reply"
POLICY_REFUSED = 4031


@dataclass(frozen=True)
class GuardContext:
    """What the guard needs to know about the node a message reached."""

    region: Region
    node: NodeSettings


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _task(msg: Message) -> ClientTask:
    return ClientTask.from_json(str(msg.content.config_records[keys.CONFIG][keys.TASK]))


def describe(reply: Message, message: str, region: str, train_examples: int) -> tuple[Outbound, str]:
    """The reply as the policy sees it, and the SHA-256 of its payload (tensors and metrics)."""
    arrays, metrics = content_payload(reply.content)
    tensors = tuple(TensorInfo(n, tuple(a.shape), str(a.dtype), int(a.nbytes)) for n, a in arrays.items())
    out = Outbound(
        message, region, tensors, metrics, train_examples, Protections(), tuple(reply.content.config_records)
    )
    return out, payload_hash(arrays, metrics)


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
        "protections": {"dp": out.protections.dp, "secure_aggregation": out.protections.secure_aggregation},
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


def release(msg: Message, reply: Message, where: GuardContext, ledger: Ledger | None, now: datetime) -> Message:
    """Let ``reply`` leave if the node's policy allows it, else an error reply; record either in the ledger."""
    message = _message_name(msg)
    if reply.has_error():
        _record_failure(msg, where, ledger, reply.error.reason or "", now)
        return reply
    data, redactions = region_data(where.region, _task(msg).labels, where.node)
    out, digest = describe(reply, message, where.region.name, len(data.train))
    problems = egress_problems(where.node.policy, out) if where.node.policy else []
    entry = _entry(msg, out, None if problems else digest, where.node, redactions)
    entry.update({"status": REFUSED, "reasons": problems} if problems else {"status": SENT})
    if ledger is not None:
        ledger.append(entry, now)
    if problems:
        log.warning("%s: %s reply refused by the region policy: %s", where.region.name, message, "; ".join(problems))
        return _refusal(msg, where.region.name, problems)
    return reply


def _message_name(msg: Message) -> str:
    return "train" if msg.metadata.message_type == MessageType.TRAIN else "evaluate"


def _record_failure(msg: Message, where: GuardContext, ledger: Ledger | None, reason: str, now: datetime) -> None:
    if ledger is not None:
        ledger.append({**_header(msg, where.region.name), "status": FAILED, "reason": reason}, now)


def egress_guard(locate: Callable[[Message, Context], GuardContext], clock: Callable[[], datetime] = _utc_now) -> Mod:
    """A ClientApp mod that checks and records every reply; ``locate`` says which region and node it runs on."""

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        where = locate(msg, context)
        audit_dir = where.node.audit_dir
        ledger = Ledger.in_folder(audit_dir, where.region.name) if audit_dir else None
        try:
            reply = call_next(msg, context)
        except Exception as err:
            # the reply Flower makes of this error carries only the reason; the ledger says it left nothing else
            _record_failure(msg, where, ledger, f"{type(err).__name__}: {err}", clock())
            raise
        return release(msg, reply, where, ledger, clock())

    return mod
