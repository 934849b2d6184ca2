"""The Flower ClientApp: parse the message, call a plain function from ``client.task``, reply."""

from __future__ import annotations

import atexit
import functools
import gc
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.guard import InFlight, NodeMessage, egress_guard
from client.task import (
    Personal,
    evaluate_message,
    node_settings,
    region_index,
    resolve_region,
    simulated_node,
    train_dual,
    train_round,
)
from common import keys
from common.config import ClientTask, Region
from common.runfiles import AUDIT_DIR, NODES_DIR

# Deployment starts a fresh process per message. The ~430k objects the imports above create live until it ends,
# yet every full garbage collection rescans them: ~0.5 s of collections per message (mostly during the model
# build) and 2-4 s while the process exits after sending the reply (benchmarks/bench_message.py). Freezing moves
# them out of the collector's sight, now and again at exit (down to ~0.02 s and ~0.4 s). In a long-lived process
# (simulation, tests) both happen once and only import-time objects are frozen.
gc.freeze()
atexit.register(gc.freeze)
log = logging.getLogger("fedlocale.node")


def _locate(
    context: Context,
    sim_regions: Sequence[Region] | None,
    audit_root: Path | None,
    personal: Personal | None,
    canaries: int = 0,
) -> NodeMessage:
    """The region this node serves and the node's own settings (policy, ledger folder, cache, threads)."""
    region = resolve_region(context.node_config, context.run_config, sim_regions)
    if keys.NODE_REGION in context.node_config:
        return NodeMessage(region, node_settings(context.node_config))
    # a simulated node: its policy is the run config's region entry, its ledger sits in the run's folder
    out_dir = context.run_config.get(keys.RUN_OUT_DIR)
    root = audit_root or (Path(str(out_dir)) / AUDIT_DIR / NODES_DIR if out_dir is not None else None)
    return NodeMessage(region, simulated_node(region, context.node_config, root, personal, canaries))


def _parse(msg: Message, here: NodeMessage) -> tuple[ClientTask, int, dict[str, torch.Tensor]]:
    """The server's task, the region's index in the run, the global adapter."""
    task = ClientTask.from_json(str(msg.content.config_records[keys.CONFIG][keys.TASK]))
    state = msg.content.array_records[keys.ARRAYS].to_torch_state_dict()
    return task, region_index(here.region, task), state


def make_app(
    sim_regions: Sequence[Region] | None = None,
    audit_root: Path | None = None,
    personal: Personal | None = None,
    canaries: int = 0,
) -> ClientApp:
    """Build the ClientApp; the in-process simulator passes the run's regions (and where the simulated nodes
    keep their ledgers, with personalize mode dual their personal LoRA, and how many canaries each inserts into
    its training data, audit.canaries), deployment passes nothing.
    Every reply passes the egress guard, which locates the node once per message and hands the handler that
    ``NodeMessage`` (through ``inflight``); the handler loads the region's data through it, once."""

    def locate(msg: Message, context: Context) -> NodeMessage:
        return _locate(context, sim_regions, audit_root, personal, canaries)

    inflight = InFlight()
    app = ClientApp(mods=[egress_guard(locate, inflight)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        here = inflight.of(msg)
        task, index, state = _parse(msg, here)
        trainer = train_dual if here.node.personal_rank is not None else train_round
        new_state, result = trainer(here.region, task, state, here.node, here.load(task, training=True))
        metrics = MetricRecord(
            {
                keys.NUM_EXAMPLES: result.num_examples,
                keys.TRAIN_LOSS: result.loss,
                keys.REGION_INDEX: index,
            }
        )
        content = RecordDict({keys.ARRAYS: ArrayRecord(new_state), keys.METRICS: metrics})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        here = inflight.of(msg)
        task, index, state = _parse(msg, here)
        split = str(msg.content.config_records[keys.CONFIG][keys.SPLIT])
        last = functools.partial(_last_round, msg)
        result = evaluate_message(here.region, task, state, split, here.node, here.load(task), last, time.time())
        metrics = MetricRecord(
            {
                keys.NUM_EXAMPLES: result.num_examples,
                keys.LOSS: result.loss,
                keys.ACCURACY: result.accuracy,
                keys.MACRO_F1: result.macro_f1,
                keys.REGION_INDEX: index,
            }
        )
        return Message(content=RecordDict({keys.METRICS: metrics}), reply_to=msg)

    return app


def _last_round(msg: Message) -> tuple[int, dict[str, torch.Tensor]] | None:
    """The last round's number and global adapter, which the test evaluation carries beside the best round's
    when the two differ; None when it does not."""
    config, arrays = msg.content.config_records[keys.CONFIG], msg.content.array_records
    if (keys.LAST_ROUND in config) != (keys.LAST_ARRAYS in arrays):
        raise ValueError(f"the test evaluation has only one of {keys.LAST_ROUND!r} and {keys.LAST_ARRAYS!r}")
    if keys.LAST_ROUND not in config:
        return None
    return int(str(config[keys.LAST_ROUND])), arrays[keys.LAST_ARRAYS].to_torch_state_dict()


# Entry point for stock Flower tooling (`flwr run`, `flower-supernode`): the region comes from the node config.
app = make_app()
