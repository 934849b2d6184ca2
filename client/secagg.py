"""The node's side of secure aggregation (SecAgg+), one pure function per protocol stage.

What a node keeps between stages (its two private keys, its private mask seed, the shares it received) is a
``NodeSecrets`` kept in the node's Flower ``Context.state`` (``client.app``); it never leaves the node except as
the secret shares the protocol sends, encrypted, to its neighbours. The stages follow Flower's legacy
``secaggplus_mod`` (setup → share keys → masked input → unmask) on Message API messages.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import generate_key_pairs, private_key_to_bytes, public_key_to_bytes

from common.secagg import LOSS_RANGE, SecAggParams, add_mod, decode, encode, layout, mask, pack, pair_seed


class SecAggRefusal(ValueError):
    """The node will not take part in this stage (a value outside the agreed range, a server asking for too
    much); the reason is recorded in its ledger and sent to the server instead of any data."""


@dataclass
class NodeSecrets:
    """What one node keeps between the stages of one secure round."""

    round: int
    params: SecAggParams
    mask_key: bytes  # private key whose ECDH with a neighbour seeds their pairwise mask (shared to survive a drop)
    box_key: bytes  # private key that encrypts the shares sent to each neighbour
    seed: bytes = b""  # the private mask's seed (shared so that the server can remove it once the node uploads)
    neighbours: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # node → (mask, box) public keys
    shares: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # node → (seed share, mask-key share)

    def to_json(self) -> str:
        """For the node's context state."""
        return encode(
            {
                "round": self.round,
                "params": self.params.to_json(),
                "mask_key": self.mask_key,
                "box_key": self.box_key,
                "seed": self.seed,
                "neighbours": {str(k): list(v) for k, v in self.neighbours.items()},
                "shares": {str(k): list(v) for k, v in self.shares.items()},
            }
        )

    @classmethod
    def from_json(cls, text: str) -> NodeSecrets:
        """What ``to_json`` wrote."""
        raw = decode(text)
        return cls(
            round=int(raw["round"]),
            params=SecAggParams.from_json(raw["params"]),
            mask_key=raw["mask_key"],
            box_key=raw["box_key"],
            seed=raw["seed"],
            neighbours={int(k): (v[0], v[1]) for k, v in raw["neighbours"].items()},
            shares={int(k): (v[0], v[1]) for k, v in raw["shares"].items()},
        )


def setup(server_round: int, params: SecAggParams) -> tuple[NodeSecrets, dict[str, Any]]:
    """Stage 1: two fresh key pairs; the public halves go to the server."""
    mask_sk, mask_pk = generate_key_pairs()
    box_sk, box_pk = generate_key_pairs()
    secrets = NodeSecrets(server_round, params, private_key_to_bytes(mask_sk), private_key_to_bytes(box_sk))
    return secrets, {"mask_pk": public_key_to_bytes(mask_pk), "box_pk": public_key_to_bytes(box_pk)}


def share_keys(secrets: NodeSecrets, me: int, public_keys: Mapping[int, tuple[bytes, bytes]]) -> dict[str, Any]:
    """Stage 2: split the private mask seed and the mask key into one Shamir share per neighbour (threshold t),
    encrypt each for its neighbour; the server only routes the ciphertexts."""
    threshold = secrets.params.threshold
    if me not in public_keys or len(public_keys) < threshold:
        among = "among" if me in public_keys else "not among"
        raise SecAggRefusal(
            f"the server named {len(public_keys)} neighbour(s) (this node {among} them) for a threshold of {threshold}"
        )
    secrets.neighbours = dict(public_keys)
    secrets.seed = os.urandom(32)
    order = sorted(public_keys)
    seed_shares = create_shares(secrets.seed, threshold, len(order))
    key_shares = create_shares(secrets.mask_key, threshold, len(order))
    out: dict[str, bytes] = {}
    for node, seed_share, key_share in zip(order, seed_shares, key_shares, strict=True):
        if node == me:
            secrets.shares[me] = (seed_share, key_share)
            continue
        box = pair_seed(secrets.box_key, public_keys[node][1])
        out[str(node)] = encrypt(box, share_keys_plaintext_concat(me, node, seed_share, key_share))
    return {"ciphertexts": out}


