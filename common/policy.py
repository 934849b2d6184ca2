"""A region's residency policy and the egress check every outbound reply passes.

The policy file lives on the node (``configs/policies/<region>.yaml``); nothing the server sends can change
it. ``egress_problems`` is the whole rule set as one pure function over a description of the reply; the
ClientApp's guard (``client/guard.py``) calls it and refuses to send when it returns anything.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import keys
from common.audit import canonical_json
from common.config import load_yaml, region_name_problem
from common.errors import InputError, check
from common.pii import PII_TYPES, CustomPattern, PiiRules
from common.secagg import MASKED_DTYPE, WEIGHTS

DEFAULT_TENSORS = ("*.lora_A.weight", "*.lora_B.weight", "*classifier*")
DEFAULT_METRICS = keys.REPLY_METRICS  # by default every metric a reply carries may leave
_FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class EgressRules:
    """What may leave the node in one reply."""

    tensors: tuple[str, ...] = DEFAULT_TENSORS  # shell-style patterns a tensor name must match (at least one)
    dtypes: tuple[str, ...] = ("float32",)
    max_bytes: int = 4_000_000  # tensor bytes + metrics of one reply
    metrics: tuple[str, ...] = DEFAULT_METRICS

    def __post_init__(self) -> None:
        problems = []
        if self.max_bytes < 1:
            problems.append(("max_bytes", f"must be >= 1, got {self.max_bytes}"))
        for i, pattern in enumerate(self.tensors):
            if not pattern.strip():
                problems.append((f"tensors[{i}]", "must not be empty"))
        for i, name in enumerate(self.dtypes):
            try:
                np.dtype(name)
            except TypeError:
                problems.append((f"dtypes[{i}]", f"unknown dtype {name!r}"))
        for i, name in enumerate(self.metrics):
            # the run folder (metrics.jsonl, summary.json) spells metrics with "_", replies with "-"; a policy
            # naming the file spelling would stop every reply carrying the metric, so it is refused up front
            wire = name.replace("_", "-")
            if name not in keys.REPLY_METRICS and wire in keys.REPLY_METRICS:
                problems.append(
                    (f"metrics[{i}]", f"{name!r} is the run folder's spelling; a reply carries it as {wire!r}")
                )
        if keys.NUM_EXAMPLES not in self.metrics:
            # the server cannot weigh a reply without it: a policy that forbids it forbids taking part
            problems.append(("metrics", f"must allow {keys.NUM_EXAMPLES!r}, got {list(self.metrics)}"))
        check(problems)


@dataclass(frozen=True)
class PiiSettings:
    """Which personal data is replaced by type tokens before training (see ``common.pii``)."""

    types: tuple[str, ...] = PII_TYPES
    custom: tuple[CustomPattern, ...] = ()

    def __post_init__(self) -> None:
        PiiRules(types=self.types, custom=self.custom)  # its ConfigError names these same fields

    def rules(self) -> PiiRules:
        """The redaction rules."""
        return PiiRules(types=self.types, custom=self.custom)


@dataclass(frozen=True)
class DpRequirement:
    """The record-level differential privacy this region's training data must get in a run: the node trains with
    DP-SGD (``client.dp``) calibrated to this budget, and the guard refuses any reply whose spent privacy
    exceeds it."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        problems = []
        if not self.epsilon > 0:
            problems.append(("epsilon", f"must be > 0, got {self.epsilon}"))
        if not 0 < self.delta < 1:
            problems.append(("delta", f"must be in (0, 1), got {self.delta}"))
        check(problems)


