"""The Flower ClientApp: parse the message, call a plain function from ``client.task``, reply."""

from __future__ import annotations

import atexit
import functools
import gc
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secagg
from client.dp import spent
from client.guard import InFlight, NodeMessage, egress_guard
from client.node_audit import keep_received
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
from client.train import TrainResult
from common import keys
from common.config import ClientTask, PersonalizeSettings, Region, load_config
from common.runfiles import AUDIT_DIR, NODES_DIR, SIMULATED_CACHE_DIR
from common.secagg import SecAggParams, decode, encode
from common.seeds import derive_seed

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
    cache_root: Path | None,
    canaries: int = 0,
    personalize_plan: PersonalizeSettings | None = None,
    sim_seed: int | None = None,
) -> NodeMessage:
    """The region this node serves and the node's own settings (policy, ledger folder, cache, threads)."""
    region = resolve_region(context.node_config, context.run_config, sim_regions)
    if keys.NODE_REGION in context.node_config:
        return NodeMessage(region, node_settings(context.node_config))
    # a simulated node: its policy is the run config's region entry; its ledger and token cache sit in the run's
    # folder (the cache spares every message after a region's first the tokenizer load and the tokenising)
    out_dir = context.run_config.get(keys.RUN_OUT_DIR)
    run_dir = Path(str(out_dir)) if out_dir is not None else None
    if audit_root is None and run_dir is not None:
        audit_root = run_dir / AUDIT_DIR / NODES_DIR
    if cache_root is None and run_dir is not None:
        cache_root = run_dir / SIMULATED_CACHE_DIR
    # its DP secret is derived from the run's seed (simulation only: reproducible, and the "server" is this
    # same process); the seed is the simulator's, or with stock Flower tooling the run config file's
    run_seed = sim_seed if sim_seed is not None else _config_seed(context)
    node = simulated_node(
        region, context.node_config, audit_root, personal, cache_root, canaries, personalize_plan, run_seed
    )
    return NodeMessage(region, node)


def _config_seed(context: Context) -> int | None:
    """The seed of the run config file the run config's ``config`` key names (a simulation with stock Flower
    tooling); None when it names none."""
    path = context.run_config.get(keys.RUN_CONFIG_PATH)
    return load_config(Path(path)).seed if isinstance(path, str) else None


def _parse(msg: Message, here: NodeMessage) -> tuple[ClientTask, int, dict[str, torch.Tensor]]:
    """The server's task, the region's index in the run, the global adapter."""
    task = ClientTask.from_json(str(msg.content.config_records[keys.CONFIG][keys.TASK]))
    state = msg.content.array_records[keys.ARRAYS].to_torch_state_dict()
    return task, region_index(here.region, task), state


