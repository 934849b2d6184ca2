"""Secure aggregation (SecAgg+) pieces that the server and the nodes share: the quantization and modulus
parameters, the layout of a masked vector, the masks, and the codec of the protocol's payloads.

The cryptography is Flower's (``flwr.common.secure_aggregation``: ECDH key agreement + HKDF, Fernet, Shamir
secret sharing over pycryptodome, the seeded mask generator) and ``cryptography``'s; nothing here invents a
primitive. The protocol stages live in ``client.secagg`` (node) and ``server.secagg`` (server).

Exact example weighting: a node masks w_r = n_r (or 1 with ``aggregation.method: uniform``) and w_r·q(θ_r), with
q Flower's quantizer into [0, T] over [-B, B] (B = ``clipping_range``); the server unmasks the sums and divides,
so the mean is Σ w_r q(θ_r) / Σ w_r mapped back to [-B, B]: exactly the weighted mean of the quantized values,
within one quantization step 2B/T of the plain weighted mean.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

MASKED_DTYPE = "uint8"  # masked values travel bit-packed: log2(M) bits each (``pack``)
WEIGHTS = "secagg.weights"  # the masked [w, w·q(loss)] beside the adapter's tensors in a masked upload
LOSS_RANGE = 1000.0  # the train loss is quantized over [-LOSS_RANGE, LOSS_RANGE]
MAX_TARGET_BITS = 30  # Flower's quantizer rounds into int32
# masks are added in int64 and reduced after every addition: two values below 2**62 never overflow
MAX_MODULUS_BITS = 62


def target_bits(clipping_range: float, precision: float) -> int:
    """Bits of the quantization range T: the smallest power of two whose step 2B/T is at most ``precision``."""
    return max(1, math.ceil(math.log2(2 * clipping_range / precision)))


def modulus_bits(bits_target: int, max_weight: int, regions: int) -> int:
    """Bits of the modulus M: the sum Σ w_r q_r ≤ regions · max_weight · T must fit below M."""
    return math.ceil(math.log2(regions * max_weight * (2**bits_target) + 1))


def secagg_parameter_problem(clipping_range: float, precision: float, max_weight: int, regions: int) -> str | None:
    """Why these settings give no usable quantization (the range or the modulus too large), or None."""
    if not (math.isfinite(clipping_range) and clipping_range > 0 and math.isfinite(precision) and precision > 0):
        return None  # the fields' own checks report these
    bits = target_bits(clipping_range, precision)
    if bits > MAX_TARGET_BITS:
        return (
            f"clipping_range {clipping_range} / precision {precision} needs a {bits}-bit quantization range, at "
            f"most {MAX_TARGET_BITS} bits: raise precision or lower clipping_range"
        )
    mod = modulus_bits(bits, max(max_weight, 1), regions)
    if mod > MAX_MODULUS_BITS:
        return (
            f"{regions} regions of up to max_weight {max_weight} examples at {bits}-bit quantization need a "
            f"{mod}-bit modulus, at most {MAX_MODULUS_BITS}: lower max_weight or raise precision"
        )
    return None


@dataclass(frozen=True)
class SecAggParams:
    """What every node of a secure round is told in the setup stage (and the server uses to unmask)."""

    target_range: int  # T: values are quantized into [0, T]
    modulus: int  # M: every masked value lives in [0, M)
    clipping_range: float  # B: a node whose adapter holds |θ| > B refuses
    max_weight: int  # a node whose weight exceeds it refuses (the modulus is sized for it)
    threshold: int  # shares needed to rebuild a secret; the fewest nodes that must finish the round
    uniform: bool  # weigh every region 1 (aggregation.method uniform) instead of its example count

    def __post_init__(self) -> None:
        if self.modulus > 2**MAX_MODULUS_BITS or self.target_range > 2**MAX_TARGET_BITS or self.threshold < 2:
            raise ValueError(f"unusable secure aggregation parameters {self}")

    def to_json(self) -> str:
        """Serialise for a ConfigRecord."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SecAggParams:
        """Parse what ``to_json`` wrote."""
        return cls(**json.loads(text))

    @property
    def step(self) -> float:
        """The quantization step 2B/T: the largest error of one quantized value."""
        return 2 * self.clipping_range / self.target_range