@dataclass(frozen=True)
class RegionPolicy:
    """The rules of one region, enforced on its node."""

    region: str
    egress: EgressRules = field(default_factory=EgressRules)
    min_train_examples: int = 1  # below this, nothing leaves the node (not even evaluation metrics)
    server_fingerprint: str | None = None  # "sha256:<hex>" of the SuperLink certificate the node may talk to
    pii: PiiSettings = field(default_factory=PiiSettings)
    require_dp: DpRequirement | None = None
    require_secure_aggregation: bool = False

    def __post_init__(self) -> None:
        problems = []
        name_problem = region_name_problem(self.region)
        if name_problem:
            problems.append(("region", name_problem))
        if self.min_train_examples < 1:
            problems.append(("min_train_examples", f"must be >= 1, got {self.min_train_examples}"))
        if self.server_fingerprint is not None and not _FINGERPRINT_RE.match(self.server_fingerprint):
            problems.append(
                (
                    "server_fingerprint",
                    f"must be 'sha256:' and 64 lower-case hex digits, got {self.server_fingerprint!r}",
                )
            )
        check(problems)

    def digest(self) -> str:
        """SHA-256 of the policy's content (not of its file: comments and layout do not change it)."""
        return hashlib.sha256(canonical_json(dataclasses.asdict(self))).hexdigest()


def load_policy(path: Path) -> RegionPolicy:
    """Read a policy file; every problem is reported together, each with ``file:line``."""
    return load_yaml(path, RegionPolicy)


# -------------------------------------------------------------------------------------------------- egress


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a reply, as the guard sees it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


@dataclass(frozen=True)
class DpRecord:
    """The differential privacy a node's DP-SGD has given its region's training data in this run so far
    (``client.dp``): what its ledger records and the guard checks against ``require_dp``."""

    epsilon_spent: float
    delta: float
    noise_multiplier: float  # sigma: the noise per step is N(0, (sigma * clip)^2) per coordinate
    clip: float  # C: the L2 norm every training example's gradient is clipped to
    sample_rate: float  # q: each example's chance to be in a step's batch (Poisson sampling)
    steps: int  # DP-SGD steps taken in this run
    accountant: str  # Opacus accountant that computed epsilon_spent ("rdp" or "prv")

    def to_json(self) -> dict[str, float | int | str]:
        """Plain data, as the ledger records it."""
        return dataclasses.asdict(self)

    def metrics(self) -> dict[str, float]:
        """What a reply's metrics carry of it (plain and masked train replies, evaluate replies): epsilon and
        delta, computed from the run's public settings and step counts, never from the data."""
        return {keys.DP_EPSILON: self.epsilon_spent, keys.DP_DELTA: self.delta}


@dataclass(frozen=True)
class Protections:
    """What the run applied to this reply before it left (differential privacy, secure aggregation)."""

    dp: DpRecord | None = None  # the privacy spent so far, when the node trained with DP-SGD
    secure_aggregation: bool = False


@dataclass(frozen=True)
class Outbound:
    """A reply about to leave the node, described for the policy check."""

    message: str  # "train" or "evaluate"
    region: str
    tensors: tuple[TensorInfo, ...]
    metrics: Mapping[str, int | float]
    train_examples: int  # the region's training examples after cleaning and redaction
    protections: Protections = Protections()
    config_records: tuple[str, ...] = ()  # a reply has no reason to carry any: a side channel without rules

    @property
    def nbytes(self) -> int:
        """Tensor bytes plus the metrics' encoded size."""
        return sum(t.nbytes for t in self.tensors) + len(canonical_json(_finite(self.metrics)))


def _finite(metrics: Mapping[str, int | float]) -> dict[str, int | float | None]:
    return {k: (v if isinstance(v, int) or math.isfinite(v) else None) for k, v in metrics.items()}


def egress_problems(policy: RegionPolicy, out: Outbound) -> list[str]:
    """Every way ``out`` breaks ``policy``; empty when it may leave."""
    return [problem for _, problem in egress_violations(policy, out)]


