"""A Flower Grid that runs the real ClientApp of every simulated node in this process, without Ray.

Each node keeps one ``Context`` (its state included) for the grid's lifetime, as a SuperNode does, so protocols
that span several messages (secure aggregation) run as they do deployed. Used by the secure-aggregation tests
and ``benchmarks/bench_secagg.py``; ``fedlocale simulate`` uses Flower's own simulation engine.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict

from client.app import make_app as make_client_app
from common import keys
from common.config import RunConfig


class InProcessGrid:
    """One node per region of ``cfg`` (node id ``base`` + partition id); every message goes to the real ClientApp
    (egress guard and ledger under ``audit_root`` included). ``down`` maps a message type to the nodes that fail
    it, as a node that crashed would; ``sent`` logs every message type sent."""

    def __init__(self, cfg: RunConfig, audit_root: Path, base: int = 100) -> None:
        self.app = make_client_app(cfg.regions, audit_root=audit_root, sim_seed=cfg.seed)
        self.node_ids = [base + i for i in range(len(cfg.regions))]
        self.contexts = {n: Context(1, n, {keys.NODE_PARTITION_ID: n - base}, RecordDict(), {}) for n in self.node_ids}
        self.down: dict[str, set[int]] = {}
        self.sent: list[str] = []

    def get_node_ids(self) -> list[int]:
        """The connected nodes."""
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Each message's reply, in order; a raising ClientApp gives an error reply, as Flower's runtime does."""
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids do when they push
            node = msg.metadata.dst_node_id
            self.sent.append(msg.metadata.message_type)
            if node in self.down.get(msg.metadata.message_type, set()):
                reply = Message(Error(code=0, reason="node lost"), reply_to=msg)
            else:
                try:
                    reply = self.app(msg, self.contexts[node])
                except Exception as err:
                    reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies
