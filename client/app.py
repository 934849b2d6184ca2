"""The Flower ClientApp: parse the message, call a plain function from ``client.task``, reply."""

from __future__ import annotations

import atexit
import gc
from collections.abc import Sequence

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.task import NodeSettings, evaluate_round, node_settings, region_index, resolve_region, train_round
from common import keys
from common.config import ClientTask, Region

# Deployment starts a fresh process per message. The ~430k objects the imports above create live until it ends,
# yet every full garbage collection rescans them: ~0.5 s of collections per message (mostly during the model
# build) and 2-4 s while the process exits after sending the reply (simulations/bench_message.py). Freezing moves
# them out of the collector's sight, now and again at exit (down to ~0.02 s and ~0.4 s). In a long-lived process
# (simulation, tests) both happen once and only import-time objects are frozen.
gc.freeze()
atexit.register(gc.freeze)


def _parse(
    msg: Message, context: Context, sim_regions: Sequence[Region] | None
) -> tuple[Region, NodeSettings, ClientTask, int, dict[str, torch.Tensor]]:
    """The region this node serves, the node's own settings, the server's task, the region's index in the run,
    the global adapter."""
    region = resolve_region(context.node_config, context.run_config, sim_regions)
    node = node_settings(context.node_config)
    task = ClientTask.from_json(str(msg.content.config_records[keys.CONFIG][keys.TASK]))
    state = msg.content.array_records[keys.ARRAYS].to_torch_state_dict()
    return region, node, task, region_index(region, task), state


def make_app(sim_regions: Sequence[Region] | None = None) -> ClientApp:
    """Build the ClientApp; the in-process simulator passes the run's regions, deployment passes nothing."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        region, node, task, index, state = _parse(msg, context, sim_regions)
        new_state, result = train_round(region, task, state, node)
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
        region, node, task, index, state = _parse(msg, context, sim_regions)
        split = str(msg.content.config_records[keys.CONFIG][keys.SPLIT])
        result = evaluate_round(region, task, state, split, node)
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


# Entry point for stock Flower tooling (`flwr run`, `flower-supernode`): the region comes from the node config.
app = make_app()