def make_app(
    sim_regions: Sequence[Region] | None = None,
    audit_root: Path | None = None,
    personal: Personal | None = None,
    cache_root: Path | None = None,
    canaries: int = 0,
    personalize_plan: PersonalizeSettings | None = None,
    sim_seed: int | None = None,
) -> ClientApp:
    """Build the ClientApp; the in-process simulator passes the run's regions (and where the simulated nodes
    keep their ledgers, with personalize mode dual their personal LoRA, and how many canaries each inserts into
    its training data, audit.canaries, and the personalization the run does after the rounds, whose DP-SGD
    steps a DP node plans for, personalize.dp, and the run's seed its simulated nodes derive their DP secrets
    from, ``client.task.simulated_node``), deployment passes nothing.
    Every reply passes the egress guard, which locates the node once per message and hands the handler that
    ``NodeMessage`` (through ``inflight``); the handler loads the region's data through it, once."""

    def locate(msg: Message, context: Context) -> NodeMessage:
        return _locate(context, sim_regions, audit_root, personal, cache_root, canaries, personalize_plan, sim_seed)

    inflight = InFlight()
    app = ClientApp(mods=[egress_guard(locate, inflight)])

    def trained(msg: Message) -> tuple[ClientTask, int, dict[str, torch.Tensor], TrainResult]:
        here = inflight.of(msg)
        task, index, state = _parse(msg, here)
        keep_received(here.region.name, here.node, task, state, delivered=False)  # keep-globals: for its audit
        trainer = train_dual if here.node.personal_rank is not None else train_round
        new_state, result = trainer(here.region, task, state, here.node, here.load(task, training=True))
        # the privacy spent so far (DP-SGD), for the reply's metrics and the guard's check
        here.dp = spent(here.node.policy, here.node.audit_dir, task, trained=True)
        return task, index, new_state, result

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        _task, index, new_state, result = trained(msg)
        here = inflight.of(msg)
        metrics = MetricRecord(
            {
                keys.NUM_EXAMPLES: result.num_examples,
                keys.TRAIN_LOSS: result.loss,
                keys.REGION_INDEX: index,
                **_dp_metrics(here),
            }
        )
        content = RecordDict({keys.ARRAYS: ArrayRecord(new_state), keys.METRICS: metrics})
        return Message(content=content, reply_to=msg)

    # Secure aggregation (client.secagg): the node keeps its keys and shares in its context state between
    # stages; only the masked-input stage trains, and its reply carries nothing but the masked vector, the
    # region's index and, under DP-SGD, the privacy spent (the example count and loss travel inside the mask).
    @app.train(keys.SECAGG_SETUP)
    def secagg_setup(msg: Message, context: Context) -> Message:
        payload = _secagg_payload(msg)
        params = SecAggParams.from_json(str(payload["params"]))
        secrets, reply = secagg.setup(_round(msg), params)
        _keep(context, secrets)
        return _secagg_reply(msg, reply)

    @app.train(keys.SECAGG_SHARE)
    def secagg_share(msg: Message, context: Context) -> Message:
        secrets = _kept(context, msg)
        public = {int(k): (v[0], v[1]) for k, v in _secagg_payload(msg)["public_keys"].items()}
        reply = secagg.share_keys(secrets, msg.metadata.dst_node_id, public)
        _keep(context, secrets)
        return _secagg_reply(msg, reply)

    @app.train(keys.SECAGG_MASK)
    def secagg_mask(msg: Message, context: Context) -> Message:
        secrets = _kept(context, msg)
        ciphertexts = {int(k): v for k, v in _secagg_payload(msg)["ciphertexts"].items()}
        task, index, new_state, result = trained(msg)
        weight = 1 if secrets.params.uniform else result.num_examples
        update = {k: v.detach().cpu().numpy() for k, v in new_state.items()}
        seed = derive_seed(task.seed, "secagg-quantize", task.server_round, inflight.of(msg).region.name)
        masked = secagg.masked_input(secrets, msg.metadata.dst_node_id, ciphertexts, update, weight, result.loss, seed)
        _keep(context, secrets)
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in masked.items()})
        # epsilon and delta travel in the clear, as in a plain reply: they come from public settings, not data
        metrics = MetricRecord({keys.REGION_INDEX: index, **_dp_metrics(inflight.of(msg))})
        return Message(content=RecordDict({keys.ARRAYS: arrays, keys.METRICS: metrics}), reply_to=msg)

    @app.train(keys.SECAGG_UNMASK)
    def secagg_unmask(msg: Message, context: Context) -> Message:
        secrets = _kept(context, msg)
        payload = _secagg_payload(msg)
        reply = secagg.unmask(secrets, msg.metadata.dst_node_id, list(payload["active"]), list(payload["dropped"]))
        del context.state.config_records[keys.SECAGG]  # the round is over: its secrets go
        return _secagg_reply(msg, reply)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        here = inflight.of(msg)
        task, index, state = _parse(msg, here)
        split = str(msg.content.config_records[keys.CONFIG][keys.SPLIT])
        if split == keys.TEST:  # the test evaluation carries the adapter the run delivers (the best round's)
            keep_received(here.region.name, here.node, task, state, delivered=True)
        last = functools.partial(_last_round, msg)
        result = evaluate_message(here.region, task, state, split, here.node, here.load(task), last, time.time())
        here.dp = spent(here.node.policy, here.node.audit_dir, task, trained=False)
        metrics = MetricRecord(
            {
                keys.NUM_EXAMPLES: result.num_examples,
                keys.LOSS: result.loss,
                keys.ACCURACY: result.accuracy,
                keys.MACRO_F1: result.macro_f1,
                keys.REGION_INDEX: index,
                **_dp_metrics(here),
            }
        )
        return Message(content=RecordDict({keys.METRICS: metrics}), reply_to=msg)

    return app


def _dp_metrics(here: NodeMessage) -> dict[str, float]:
    """The privacy spent so far, in the reply's metrics when the node trains with DP-SGD."""
    return {} if here.dp is None else here.dp.metrics()


def _round(msg: Message) -> int:
    return int(str(msg.content.config_records[keys.CONFIG][keys.SERVER_ROUND]))


def _secagg_payload(msg: Message) -> Any:
    return decode(str(msg.content.config_records[keys.SECAGG][keys.SECAGG_PAYLOAD]))


def _secagg_reply(msg: Message, payload: dict[str, Any]) -> Message:
    record = ConfigRecord({keys.SECAGG_PAYLOAD: encode(payload)})
    return Message(content=RecordDict({keys.SECAGG: record}), reply_to=msg)


def _keep(context: Context, secrets: secagg.NodeSecrets) -> None:
    context.state.config_records[keys.SECAGG] = ConfigRecord({keys.SECAGG_PAYLOAD: secrets.to_json()})


def _kept(context: Context, msg: Message) -> secagg.NodeSecrets:
    """This node's secrets of the round ``msg`` belongs to; a stage out of order is refused."""
    record = context.state.config_records.get(keys.SECAGG)
    secrets = secagg.NodeSecrets.from_json(str(record[keys.SECAGG_PAYLOAD])) if record is not None else None
    if secrets is None or secrets.round != _round(msg):
        raise secagg.SecAggRefusal(
            f"secure aggregation stage {msg.metadata.message_type} of round {_round(msg)} without this node's "
            "setup of that round"
        )
    return secrets


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
