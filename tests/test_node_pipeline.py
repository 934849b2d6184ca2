"""The node's data pipeline: load → redact (the region policy's PII rules) → augment (the node's own setting).

Both stages run only on the node, from the node's own settings; the server's task cannot turn them on or off.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from client.pipeline import DataCounts, node_data
from client.task import NodeConfigError, NodeSettings, node_settings, train_round
from common import keys
from common.augment_settings import AugmentSettings
from common.config import ClientTask, DataSettings, Region
from common.errors import ConfigError
from common.model import adapter_state, build_model
from common.policy import RegionPolicy
from tests.conftest import write_region

LABELS = ("neg", "pos")


@pytest.fixture(scope="module")
def task(north_task: ClientTask) -> ClientTask:
    return north_task


@pytest.fixture
def region(tmp_path: Path) -> Region:
    folder = write_region(tmp_path / "north", 40, 16, seed=3)
    rows = [json.loads(x) for x in (folder / "test.jsonl").read_text().splitlines()]
    rows[0]["text"] += " mail me: bob@example.org"
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Region(name="north", data=folder)


@pytest.fixture
def keep_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_without_a_policy_nothing_is_redacted(region: Region) -> None:
    loaded = node_data(region.name, region.data, LABELS, seed=0, settings=DataSettings())
    assert loaded.redactions == {} and any("bob@example.org" in ex.text for ex in loaded.data.test)
    assert loaded.train == loaded.data.train  # no augmentation asked for


def test_the_policy_redacts_every_split(region: Region) -> None:
    loaded = node_data(region.name, region.data, LABELS, RegionPolicy("north"), seed=0, settings=DataSettings())
    data, counts = loaded.data, loaded.redactions
    assert counts == {"email": 1}
    assert loaded.counts == DataCounts(train_examples=40, redactions={"email": 1})
    assert not any("bob@" in ex.text for split in (data.train, data.val, data.test) for ex in split)
    assert any("[EMAIL]" in ex.text for ex in data.test)


def test_augmentation_trains_on_more_text_but_weighs_by_real_examples(
    region: Region, task: ClientTask, keep_threads: None
) -> None:
    state = adapter_state(build_model(task.model, task.lora, task.labels, seed=task.seed).model)
    plain_state, plain = train_round(region, task, state, NodeSettings(threads=1))
    node = NodeSettings(threads=1, augment=AugmentSettings(copies=1, p=0.3))
    augmented_state, augmented = train_round(region, task, state, node)
    assert plain.num_examples == augmented.num_examples == 40
    assert augmented.steps > plain.steps  # the copies were trained on
    assert any(not torch.equal(plain_state[k], augmented_state[k]) for k in plain_state)


def test_node_config_names_policy_and_augmentation_files(tmp_path: Path) -> None:
    policy = tmp_path / "north.yaml"
    policy.write_text(yaml.safe_dump({"region": "north", "min_train_examples": 5}))
    augment = tmp_path / "augment.yaml"
    augment.write_text(yaml.safe_dump({"copies": 2, "ops": ["delete"]}))
    node = node_settings(
        {keys.NODE_POLICY: str(policy), keys.NODE_AUGMENT: str(augment), keys.NODE_AUDIT_DIR: str(tmp_path / "a")}
    )
    assert node.policy == RegionPolicy("north", min_train_examples=5)
    assert node.augment == AugmentSettings(copies=2, ops=("delete",))
    assert node.audit_dir == tmp_path / "a"


def test_node_config_errors_name_the_key_or_the_file(tmp_path: Path) -> None:
    with pytest.raises(NodeConfigError, match=r"node config policy='north\.yaml': must be the absolute path"):
        node_settings({keys.NODE_POLICY: "north.yaml"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("region: north\nmin_train_examples: zero\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2: min_train_examples: must be int"):
        node_settings({keys.NODE_POLICY: str(bad)})


def test_node_config_refuses_a_key_it_does_not_know(tmp_path: Path) -> None:
    # a mistyped "policy" must stop the node: run on, it would send replies no policy checked
    policy = tmp_path / "north.yaml"
    policy.write_text(yaml.safe_dump({"region": "north", "min_train_examples": 5}))
    typo = {keys.NODE_REGION: "north", keys.NODE_DATA_DIR: str(tmp_path), "polcy": str(policy), "colour": "red"}
    with pytest.raises(NodeConfigError, match=r"unknown key\(s\) 'colour', 'polcy' \(did you mean 'policy'\?\)"):
        node_settings(typo)
    # every key a deployed or simulated node is given is known, Flower's simulation keys included
    assert node_settings({keys.NODE_PARTITION_ID: 0, keys.NODE_NUM_PARTITIONS: 2}).policy is None
    spelled = {keys.NODE_REGION: "north", keys.NODE_DATA_DIR: str(tmp_path), keys.NODE_POLICY: str(policy)}
    assert node_settings(spelled).policy == RegionPolicy("north", min_train_examples=5)