def quantize_seeded(arrays: list[np.ndarray], clipping_range: float, target_range: int, seed: int) -> list[np.ndarray]:
    """Flower's stochastic quantizer, made reproducible: it draws from numpy's global generator, which is seeded
    for the call and restored afterwards."""
    saved = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        return [np.asarray(q, dtype=np.int64) for q in quantize(arrays, clipping_range, target_range)]
    finally:
        np.random.set_state(saved)


def masked_input(
    secrets: NodeSecrets,
    me: int,
    ciphertexts: Mapping[int, bytes],
    update: Mapping[str, np.ndarray],
    weight: int,
    loss: float,
    seed: int,
) -> dict[str, np.ndarray]:
    """Stage 3: keep the shares the neighbours sent; upload w·q(θ) and [w, w·q(loss)], masked and bit-packed.

    Refuses (``SecAggRefusal``) rather than corrupt the sum when a value lies outside the agreed range.
    """
    params = secrets.params
    biggest = max((float(np.max(np.abs(a))) for a in update.values() if np.size(a)), default=0.0)
    if not math.isfinite(biggest) or biggest > params.clipping_range:
        raise SecAggRefusal(
            f"an adapter value of magnitude {biggest:.6g} lies outside aggregation.secure.clipping_range "
            f"{params.clipping_range:g}; masking it would corrupt the sum"
        )
    if not 0 < weight <= params.max_weight:
        raise SecAggRefusal(f"weight {weight} lies outside (0, aggregation.secure.max_weight {params.max_weight}]")
    if not math.isfinite(loss) or abs(loss) > LOSS_RANGE:
        raise SecAggRefusal(f"train loss {loss} lies outside [-{LOSS_RANGE:g}, {LOSS_RANGE:g}]")
    for node, ciphertext in ciphertexts.items():
        if node not in secrets.neighbours or node == me:
            raise SecAggRefusal(f"a share from node {node}, which is not a neighbour")
        box = pair_seed(secrets.box_key, secrets.neighbours[node][1])
        src, dst, seed_share, key_share = share_keys_plaintext_separate(decrypt(box, ciphertext))
        if (src, dst) != (node, me):
            raise SecAggRefusal(f"a share addressed from {src} to {dst} arrived from {node} for {me}")
        secrets.shares[node] = (seed_share, key_share)
    names = layout(update)
    tensors = [np.asarray(update[name], dtype=np.float64) for name, _ in names[:-1]]
    quantized = quantize_seeded(tensors, params.clipping_range, params.target_range, seed)
    # the loss has its own range: a cross-entropy is no adapter value
    loss_q = quantize_seeded([np.array([loss])], LOSS_RANGE, params.target_range, seed + 1)[0]
    vector = [q * weight for q in quantized] + [np.array([weight, weight * int(loss_q[0])], dtype=np.int64)]
    shapes = [shape for _, shape in names]
    vector = add_mod(vector, mask(secrets.seed, params.modulus, shapes), params.modulus)
    # pairwise masks only with the neighbours whose shares arrived: the server can rebuild those if they drop
    for node in sorted(secrets.shares):
        if node == me:
            continue
        pairwise = mask(pair_seed(secrets.mask_key, secrets.neighbours[node][0]), params.modulus, shapes)
        vector = add_mod(vector, pairwise, params.modulus, 1 if me > node else -1)
    return {name: pack(arr, params.modulus) for (name, _), arr in zip(names, vector, strict=True)}


def unmask(secrets: NodeSecrets, me: int, active: list[int], dropped: list[int]) -> dict[str, Any]:
    """Stage 4: the seed share of every active neighbour and the mask-key share of every dropped one — never
    both of one node (that would unmask its upload)."""
    if set(active) & set(dropped):
        raise SecAggRefusal(f"the server asked for both shares of nodes {sorted(set(active) & set(dropped))}")
    if me not in active:
        raise SecAggRefusal("the server lists this node as dropped, yet asks it to unmask")
    if len(active) < secrets.params.threshold:
        raise SecAggRefusal(f"{len(active)} active node(s), below the threshold {secrets.params.threshold}")
    seeds = {str(n): secrets.shares[n][0] for n in active if n in secrets.shares}
    keys = {str(n): secrets.shares[n][1] for n in dropped if n in secrets.shares}
    return {"seed_shares": seeds, "key_shares": keys}
