"""The node's data pipeline, the one way a region's data is read anywhere: load → redact → augment.

A deployed node, the simulation (its simulated nodes and its baselines) and ``fedlocale check`` all call
``node_data``, so that what a check reports and what a baseline trains on is the text a node trains on.
Redaction (the region policy's PII rules) runs before anything is tokenised or cached; augmentation (the node
operator's own setting) only touches the train split, and only callers that train ask for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from client.augment import augment_train
from common.augment_settings import AugmentSettings
from common.data import Example, RegionData, load_region, redact_region
from common.policy import RegionPolicy
from common.seeds import derive_seed

log = logging.getLogger("fedlocale.node")


@dataclass(frozen=True)
class DataCounts:
    """What the egress guard records about the data behind a reply: the region's real training-set size (the
    policy's ``min_train_examples`` reads it; augmented copies are not new examples) and the count of each PII
    type the policy replaced."""

    train_examples: int
    redactions: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeData:
    """A region's data as its node uses it."""

    data: RegionData  # loaded, cleaned and redacted; every split as evaluated
    redactions: dict[str, int]  # PII type -> how many were replaced (empty without a policy)
    train: list[Example]  # what local training sees: ``data.train`` plus augmented copies when asked for

    @property
    def counts(self) -> DataCounts:
        """The counts the egress guard records for a reply made from this data."""
        return DataCounts(len(self.data.train), dict(self.redactions))


def node_data(
    name: str,
    folder: Path,
    labels: tuple[str, ...],
    policy: RegionPolicy | None = None,
    *,
    augment: AugmentSettings | None = None,
    seed: int = 0,
    say: Callable[[str], None] | None = None,
) -> NodeData:
    """Region ``name``'s data from ``folder``: loaded and cleaned (``load_region``, which raises DataError
    naming every bad row), with ``policy``'s PII replaced by type tokens in every split, and, when ``augment``
    is given, the train split augmented as the node's operator set it (seeded by the run's ``seed`` and the
    region). ``say`` gets one line about the split sizes and one about the redactions."""
    data = load_region(name, folder, labels, log=say)
    redactions: dict[str, int] = {}
    if policy is not None:
        data, redactions = redact_region(data, policy.pii.rules())
        if say is not None:
            found = ", ".join(f"{k} {v}" for k, v in redactions.items()) or "none"
            say(f"{name}: personal data replaced: {found}")
    train = data.train
    if augment is not None:
        augmented, counts = augment_train(data, augment, derive_seed(seed, "augment", name))
        log.info("%s: augmentation %s", name, counts)
        train = augmented.train
    return NodeData(data, redactions, train)
