"""The server's side of a secure round (SecAgg+ on the Message API): four message exchanges through the grid,
then the unmasked sum goes to the strategy (``aggregate_train_sum``).

Stages (after Flower's legacy ``SecAggPlusWorkflow``): *setup* (parameters out, each node's two public keys
back), *share* (each node gets its neighbours' public keys and returns one encrypted Shamir share of its mask
seed and mask key per neighbour), *mask* (each node gets the adapter, its task and the shares addressed to it,
trains, and uploads its masked, quantized w·θ and w), *unmask* (the survivors return the seed shares of the
nodes that uploaded and the mask-key shares of those that dropped after sharing). The server removes every
mask and learns Σ w·θ and Σ w — nothing about one region. A node that drops before sharing is simply left out;
one that drops after it is recovered from its neighbours' shares; fewer than ``threshold`` survivors fail the
round, which the federation turns into the checkpoint/resume message.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.serverapp import Grid

from common import keys
from common.config import RunConfig
from common.errors import FedlocaleError
from common.secagg import (
    WEIGHTS,
    SecAggParams,
    add_mod,
    decode,
    derive_parameters,
    encode,
    layout,
    mask,
    neighbours,
    packed_size,
    pair_seed,
    unpack,
)
from common.seeds import derive_seed
from server.strategy import ReceivedReply, RoundLog, RoundStrategy, SecureSum, read_reply, to_numpy

log = logging.getLogger("fedlocale.server")


class SecureRoundError(FedlocaleError):
    """Too few nodes survived a stage of a secure round to unmask its sum."""


def threshold_for(configured: int | None, sampled: int) -> int:
    """The round's threshold: the configured one, else ⌈2/3⌉ of the sampled nodes, at least 2."""
    return configured if configured is not None else max(2, -(-2 * sampled // 3))


@dataclass
class _Exchange:
    """The replies of one stage: payloads by node, failures by node, and the bytes that travelled."""

    ok: dict[int, Any] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    received: dict[int, ReceivedReply] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0


def _payload_bytes(text: str) -> int:
    return len(text.encode())


def _exchange(
    grid: Grid,
    stage: str,
    contents: Mapping[int, RecordDict],
    timeout: float,
    payload_bytes: Mapping[int, int],
) -> _Exchange:
    """Send each node its content as a ``train.<stage>`` message; sort the replies by the node asked."""
    messages = [
        Message(content, dst_node_id=node, message_type=f"{keys.TRAIN}.{stage}") for node, content in contents.items()
    ]
    out = _Exchange(bytes_down=sum(payload_bytes.values()))
    replies = list(grid.send_and_receive(messages=messages, timeout=timeout))
    asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
    for reply in replies:
        node = asked.pop(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        got = read_reply(reply, node)
        out.received[node] = got
        if got.error is not None:
            out.failed[node] = f"node failed: {got.error.reason}"
            continue
        record = reply.content.config_records.get(keys.SECAGG)
        if record is not None:
            text = str(record.get(keys.SECAGG_PAYLOAD, ""))
            out.bytes_up += _payload_bytes(text)
            problem, payload = _payload_problem(stage, text)
            if problem:
                out.failed[node] = f"unusable {stage} reply: {problem}"
            else:
                out.ok[node] = payload
        else:
            out.bytes_up += sum(got.sizes.values())
            out.ok[node] = got
    for node in asked.values():
        out.failed[node] = "no reply within aggregation.round_timeout"
    for node in set(contents) - set(out.ok) - set(out.failed):
        out.failed[node] = "no reply within aggregation.round_timeout"
    for node, reason in out.failed.items():
        log.warning("secure round, stage %s: node %s dropped: %s", stage, node, reason)
    return out


# what each protocol stage's reply holds: field → (its type, the type of its values for a mapping)
_REPLY_FIELDS: dict[str, dict[str, tuple[type, type | None]]] = {
    keys.SECAGG_SETUP: {"mask_pk": (bytes, None), "box_pk": (bytes, None)},
    keys.SECAGG_SHARE: {"ciphertexts": (dict, bytes)},
    keys.SECAGG_UNMASK: {"seed_shares": (dict, bytes), "key_shares": (dict, bytes)},
}


def _payload_problem(stage: str, text: str) -> tuple[str | None, Any]:
    """Why a protocol reply's payload is unusable (then the node counts as dropped), or None and the payload."""
    try:
        payload = decode(text)
    except (ValueError, TypeError) as err:
        return f"not the protocol's JSON ({err})", None
    fields = _REPLY_FIELDS.get(stage, {})
    if not isinstance(payload, dict) or set(payload) != set(fields):
        return f"expected the fields {sorted(fields)}", None
    for name, (kind, values) in fields.items():
        value = payload[name]
        bad_map = (
            values is not None
            and isinstance(value, dict)
            and not all(k.isdigit() and isinstance(v, values) for k, v in value.items())
        )
        if not isinstance(value, kind) or bad_map:
            return f"{name} is not {kind.__name__}{'' if values is None else ' of node id → bytes'}", None
    return None, payload


def _protocol(server_round: int, payload: Mapping[str, Any]) -> tuple[RecordDict, int]:
    text = encode(payload)
    config = ConfigRecord({keys.SERVER_ROUND: server_round})
    return RecordDict({keys.CONFIG: config, keys.SECAGG: ConfigRecord({keys.SECAGG_PAYLOAD: text})}), _payload_bytes(
        text
    )


def secure_train_round(
    grid: Grid,
    strategy: RoundStrategy,
    cfg: RunConfig,
    server_round: int,
    arrays: ArrayRecord,
    config: ConfigRecord,
) -> RoundLog:
    """One secure training round; the strategy aggregates only the unmasked sum."""
    timeout = cfg.aggregation.round_timeout
    secure = cfg.aggregation.secure
    # the strategy samples the nodes and remembers the adapter sent (and the ledger records the dispatch)
    planned = list(strategy.configure_train(server_round, arrays, config, grid))
    nodes = sorted(m.metadata.dst_node_id for m in planned)
    threshold = threshold_for(secure.threshold, len(nodes))
    params = derive_parameters(
        secure.clipping_range,
        secure.precision,
        secure.max_weight,
        len(cfg.regions),
        threshold,
        cfg.aggregation.method == "uniform",
    )
    rejected: dict[int, str] = {}
    up = down = 0

    def survivors(stage: str, exchange: _Exchange, among: list[int]) -> list[int]:
        nonlocal up, down
        up, down = up + exchange.bytes_up, down + exchange.bytes_down
        rejected.update(exchange.failed)
        alive = [n for n in among if n in exchange.ok]
        if len(alive) < threshold:
            raise SecureRoundError(
                f"secure aggregation: {len(alive)} of {len(nodes)} node(s) finished the {stage} stage, the threshold "
                f"is {threshold} (aggregation.secure.threshold); dropped: "
                + "; ".join(f"node {n}: {r}" for n, r in sorted(rejected.items()))
            )
        return alive

    # 1. setup: parameters out, public keys back
    contents, sizes = {}, {}
    for node in nodes:
        contents[node], sizes[node] = _protocol(server_round, {"params": params.to_json()})
    setup = _exchange(grid, keys.SECAGG_SETUP, contents, timeout, sizes)
    u1 = survivors(keys.SECAGG_SETUP, setup, nodes)
    public = {n: (setup.ok[n]["mask_pk"], setup.ok[n]["box_pk"]) for n in u1}
    graph = neighbours(u1, secure.shares, derive_seed(cfg.seed, "secagg-graph", server_round))

    # 2. share keys: each node its neighbours' public keys; encrypted shares back, addressed by neighbour
    contents, sizes = {}, {}
    for node in u1:
        contents[node], sizes[node] = _protocol(
            server_round, {"public_keys": {str(j): list(public[j]) for j in graph[node]}}
        )
    share = _exchange(grid, keys.SECAGG_SHARE, contents, timeout, sizes)
    u2 = survivors(keys.SECAGG_SHARE, share, u1)
    inbox: dict[int, dict[str, bytes]] = {n: {} for n in u2}
    for src in u2:
        for dst, ciphertext in share.ok[src]["ciphertexts"].items():
            if int(dst) in inbox and int(dst) in graph[src]:
                inbox[int(dst)][str(src)] = ciphertext

    # 3. masked input: the round's adapter and task as in a plain round, plus the shares for this node
    contents, sizes = {}, {}
    for node in u2:
        text = encode({"ciphertexts": inbox[node]})
        contents[node] = RecordDict(
            {keys.ARRAYS: arrays, keys.CONFIG: config, keys.SECAGG: ConfigRecord({keys.SECAGG_PAYLOAD: text})}
        )
        sizes[node] = _payload_bytes(text)
    # the adapter's bytes are the strategy's to count (it sent them in configure_train's plan)
    masked = _exchange(grid, keys.SECAGG_MASK, contents, timeout, sizes)
    reference = to_numpy(arrays)
    regions: dict[int, str] = {}
    for node in list(masked.ok):
        problem, region = _masked_problem(masked.ok[node], reference, params, cfg.region_names)
        if problem:
            masked.failed[node] = problem
            del masked.ok[node]
        else:
            regions[node] = region
    u3 = survivors(keys.SECAGG_MASK, masked, u2)
    # a DP node's privacy spent, sent beside its masked upload (plain numbers only: nothing else is recorded)
    metrics = {n: masked.ok[n].metrics.get(keys.METRICS, {}) for n in u3}
    dp = {
        regions[n]: {k: float(v) for k in keys.DP_METRICS if isinstance(v := metrics[n].get(k), int | float)}
        for n in u3
    }
    dropped = [n for n in u2 if n not in u3]

    # 4. unmask: seed shares of the uploaders, mask-key shares of the dropped
    contents, sizes = {}, {}
    for node in u3:
        contents[node], sizes[node] = _protocol(server_round, {"active": u3, "dropped": dropped})
    unmask = _exchange(grid, keys.SECAGG_UNMASK, contents, timeout, sizes)
    u4 = survivors(keys.SECAGG_UNMASK, unmask, u3)
    seed_shares: dict[int, list[bytes]] = {}
    key_shares: dict[int, list[bytes]] = {}
    for node in u4:
        for target, piece in unmask.ok[node]["seed_shares"].items():
            seed_shares.setdefault(int(target), []).append(piece)
        for target, piece in unmask.ok[node]["key_shares"].items():
            key_shares.setdefault(int(target), []).append(piece)

    shapes = [shape for _, shape in layout(reference)]
    vectors = {
        n: [unpack(masked.ok[n].arrays[keys.ARRAYS][name], params.modulus, shape) for name, shape in layout(reference)]
        for n in u3
    }
    total = _unmask(vectors, seed_shares, key_shares, dropped, graph, public, params, shapes)
    names = [name for name, _ in layout(reference)]
    summed = dict(zip(names, total, strict=True))
    weights = summed.pop(WEIGHTS)
    order = {name: i for i, name in enumerate(cfg.region_names)}
    members = sorted(((regions[n], n) for n in u3), key=lambda pair: order[pair[0]])
    result = SecureSum(
        regions=tuple(region for region, _ in members),
        nodes=tuple(node for _, node in members),
        # a dropped node's region is known only from the upload it never made
        dropped=tuple(f"node {n}" for n in dropped),
        total=summed,
        total_weight=int(weights[0]),
        loss_total=int(weights[1]),
        params=params,
        dp={region: spent for region, spent in dp.items() if spent},
    )
    received = [masked.received[n] for n in u2 if n in masked.received]
    rejections = [{"node": str(n), "region": regions.get(n), "reason": r} for n, r in sorted(rejected.items())]
    done = strategy.aggregate_train_sum(server_round, result, received, rejections)
    return dataclasses.replace(done, bytes_up=up, bytes_down=done.bytes_down + down)


def _masked_problem(
    got: ReceivedReply, reference: Mapping[str, np.ndarray], params: SecAggParams, region_names: tuple[str, ...]
) -> tuple[str | None, str]:
    """Why a masked upload cannot go into the sum (it is then treated as dropped), and the region it names."""
    metrics = got.metrics.get(keys.METRICS, {})
    index = int(metrics.get(keys.REGION_INDEX, -1))
    if not 0 <= index < len(region_names):
        return f"bad {keys.REGION_INDEX} {index}", ""
    upload = got.arrays.get(keys.ARRAYS)
    if upload is None:
        return f"no {keys.ARRAYS!r} ArrayRecord", region_names[index]
    expected = dict(layout(reference))
    if set(upload) != set(expected):
        return "masked tensor names differ from the adapter's", region_names[index]
    for name, shape in expected.items():
        if upload[name].dtype != np.uint8 or upload[name].shape != (packed_size(int(np.prod(shape)), params.modulus),):
            return f"{name}: not {list(shape)} packed masked values", region_names[index]
    return None, region_names[index]


def _unmask(
    vectors: Mapping[int, list[np.ndarray]],
    seed_shares: Mapping[int, list[bytes]],
    key_shares: Mapping[int, list[bytes]],
    dropped: list[int],
    graph: Mapping[int, list[int]],
    public: Mapping[int, tuple[bytes, bytes]],
    params: SecAggParams,
    shapes: list[tuple[int, ...]],
) -> list[np.ndarray]:
    """Σ of the uploads with every mask removed: each uploader's private mask (its seed rebuilt from shares) and
    each dropped node's pairwise masks with the uploaders (its mask key rebuilt from shares)."""
    m = params.modulus
    total = [np.zeros(s, dtype=np.int64) for s in shapes]
    for vector in vectors.values():
        total = add_mod(total, vector, m)
    for node in vectors:
        pieces = seed_shares.get(node, [])
        if len(pieces) < params.threshold:
            raise SecureRoundError(
                f"secure aggregation: {len(pieces)} share(s) of node {node}'s mask seed came back, the threshold is "
                f"{params.threshold}"
            )
        total = add_mod(total, mask(combine_shares(pieces), m, shapes), m, -1)
    for gone in dropped:
        pieces = key_shares.get(gone, [])
        if len(pieces) < params.threshold:
            raise SecureRoundError(
                f"secure aggregation: {len(pieces)} share(s) of dropped node {gone}'s mask key came back, the "
                f"threshold is {params.threshold}"
            )
        key = combine_shares(pieces)
        for peer in graph[gone]:
            if peer == gone or peer not in vectors:
                continue
            pairwise = mask(pair_seed(key, public[peer][0]), m, shapes)
            # the peer added the mask when its id is the larger, subtracted it otherwise: undo that
            total = add_mod(total, pairwise, m, -1 if peer > gone else 1)
    return total
