"""One message on a node does each thing once: the guard parses the node's settings, the handler parses the task
and loads (and redacts) the region's data, and the guard records what the handler loaded instead of reading
the data again; the test evaluation's personalization reuses the evaluation's data and model."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import client.pipeline
import client.task
from client.app import make_app
from client.guard import NodeMessage, release
from client.task import NodeSettings
from common import keys
from common.audit import FAILED, SENT, Ledger, read_entries
from common.config import ClientTask, Region
from common.model import adapter_state, build_model
from common.runfiles import LEDGER_FILE, PERSONALIZED_REPORT
from tests.conftest import write_region

NODE = 77


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are built as the server builds them (see tests/test_client_reply.py)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How often each step of a message ran: the real functions, counted where the node's code looks them up."""
    counted: Counter[str] = Counter()

    def counting(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counted[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for module, name in (
        (client.pipeline, "load_region"),
        (client.pipeline, "redact_region"),
        (client.task, "build_model"),
        (client.task, "load_policy"),
    ):
        monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    return counted


@pytest.fixture
def node_config(tmp_path: Path) -> dict[str, str | int]:
    """A deployed node with a policy (PII redaction), a ledger and personalization (probe) on the test split."""
    folder = write_region(tmp_path / "north", 40, 16, seed=3)
    rows = [json.loads(x) for x in (folder / "train.jsonl").read_text().splitlines()]
    rows[0]["text"] += " mail me: bob@example.org"
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    policy, personalize = tmp_path / "north.yaml", tmp_path / "personalize.yaml"
    policy.write_text(yaml.safe_dump({"region": "north"}))
    personalize.write_text(yaml.safe_dump({"mode": "probe"}))
    return {
        keys.NODE_REGION: "north",
        keys.NODE_DATA_DIR: str(folder),
        keys.NODE_THREADS: 1,
        keys.NODE_POLICY: str(policy),
        keys.NODE_AUDIT_DIR: str(tmp_path / "audit"),
        keys.NODE_PERSONALIZE: str(personalize),
        keys.NODE_PERSONAL_DIR: str(tmp_path / "own"),
    }


def _message(kind: str, task: ClientTask, state: dict[str, torch.Tensor], split: str | None = None) -> Message:
    config = ConfigRecord({keys.TASK: task.to_json(), keys.SERVER_ROUND: task.server_round})
    if split is not None:
        config[keys.SPLIT] = split
    content = RecordDict({keys.ARRAYS: ArrayRecord(state), keys.CONFIG: config})
    return Message(content=content, dst_node_id=NODE, message_type=kind)


def _context(node_config: dict[str, str | int]) -> Context:
    return Context(run_id=1, node_id=NODE, node_config=dict(node_config), state=RecordDict(), run_config={})


@pytest.mark.usefixtures("server_identity")
def test_each_message_loads_redacts_and_builds_once(
    north_task: ClientTask, node_config: dict[str, str | int], calls: Counter[str], tmp_path: Path
) -> None:
    task = replace(north_task, server_round=2)
    state = adapter_state(build_model(task.model, task.lora, task.labels, seed=task.seed).model)
    calls.clear()
    app = make_app()
    messages = [
        _message(MessageType.TRAIN, task, state),
        _message(MessageType.EVALUATE, task, state, keys.VAL),
        _message(MessageType.EVALUATE, task, state, keys.TEST),  # with the node's personalization
    ]
    for msg in messages:
        reply = app(msg, _context(node_config))
        assert not reply.has_error()
        # once each: the policy file, data, redaction, model; the guard read none of it again, nor did personalization
        assert calls == {"load_policy": 1, "load_region": 1, "redact_region": 1, "build_model": 1}
        calls.clear()
    report = json.loads((tmp_path / "own" / "north" / PERSONALIZED_REPORT).read_text())
    assert report["mode"] == "probe"
    entries, problem = read_entries(tmp_path / "audit" / LEDGER_FILE)
    assert problem is None
    bodies = [e["body"] for e in entries]
    # the counts the handler loaded are the ones the guard recorded
    assert [(b["status"], b["message"], b["split"]) for b in bodies] == [
        (SENT, "train", keys.TRAIN),
        (SENT, "evaluate", keys.VAL),
        (SENT, "evaluate", keys.TEST),
    ]
    assert all(b["train_examples"] == 40 and b["redactions"] == {"email": 1} for b in bodies)


@pytest.mark.usefixtures("server_identity")
def test_a_handler_that_raises_leaves_a_failed_entry(
    north_task: ClientTask, node_config: dict[str, str | int], calls: Counter[str], tmp_path: Path
) -> None:
    outside = replace(north_task, region_names=("south",))  # this node's region is not in the run
    msg = _message(MessageType.TRAIN, outside, {})
    with pytest.raises(client.task.NodeConfigError, match="region 'north' is not in this run"):
        make_app()(msg, _context(node_config))
    assert calls["load_region"] == 0  # refused before any data was read
    entries, _ = read_entries(tmp_path / "audit" / LEDGER_FILE)
    assert [e["body"]["status"] for e in entries] == [FAILED]
    assert "is not in this run" in entries[0]["body"]["reason"]


@pytest.mark.usefixtures("server_identity")
def test_a_reply_made_without_loading_the_data_does_not_leave(north_task: ClientTask, tmp_path: Path) -> None:
    msg = _message(MessageType.EVALUATE, north_task, {}, keys.VAL)
    reply = Message(content=RecordDict({keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 1})}), reply_to=msg)
    here = NodeMessage(Region(name="north", data=tmp_path), NodeSettings())
    ledger = Ledger.in_folder(tmp_path / "audit", "north")
    with pytest.raises(RuntimeError, match="without loading the region's data"):
        release(msg, reply, here, ledger, datetime(2025, 1, 1, tzinfo=UTC))
    entries, _ = read_entries(tmp_path / "audit" / LEDGER_FILE)
    assert [e["body"]["status"] for e in entries] == [FAILED]


@pytest.mark.usefixtures("server_identity")
def test_a_handler_reached_without_the_guard_is_refused(north_task: ClientTask) -> None:
    from client.guard import InFlight

    msg = _message(MessageType.TRAIN, north_task, {})
    with pytest.raises(RuntimeError, match="without passing the egress guard"):
        InFlight().of(msg)
