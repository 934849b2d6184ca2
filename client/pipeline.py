"""The node's data pipeline, the one way a region's data is read anywhere: load → redact → carve → augment.

A deployed node, the simulation (its simulated nodes and its baselines) and ``fedlocale check`` all call
``node_data``, so that what a check reports and what a baseline trains on is the text a node trains on.
Redaction (the region policy's PII rules) runs before anything is tokenised or cached; a region without a val
file gets a validation split carved from its train split (``carve_val``: the run's ``data.val_fraction``, seeded
by the run seed and the region, so every process carves the same examples); augmentation (the node operator's own
setting) only touches the train split that is left, and only callers that train ask for it.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from client.augment import augment_train
from common import keys
from common.augment_settings import AugmentSettings
from common.config import DataSettings
from common.data import Example, RegionData, find_split, load_region, redact_region
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
    seed: int,
    settings: DataSettings,
    say: Callable[[str], None] | None = None,
    loaded: RegionData | None = None,
) -> NodeData:
    """Region ``name``'s data from ``folder``: loaded and cleaned (``load_region``, which raises DataError
    naming every bad row), with ``policy``'s PII replaced by type tokens in every split, a validation split
    carved from train when the folder has no val file (``carve_val`` with ``settings.val_fraction``), and, when
    ``augment`` is given, the train split augmented as the node's operator set it (seeded by the run's ``seed``
    and the region). ``say`` gets one line about the split sizes, one about the redactions and, without a val
    file, one about the carved validation split; the carving also goes to the node's log. ``loaded`` is the
    region as ``load_region`` returned it when the caller has read it already (``client.preflight``): it is not
    read again, and its split sizes were said then."""
    data = loaded if loaded is not None else load_region(name, folder, labels, log=say)
    redactions: dict[str, int] = {}
    if policy is not None:
        data, redactions = redact_region(data, policy.pii.rules())
        if say is not None:
            found = ", ".join(f"{k} {v}" for k, v in redactions.items()) or "none"
            say(f"{name}: personal data replaced: {found}")
    data, note = carved(data, folder, settings, seed)
    if note is not None and say is not None:
        say(note)
    elif note is not None:
        log.info("%s", note)
    train = data.train
    if augment is not None:
        augmented, counts = augment_train(data, augment, derive_seed(seed, "augment", name))
        log.info("%s: augmentation %s", name, counts)
        train = augmented.train
    return NodeData(data, redactions, train)


def carved(data: RegionData, folder: Path, settings: DataSettings, seed: int) -> tuple[RegionData, str | None]:
    """``data`` as the node trains on it: with a validation split carved from train (``carve_val``, seeded by
    the run's ``seed`` and the region) when ``folder`` has no val file, and the line saying so; else ``data``
    as it is and None. ``client.preflight`` plans DP-SGD on the train split this leaves."""
    if find_split(folder, keys.VAL) is not None:
        # only a missing file: a val file emptied by cleaning is the user's split (left empty, and reported)
        return data, None
    return carve_val(data, settings.val_fraction, derive_seed(seed, "val-split", data.name))


def carve_val(data: RegionData, fraction: float, seed: int) -> tuple[RegionData, str]:
    """``data`` with ``floor(fraction × len(train))`` of its train examples moved to its val split, stratified by
    label, chosen by ``seed``; and one line saying what was done. Each label gives its share of the split
    (largest remainders first), but never its last train example. Nothing is carved when the share rounds to
    none (fewer than ``1 / fraction`` examples, or ``fraction`` 0): a tiny region keeps everything to train on.

    The train split left is what the region trains on, so it is also its FedAvg weight and the policy's
    ``min_train_examples`` count. Deterministic: the same data, fraction and seed carve the same examples in
    every process.
    """
    n = len(data.train)
    want = int(n * fraction)
    if want == 0:
        why = "data.val_fraction is 0" if fraction == 0 else f"{n} train example(s) × data.val_fraction {fraction} < 1"
        return data, f"{data.name}: no val split and none carved ({why}): all {n} train examples train, none validate"
    by_label: dict[int, list[int]] = {}
    for i, ex in enumerate(data.train):
        by_label.setdefault(ex.label, []).append(i)
    labels = sorted(by_label)
    share = {label: want * len(by_label[label]) / n for label in labels}
    take = {label: int(share[label]) for label in labels}
    # the rest of `want` goes to the largest remainders; a label keeps at least one train example
    for label in sorted(labels, key=lambda lb: (-(share[lb] - take[lb]), lb)):
        if sum(take.values()) >= want:
            break
        if take[label] + 1 < len(by_label[label]):
            take[label] += 1
    rng = random.Random(seed)
    chosen = {i for label in labels for i in rng.sample(by_label[label], take[label])}
    if not chosen:
        return data, f"{data.name}: no val split and none carved (every label has a single train example)"
    val = [ex for i, ex in enumerate(data.train) if i in chosen]
    train = [ex for i, ex in enumerate(data.train) if i not in chosen]
    carved = dataclasses.replace(data, train=train, val=val, val_carved=len(val))
    note = (
        f"{data.name}: no val split: val carved from train: {len(val)} of {n} examples "
        f"(data.val_fraction {fraction}, stratified by label, seed {seed}); {len(train)} train"
    )
    return carved, note
