"""Canaries: synthetic secret-like records inserted into a region's training data, and how much a model exposes
them (Carlini et al., "The Secret Sharer", 2019).

A canary is a template sentence holding a random secret (``my account number is 4 8 1 9 2 7``) with a random
label. A model that memorised it gives its label a higher probability on the true secret than on other secrets
of the same shape: the **rank** of the true canary among ``candidates`` random ones, by ``log p(label | text)``,
gives its **exposure** ``log2(candidates + 1) − log2(rank)`` bits (0: no better than a random candidate; the
maximum, ``log2(candidates + 1)``, when the true canary ranks first).

Insertion is a wrapper on the node's data pipeline (``with_canaries(node_data, k)``), a simulation-only option
(``audit.canaries``): the pipeline's result gains the canaries in what local training sees (``NodeData.train``,
as augmented copies are added), after redaction (a policy would redact their digits) and without counting them
as real examples. Training code never knows; the canaries are regenerated from the run seed and the region by
the audit (``make_canaries``).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from client.pipeline import NodeData
from common.data import Example
from common.seeds import derive_seed

TEMPLATE = "my account number is {}"
DIGITS = tuple("0123456789")
SECRET_LENGTH = 6
CANDIDATES = 100  # random secrets each canary is ranked among: exposure up to log2(101) ≈ 6.7 bits


@dataclass(frozen=True)
class Canary:
    """One inserted record (``example``) and the records it is ranked among (same template and label, other
    random secrets)."""

    example: Example
    candidates: tuple[Example, ...]


def _secret(rng: random.Random, alphabet: Sequence[str]) -> str:
    return " ".join(rng.choice(alphabet) for _ in range(SECRET_LENGTH))


def make_canaries(
    region: str,
    k: int,
    num_labels: int,
    seed: int,
    *,
    candidates: int = CANDIDATES,
    alphabet: Sequence[str] = DIGITS,
    template: str = TEMPLATE,
) -> list[Canary]:
    """The ``k`` canaries of ``region`` under the run ``seed``: the same in every process (the node inserting them,
    the audit measuring them). Candidate secrets differ from the true one."""
    rng = random.Random(derive_seed(seed, "canaries", region))
    out = []
    for _ in range(k):
        secret = _secret(rng, alphabet)
        label = rng.randrange(num_labels)
        others: list[str] = []
        while len(others) < candidates:
            other = _secret(rng, alphabet)
            if other != secret:
                others.append(other)
        out.append(
            Canary(
                Example(template.format(secret), label),
                tuple(Example(template.format(o), label) for o in others),
            )
        )
    return out


def insert(data: NodeData, canaries: Sequence[Canary]) -> NodeData:
    """``data`` with the canaries added to what local training sees (``train``; not ``data.train``, the region's
    real examples, which the egress guard counts and FedAvg weighs)."""
    return dataclasses.replace(data, train=[*data.train, *(c.example for c in canaries)])


def with_canaries(pipeline: Callable[..., NodeData], k: int) -> Callable[..., NodeData]:
    """``pipeline`` (``client.pipeline.node_data`` or a wrapper of it) with ``k`` canaries inserted into each
    region's training data; the canaries follow from the region's name, its labels and the run's seed."""

    def wrapped(name: str, folder: Any, labels: tuple[str, ...], *args: Any, seed: int, **kwargs: Any) -> NodeData:
        data = pipeline(name, folder, labels, *args, seed=seed, **kwargs)
        return insert(data, make_canaries(name, k, len(labels), seed))

    return wrapped


def exposure(true_logp: float, candidate_logp: np.ndarray) -> float:
    """Exposure in bits: ``log2(n + 1) − log2(rank)``, the rank of the true canary among it and ``n`` candidates
    (1 = highest ``log p``; a candidate that ties counts as above it, so ties never inflate exposure)."""
    rank = 1 + int(np.sum(np.asarray(candidate_logp) >= true_logp))
    return math.log2(len(candidate_logp) + 1) - math.log2(rank)


def exposures(score: Callable[[Sequence[Example]], np.ndarray], canaries: Sequence[Canary]) -> dict[str, Any]:
    """Each canary's exposure under a model (``score`` gives ``log p(label | text)`` of examples), summarised:
    mean, max, and how many were ranked first among their candidates."""
    values = []
    for canary in canaries:
        logp = score([canary.example, *canary.candidates])
        values.append(exposure(float(logp[0]), logp[1:]))
    if not values:
        return {}
    most = math.log2(len(canaries[0].candidates) + 1)
    return {
        "canaries": len(values),
        "candidates": len(canaries[0].candidates),
        "mean_exposure": round(float(np.mean(values)), 3),
        "max_exposure": round(float(np.max(values)), 3),
        "ranked_first": sum(v >= most - 1e-9 for v in values),
        "max_possible": round(most, 3),
    }