def derive_parameters(
    clipping_range: float, precision: float, max_weight: int, regions: int, threshold: int, uniform: bool
) -> SecAggParams:
    """The quantization range and modulus for these settings (``secagg_parameter_problem`` must be None)."""
    bits = target_bits(clipping_range, precision)
    return SecAggParams(
        target_range=2**bits,
        modulus=2 ** modulus_bits(bits, 1 if uniform else max_weight, regions),
        clipping_range=clipping_range,
        max_weight=max_weight,
        threshold=threshold,
        uniform=uniform,
    )


def packed_size(count: int, modulus: int) -> int:
    """Bytes of ``count`` masked values packed by ``pack``: log2(M) bits each."""
    return -(-count * (modulus.bit_length() - 1) // 8)


def pack(values: np.ndarray, modulus: int) -> np.ndarray:
    """Values in [0, M) (M a power of two) as their log2(M) low bits, concatenated, in uint8: a masked value is
    uniform over exactly those bits, so nothing smaller can carry it (int64 would send 64)."""
    bits = modulus.bit_length() - 1
    flat = np.ascontiguousarray(np.asarray(values).reshape(-1), dtype=">u8")
    return np.packbits(np.unpackbits(flat.view(np.uint8).reshape(-1, 8), axis=1)[:, 64 - bits :].reshape(-1))


def unpack(packed: np.ndarray, modulus: int, shape: tuple[int, ...]) -> np.ndarray:
    """What ``pack`` packed, as int64 of ``shape``; a ValueError when the byte count does not match."""
    count = int(np.prod(shape, dtype=np.int64))
    bits = modulus.bit_length() - 1
    if packed.dtype != np.uint8 or packed.shape != (packed_size(count, modulus),):
        raise ValueError(f"{packed.dtype}{list(packed.shape)} is not {count} packed {bits}-bit values")
    full = np.zeros((count, 64), dtype=np.uint8)
    full[:, 64 - bits :] = np.unpackbits(packed)[: count * bits].reshape(count, bits)
    return np.packbits(full, axis=1).view(">u8").reshape(shape).astype(np.int64)


def layout(arrays: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """The masked vector's tensors in the order both sides generate masks for them: by name, then WEIGHTS."""
    return [(name, tuple(np.shape(arrays[name]))) for name in sorted(arrays) if name != WEIGHTS] + [(WEIGHTS, (2,))]


def mask(seed: bytes, modulus: int, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """The pseudo-random mask of ``seed`` (Flower's generator) in [0, modulus), one int64 array per shape."""
    return pseudo_rand_gen(seed, modulus, list(shapes))


def pair_seed(private_key: bytes, public_key: bytes) -> bytes:
    """The seed two nodes share (ECDH + HKDF, Flower's ``generate_shared_key``): either side computes it."""
    return generate_shared_key(bytes_to_private_key(private_key), bytes_to_public_key(public_key))


def add_mod(a: Sequence[np.ndarray], b: Sequence[np.ndarray], modulus: int, sign: int = 1) -> list[np.ndarray]:
    """(a ± b) mod M, per array; both hold values in [0, M)."""
    return [np.mod(x + sign * y, modulus) for x, y in zip(a, b, strict=True)]


def neighbours(nodes: Sequence[int], shares: int | None, seed: int) -> dict[int, list[int]]:
    """Each node's neighbourhood (itself included): every node, or ``shares`` nodes around it on a seeded ring
    (SecAgg+'s sparse graph: a node exchanges masks and secret shares only with its neighbours)."""
    ordered = sorted(nodes)
    if shares is None or shares >= len(ordered):
        return {n: list(ordered) for n in ordered}
    random.Random(seed).shuffle(ordered)
    half, size = shares // 2, len(ordered)
    return {ordered[i]: sorted(ordered[(i + k) % size] for k in range(-half, half + 1)) for i in range(size)}


def encode(payload: Mapping[str, Any]) -> str:
    """A protocol payload (bytes anywhere inside, node ids as keys) as JSON text for a ConfigRecord."""
    return json.dumps(_to_plain(payload), sort_keys=True)


def decode(text: str) -> Any:
    """What ``encode`` wrote."""
    return _from_plain(json.loads(text))


def _to_plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    return value


def _from_plain(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            return base64.b64decode(value["b64"])
        return {k: _from_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_plain(v) for v in value]
    return value
