"""The ClientApp's handlers called for real with Flower messages: what leaves a region, and which region a node is."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from transformers import AutoModelForSequenceClassification

from client.app import make_app
from client.task import NodeConfigError, resolve_region
from common import keys
from common.config import ClientTask, LoraSettings, ModelSettings, Region, TrainSettings
from common.data import load_region
from common.model import adapter_state, build_model, state_nbytes
from tests.conftest import tiny_config

LABELS = ("neg", "pos")
SERVER_NODE, REGION_NODE = 1, 77


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's runtime sets the task identity of a process before any message is built (see
    flwr/superlink/runtime/run_serverapp.py); the instruction messages here are built as the server would."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SERVER_NODE)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture(scope="module")
def regions(two_regions: Path) -> tuple[Region, Region]:
    return Region(name="north", data=two_regions / "north"), Region(name="south", data=two_regions / "south")


@pytest.fixture(scope="module")
def task(tiny_bert: Path) -> ClientTask:
    return ClientTask(
        seed=0,
        server_round=1,
        labels=LABELS,
        region_names=("north", "south"),
        model=ModelSettings(base=str(tiny_bert), max_length=32),
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
        train=TrainSettings(lr=5e-3, epochs=1, batch_size=8, threads=1),
    )


@pytest.fixture(scope="module")
def global_state(task: ClientTask) -> dict[str, torch.Tensor]:
    return adapter_state(build_model(task.model, task.lora, task.labels, seed=task.seed).model)


def context(node_config: dict[str, object]) -> Context:
    return Context(run_id=1, node_id=REGION_NODE, node_config=node_config, state=RecordDict(), run_config={})


def instruction(message_type: str, state: dict[str, torch.Tensor], config: dict[str, str]) -> Message:
    content = RecordDict({keys.ARRAYS: ArrayRecord(state), keys.CONFIG: ConfigRecord(config)})
    return Message(content=content, dst_node_id=REGION_NODE, message_type=message_type)


# The adapter + head of the tiny 2-layer BERT, written out: everything that may leave a region.
ADAPTER_KEYS = {
    f"base_model.model.bert.encoder.layer.{layer}.attention.self.{module}.lora_{ab}.weight"
    for layer in (0, 1)
    for module in ("query", "value")
    for ab in ("A", "B")
} | {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}


# ---------------------------------------------------------------------------------------------------------
# Train


@pytest.mark.usefixtures("server_identity")
def test_train_reply_carries_only_the_adapter_and_head(
    tiny_bert: Path, regions: tuple[Region, Region], task: ClientTask, global_state: dict[str, torch.Tensor]
) -> None:
    app = make_app(sim_regions=regions)
    msg = instruction(MessageType.TRAIN, global_state, {keys.TASK: task.to_json()})
    reply = app(msg, context({keys.NODE_PARTITION_ID: 1}))  # partition 1 is "south"

    assert reply.metadata.dst_node_id == SERVER_NODE and reply.metadata.src_node_id == REGION_NODE
    assert reply.metadata.message_type == MessageType.TRAIN
    content = reply.content
    assert list(content.array_records) == [keys.ARRAYS]
    assert list(content.metric_records) == [keys.METRICS]
    assert list(content.config_records) == []

    arrays = {name: a.numpy() for name, a in content.array_records[keys.ARRAYS].items()}
    assert set(arrays) == ADAPTER_KEYS
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2).state_dict()
    head = {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert all(".lora_A." in name or ".lora_B." in name for name in set(arrays) - head)
    assert not any(
        marker in name
        for name in arrays
        for marker in ("embeddings", "base_layer", "original_module", "LayerNorm", "pooler", "intermediate")
    )
    assert len(arrays) == 10 < len(base)
    for name, arr in arrays.items():
        assert arr.dtype == "float32"
        assert arr.shape == tuple(global_state[name].shape)
    # training moved the adapter (LoRA B starts at zero) and the head
    assert any(abs(arrays[n]).max() > 0 for n in ADAPTER_KEYS if "lora_B" in n)
    assert not (
        arrays["base_model.model.classifier.weight"] == global_state["base_model.model.classifier.weight"].numpy()
    ).all()

    # bytes: r=4, hidden 32, 2 layers x (query, value) x (A, B) of 4x32, plus the 2x32 + 2 head = 4360
    payload = sum(arr.nbytes for arr in arrays.values())
    assert payload == sum(arr.size * 4 for arr in arrays.values()) == state_nbytes(global_state) == 4360
    full = sum(t.numel() * t.element_size() for t in base.values())
    ratio = payload / full
    # Honest number for the tiny test model (32 hidden units, 2 layers, 30-word vocabulary): about 5.1% of the
    # full model, not below 1%; the small fraction only shows on real encoders, where the base dwarfs the adapter.
    assert full == 85384
    assert 0.050 < ratio < 0.052

    metrics = content.metric_records[keys.METRICS]
    assert set(metrics) == {keys.NUM_EXAMPLES, keys.TRAIN_LOSS, keys.REGION_INDEX}
    assert metrics[keys.NUM_EXAMPLES] == len(load_region("south", regions[1].data, LABELS).train)
    assert metrics[keys.REGION_INDEX] == 1
    loss = metrics[keys.TRAIN_LOSS]
    assert isinstance(loss, float) and math.isfinite(loss) and 0.0 < loss < 5.0


@pytest.mark.usefixtures("server_identity")
def test_node_outside_the_run_refuses_to_train(
    regions: tuple[Region, Region], task: ClientTask, global_state: dict[str, torch.Tensor], two_regions: Path
) -> None:
    app = make_app()
    msg = instruction(MessageType.TRAIN, global_state, {keys.TASK: task.to_json()})
    node = {keys.NODE_REGION: "west", keys.NODE_DATA_DIR: str(two_regions / "north")}
    with pytest.raises(NodeConfigError, match="region 'west' is not in this run"):
        app(msg, context(node))


# ---------------------------------------------------------------------------------------------------------
# Evaluate


@pytest.mark.usefixtures("server_identity")
def test_evaluate_reply_holds_only_metrics(
    regions: tuple[Region, Region], task: ClientTask, global_state: dict[str, torch.Tensor], two_regions: Path
) -> None:
    app = make_app()  # deployment style: the region comes from the node config
    msg = instruction(MessageType.EVALUATE, global_state, {keys.TASK: task.to_json(), keys.SPLIT: keys.TEST})
    node = {keys.NODE_REGION: "north", keys.NODE_DATA_DIR: str(two_regions / "north")}
    reply = app(msg, context(node))
    assert reply.metadata.message_type == MessageType.EVALUATE
    assert len(reply.content.array_records) == 0
    assert list(reply.content.metric_records) == [keys.METRICS]
    metrics = reply.content.metric_records[keys.METRICS]
    assert set(metrics) == {keys.NUM_EXAMPLES, keys.LOSS, keys.ACCURACY, keys.MACRO_F1, keys.REGION_INDEX}
    assert metrics[keys.NUM_EXAMPLES] == len(load_region("north", regions[0].data, LABELS).test)
    assert metrics[keys.REGION_INDEX] == 0
    assert 0.0 <= metrics[keys.ACCURACY] <= 1.0 and 0.0 <= metrics[keys.MACRO_F1] <= 1.0
    # an untrained LoRA (B = 0) over a 2-way head is close to chance: loss near ln 2
    assert metrics[keys.LOSS] == pytest.approx(math.log(2), abs=0.1)


# ---------------------------------------------------------------------------------------------------------
# Which region a node serves


def test_resolve_region_deployment_from_node_config(regions: tuple[Region, Region], two_regions: Path) -> None:
    node = {keys.NODE_REGION: "east", keys.NODE_DATA_DIR: str(two_regions / "south")}
    # deployment settings win over a partition id and over the simulator's list
    region = resolve_region({**node, keys.NODE_PARTITION_ID: 0}, {}, regions)
    assert region == Region(name="east", data=two_regions / "south")


@pytest.mark.parametrize(
    "node",
    [{keys.NODE_REGION: "east"}, {keys.NODE_DATA_DIR: "/somewhere"}, {keys.NODE_REGION: 3, keys.NODE_DATA_DIR: "x"}],
)
def test_resolve_region_deployment_needs_both_keys(node: dict[str, object]) -> None:
    with pytest.raises(NodeConfigError, match="needs both region="):
        resolve_region(node, {})


def test_resolve_region_simulation_from_partition_id(regions: tuple[Region, Region]) -> None:
    assert resolve_region({keys.NODE_PARTITION_ID: 0}, {}, regions) == regions[0]
    assert resolve_region({keys.NODE_PARTITION_ID: 1}, {}, regions) == regions[1]
    with pytest.raises(NodeConfigError, match="partition id 2 but the run has 2 regions"):
        resolve_region({keys.NODE_PARTITION_ID: 2}, {}, regions)


def test_resolve_region_simulation_reads_the_run_config_file(
    tmp_path: Path, tiny_bert: Path, two_regions: Path
) -> None:
    path = tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions)
    region = resolve_region({keys.NODE_PARTITION_ID: 1}, {keys.RUN_CONFIG_PATH: str(path)})
    assert region == Region(name="south", data=two_regions / "south")
    with pytest.raises(NodeConfigError, match="needs the run config key 'config'"):
        resolve_region({keys.NODE_PARTITION_ID: 1}, {})


def test_resolve_region_neither(regions: tuple[Region, Region]) -> None:
    with pytest.raises(NodeConfigError, match="node config names no region"):
        resolve_region({}, {}, regions)
    with pytest.raises(NodeConfigError):
        resolve_region({"something-else": 1}, {keys.RUN_CONFIG_PATH: "x.yaml"})