def egress_violations(policy: RegionPolicy, out: Outbound) -> list[tuple[str, str]]:
    """Every way ``out`` breaks ``policy``, each as ``(the policy field that forbids it, why)``; the field lets
    ``fedlocale check`` name the line of the policy file that would refuse every reply (field "" for what no
    policy setting allows: a config record)."""
    rules = policy.egress
    problems = []
    if out.region != policy.region:
        problems.append(("region", f"the policy is for region {policy.region!r}, this node serves {out.region!r}"))
    if out.train_examples < policy.min_train_examples:
        problems.append(
            (
                "min_train_examples",
                f"{out.train_examples} training examples, the policy needs at least {policy.min_train_examples}",
            )
        )
    masked = out.protections.secure_aggregation
    for tensor in out.tensors:
        if masked and (tensor.name == WEIGHTS or tensor.dtype == MASKED_DTYPE) and _masked_allowed(tensor, rules):
            # secure aggregation's masked values: uniform in [0, modulus) to anyone without the other nodes' masks
            continue
        if not any(fnmatch.fnmatchcase(tensor.name, p) for p in rules.tensors):
            problems.append(("egress.tensors", f"tensor {tensor.name!r} is not allowed to leave"))
        elif tensor.dtype not in rules.dtypes:
            problems.append(
                (
                    "egress.dtypes",
                    f"tensor {tensor.name!r} has dtype {tensor.dtype}, allowed: {', '.join(rules.dtypes)}",
                )
            )
    for name in out.config_records:
        problems.append(("", f"config record {name!r} is not allowed to leave"))
    for name, value in out.metrics.items():
        if name not in rules.metrics and name not in keys.DP_METRICS:
            problems.append(("egress.metrics", f"metric {name!r} is not allowed to leave"))
        elif not isinstance(value, int) and not math.isfinite(value):
            problems.append(("", f"metric {name!r} is {value}"))
    if out.nbytes > rules.max_bytes:
        problems.append(("egress.max_bytes", f"{out.nbytes} bytes, the policy allows at most {rules.max_bytes}"))
    problems.extend(_protection_problems(policy, out.protections, bool(out.tensors)))
    return problems


def _masked_allowed(tensor: TensorInfo, rules: EgressRules) -> bool:
    """A masked tensor may leave when its unmasked tensor could (its name allowed) or it is the masked weights."""
    return tensor.name == WEIGHTS or any(fnmatch.fnmatchcase(tensor.name, p) for p in rules.tensors)


def _protection_problems(policy: RegionPolicy, given: Protections, update: bool = True) -> list[tuple[str, str]]:
    """What the required protections forbid; secure aggregation protects updates, so a reply without tensors
    (an evaluation's metrics) needs none."""
    problems = []
    need = policy.require_dp
    if need is not None:
        if given.dp is None:
            problems.append(
                (
                    "require_dp",
                    f"the policy requires differential privacy (epsilon {need.epsilon}), the run applies none",
                )
            )
        elif given.dp.epsilon_spent > need.epsilon or given.dp.delta > need.delta:
            problems.append(
                (
                    "require_dp",
                    f"privacy spent (epsilon {given.dp.epsilon_spent:.4g}, delta {given.dp.delta:.3g}) exceeds the "
                    f"policy's (epsilon {need.epsilon}, delta {need.delta})",
                )
            )
    if policy.require_secure_aggregation and update and not given.secure_aggregation:
        problems.append(
            ("require_secure_aggregation", "the policy requires secure aggregation, the run does not use it")
        )
    return problems


def check_server(policy: RegionPolicy, fingerprint: str) -> None:
    """Refuse a SuperLink whose certificate is not the one the policy names (no-op when it names none)."""
    if policy.server_fingerprint is not None and fingerprint != policy.server_fingerprint:
        raise PolicyError(
            f"region {policy.region}: the server presents certificate {fingerprint}, "
            f"the policy allows only {policy.server_fingerprint}"
        )


class PolicyError(InputError):
    """Something the region's policy forbids."""


REFUSAL_PREFIX = "refused by the policy of region"
_REFUSAL_RE = re.compile(re.escape(REFUSAL_PREFIX) + r" ([A-Za-z0-9][A-Za-z0-9_.-]*): ")


def refusal_reason(region: str, problems: list[str]) -> str:
    """The error text a node replies with when its guard stops a reply."""
    return f"{REFUSAL_PREFIX} {region}: {'; '.join(problems)}"


def refused_region(reason: str) -> str | None:
    """The region named by a refusal from ``refusal_reason`` (the server learns who refused from it)."""
    match = _REFUSAL_RE.search(reason)
    return match.group(1) if match else None
