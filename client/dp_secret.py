"""The node's DP secret: the one source of DP-SGD's randomness (Poisson sampling and Gaussian noise).

DP-SGD protects a record only if nobody outside the node can reproduce the noise it adds or the batches it
samples: anyone who can regenerate the noise subtracts it, and the (epsilon, delta) guarantee is void against
exactly that party. The server sends every node the run's seed, so nothing derived from the run config may seed
them. Instead every node keeps 32 random bytes from the operating system's CSPRNG (``secrets.token_bytes``) in
its audit dir (``DP_SECRET_FILE``, beside the privacy accountant), made on first use with mode 0600 and never
replaced; every training under DP-SGD seeds its sampling and its noise from HMAC-SHA256 of that secret over the
round, the region, the purpose and a digest of everything the training depends on (the received adapter, the
task's settings, the training data, the noise multiplier, clip, sampling rate and steps). So:

- the server, knowing everything but the secret, cannot compute either seed;
- a round trained again on exactly the same inputs (a retry, a resumed run) draws exactly the same noise and
  sends exactly the same update, which tells nobody anything new;
- a round trained again on anything different (another global adapter, another learning rate, another noise
  multiplier, changed data) draws independent noise: reusing it would let two updates cancel the noise (their
  difference, or two equations in the same noise).

A simulation derives each simulated node's secret from the run's seed and the region (``simulated_secret``):
reproducible runs, and in a simulation the "server" is the same process anyway. A deployed node never does.

``DpSecret`` is validated once and then only derives seeds; the randomness is a parameter (``NodeSettings.
dp_secret``, tests pass their own).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from common.policy import PolicyError
from common.runfiles import DP_SECRET_FILE

SECRET_BYTES = 32
# domain separation: these seeds are for DP-SGD of fedlocale, format 1
_LABEL = b"fedlocale/dp-sgd-seed/v1\x00"
_SIMULATED_LABEL = b"fedlocale/simulated-dp-secret/v1\x00"


class DpSecretError(PolicyError):
    """The node's DP secret cannot be read or made: the node must not train under DP-SGD (the message names the
    file)."""


class DpSecret:
    """32 secret bytes and the seeds derived from them. The bytes are never shown (``repr``)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != SECRET_BYTES:
            size = len(key) if isinstance(key, bytes) else type(key).__name__
            raise ValueError(f"a DP secret is {SECRET_BYTES} bytes, got {size}")
        self._key = key

    def __repr__(self) -> str:
        return "DpSecret(<hidden>)"

    @classmethod
    def generate(cls) -> DpSecret:
        """A fresh secret from the operating system's CSPRNG."""
        return cls(secrets.token_bytes(SECRET_BYTES))

    def seed(self, server_round: int, region: str, purpose: str, inputs: bytes) -> int:
        """The 64-bit seed of one use of randomness: HMAC-SHA256 of the secret over the round, the region,
        ``purpose`` and ``inputs``, the digest of everything the training depends on (``inputs_digest``).

        The run key is not among them: it is drawn at random for every run, so a simulation (whose secret comes
        from the seed) would not reproduce. Runs are told apart by their inputs instead, and two trainings whose
        inputs are all the same send the same update, which tells nobody anything new."""
        fields = json.dumps([int(server_round), region, purpose, inputs.hex()], separators=(",", ":"))
        digest = hmac.new(self._key, _LABEL + fields.encode(), hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big")


def simulated_secret(run_seed: int, region: str) -> bytes:
    """A simulated node's secret, derived from the run's seed and its region: SIMULATION ONLY (anyone with the
    run config can compute it; in a simulation the server is the same process as the nodes anyway)."""
    message = json.dumps([int(run_seed), region], separators=(",", ":")).encode()
    return hashlib.sha256(_SIMULATED_LABEL + message).digest()


def inputs_digest(state: Mapping[str, torch.Tensor], *parts: str) -> bytes:
    """SHA-256 of what a DP-SGD training depends on: the adapter it starts from (``state``: every tensor's
    name, dtype, shape and bytes) and ``parts``, texts such as the task's settings and the training data."""
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    for part in parts:
        data = part.encode()
        h.update(len(data).to_bytes(8, "big") + data)  # length-prefixed: parts cannot run into each other
    return h.digest()


def node_secret(folder: Path) -> DpSecret:
    """The node's secret in ``folder/DP_SECRET_FILE``, made on first use (mode 0600, written atomically, never
    replaced: a second process of the node that races to make it reads the first one's). ``DpSecretError``
    when the file cannot be read, is not exactly a secret, or cannot be made."""
    path = folder / DP_SECRET_FILE
    if not path.exists():
        try:
            _create(path)
        except OSError as err:
            raise DpSecretError(f"{path}: the node's DP secret cannot be made ({err}); nothing is trained") from err
    try:
        key = path.read_bytes()
    except OSError as err:
        raise DpSecretError(f"{path}: the node's DP secret is unreadable ({err}); nothing is trained") from err
    if len(key) != SECRET_BYTES:
        raise DpSecretError(
            f"{path}: the node's DP secret is damaged ({len(key)} bytes, not {SECRET_BYTES}); nothing is trained. "
            "Restore it from the node's backup; deleting it makes a new secret, which is safe but means a round "
            "trained again draws new noise"
        )
    return DpSecret(key)


def _create(path: Path) -> None:
    """Write a fresh secret to ``path`` unless it exists: a 0600 temporary sibling (mkstemp), synced, then
    hard-linked into place, which fails rather than replace a secret another process made meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(SECRET_BYTES))
            out.flush()
            os.fsync(out.fileno())
        # FileExistsError: another process of this node made it first, and that one is the secret
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)


def resolve_secret(given: bytes | None, folder: Path) -> DpSecret:
    """The secret a node trains with: ``given`` (a simulation's, a test's) or else its own file in ``folder``."""
    if given is not None:
        return DpSecret(given)
    return node_secret(folder)
