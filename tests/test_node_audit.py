"""The privacy audit a deployed node runs on itself (``fedlocale audit node``): the node keeps the global adapters
it receives (node config keep-globals, bounded), and the audit of its own data against them catches a model that
memorised the node's training records, while the report it writes holds aggregate numbers only."""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from assets.tiny import FILLER, NEG_WORDS, POS_WORDS
from client.app import make_app
from client.membership import Predictor, audit_records, score
from client.node_audit import KEPT_SUFFIX, REPORT_JSON, REPORT_MD, NodeAuditError, keep_global, kept_globals
from client.task import global_model
from common import keys
from common.config import ClientTask, LoraSettings, ModelSettings, TrainSettings
from common.data import Example
from common.model import adapter_state, build_model, save_adapter
from common.runfiles import PERSONALIZED_REPORT
from fedlocale.cli import main

NODE = 77
VOCAB = FILLER + POS_WORDS + NEG_WORDS
LABELS = ("neg", "pos")


def random_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Distinct texts with labels drawn at random: a model gets them right only by memorising them."""
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(VOCAB) for _ in range(10)), "label": rng.choice(LABELS)} for _ in range(n)]


def write_node_data(folder: Path, *, test: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": random_rows(48, 1), "val": random_rows(8, 4), "test": random_rows(48, 2)}
    for split, rows in splits.items():
        if split != "test" or test:
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def overfit_task(tiny_bert: Path) -> ClientTask:
    """A run whose one round memorises the node's training records (high lr, many epochs)."""
    return ClientTask(
        seed=0,
        server_round=1,
        labels=LABELS,
        region_names=("north",),
        model=ModelSettings(base=str(tiny_bert), max_length=32),
        lora=LoraSettings(r=8, alpha=16, dropout=0.0),
        train=TrainSettings(lr=2e-2, epochs=60, batch_size=8, weight_decay=0.0, threads=1),
        run_key="run-a",
    )


def _message(kind: str, task: ClientTask, state: dict[str, torch.Tensor], split: str | None = None) -> Message:
    config = ConfigRecord({keys.TASK: task.to_json(), keys.SERVER_ROUND: task.server_round})
    if split is not None:
        config[keys.SPLIT] = split
    content = RecordDict({keys.ARRAYS: ArrayRecord(state), keys.CONFIG: config})
    return Message(content=content, dst_node_id=NODE, message_type=kind)


def _config_string(config: dict[str, str | int]) -> str:
    return " ".join(f"{k}={v}" if isinstance(v, int) else f'{k}="{v}"' for k, v in config.items())


@pytest.fixture(scope="module")
def deployed_node(tmp_path_factory: pytest.TempPathFactory, overfit_task: ClientTask) -> dict[str, str | int]:
    """A node that took part in a one-round run through the real ClientApp, with keep-globals: it trained round 1
    on its records (the reply, alone in the federation, is the new global adapter) and was sent that adapter for
    the test evaluation. Returns its node config."""
    mp = pytest.MonkeyPatch()
    for name in ("_run_id", "_node_id", "_task_id"):
        mp.setattr(TaskIdentity, name, 1)
    root = tmp_path_factory.mktemp("node")
    config: dict[str, str | int] = {
        keys.NODE_REGION: "north",
        keys.NODE_DATA_DIR: str(write_node_data(root / "north")),
        keys.NODE_THREADS: 1,
        keys.NODE_AUDIT_DIR: str(root / "audit"),
        keys.NODE_KEEP_GLOBALS: str(root / "kept"),
        keys.NODE_KEEP_GLOBALS_COUNT: 2,
    }
    app = make_app()
    context = Context(run_id=1, node_id=NODE, node_config=dict(config), state=RecordDict(), run_config={})
    initial = adapter_state(build_model(overfit_task.model, overfit_task.lora, LABELS, seed=0).model)
    reply = app(_message(MessageType.TRAIN, overfit_task, initial), context)
    assert not reply.has_error()
    trained = reply.content.array_records[keys.ARRAYS].to_torch_state_dict()
    reply = app(_message(MessageType.EVALUATE, overfit_task, trained, keys.TEST), context)
    assert not reply.has_error()
    mp.undo()
    return config


def test_a_node_keeps_what_it_received_and_audits_it_with_aggregate_numbers_only(
    deployed_node: dict[str, str | int], overfit_task: ClientTask, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kept = kept_globals(Path(str(deployed_node[keys.NODE_KEEP_GLOBALS])), "north")
    # round 0 (the initial adapter, received with round 1's train message) and round 1's (the test evaluation's)
    assert [(k.round, k.delivered, k.task.run_key) for k in kept] == [(0, False, "run-a"), (1, True, "run-a")]
    out = tmp_path / "report"
    assert main(["audit", "node", "--node-config", _config_string(deployed_node), "--out", str(out)]) == 0
    body = json.loads((out / REPORT_JSON).read_text())
    assert body["region"] == "north" and body["delivered_round"] == 1 and body["served"] == "global"
    assert 0 < body["members"] == body["nonmembers"] <= 48  # the same label mix on both sides, per label
    assert body["references"] == ["round-000 (kept global adapter)"]
    for attack in ("loss", "reference"):
        hit = body["models"]["global"][attack]
        assert hit["auc"] > 0.7 and hit["auc_ci95"][0] > 0.6, (attack, hit)  # well above chance
        assert hit["tpr_at_fpr"] == {"0.01": None, "0.001": None}  # 48 non-members resolve neither
    # this node serves the global adapter: the same model, the same numbers (intervals too)
    assert body["models"]["served"] == body["models"]["global"]
    # nothing per record: no member's text, and no number of the report is any record's score
    data = Path(str(deployed_node[keys.NODE_DATA_DIR]))
    members = [json.loads(line)["text"] for line in (data / "train.jsonl").read_text().splitlines()]
    written = (out / REPORT_JSON).read_text() + (out / REPORT_MD).read_text()
    assert not [t for t in members if t in written]
    state = {k: v for k, v in _kept_state(kept[1].path).items()}
    loaded = global_model(overfit_task, state)
    records = audit_records(
        "north",
        [Example(r["text"], LABELS.index(r["label"])) for r in random_rows(48, 1)],
        [Example(r["text"], LABELS.index(r["label"])) for r in random_rows(48, 2)],
        0,
    )
    scored = score(Predictor(loaded.model.eval(), loaded.tokenizer, 32), records.members, records.nonmembers, 64)
    per_record = np.concatenate([scored.members, scored.nonmembers])
    numbers = np.array(_numbers(body), dtype=float)
    assert len(numbers) < 40  # counts, AUCs, intervals, rates: a handful per model and attack
    assert not np.isclose(numbers[:, None], per_record[None, :], atol=1e-6).any()
    markdown = (out / REPORT_MD).read_text()
    assert not [f"{v:.3f}" for v in per_record if f"{v:.3f}" in markdown and v < 0]  # log-probabilities are < 0
    assert "report:" in capsys.readouterr().out
    # a second audit into the same folder is refused, with the file named, unless --overwrite
    assert main(["audit", "node", "--node-config", _config_string(deployed_node), "--out", str(out)]) == 2
    assert f"{out / REPORT_JSON}: exists" in capsys.readouterr().err
    assert (
        main(["audit", "node", "--node-config", _config_string(deployed_node), "--out", str(out), "--overwrite"]) == 0
    )


def _kept_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _numbers(value: object) -> list[float]:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    assert isinstance(value, list) and len(value) <= 2, value  # only the AUC's interval is a list
    return [x for v in value for x in _numbers(v)]


@pytest.mark.parametrize("chosen", ["personalized", "local_only"])
def test_the_served_personalized_model_is_audited_from_the_nodes_own_folder(
    deployed_node: dict[str, str | int], overfit_task: ClientTask, tmp_path: Path, chosen: str
) -> None:
    # the node's personalization chose a model of its own (here: one that never trained on anything): its
    # personalized adapter, or with consider_local_only its local-only one (personalize_node keeps both there)
    own = tmp_path / "own"
    save_adapter(build_model(overfit_task.model, overfit_task.lora, LABELS, seed=5), own / "north" / chosen)
    (own / "north" / PERSONALIZED_REPORT).write_text(json.dumps({"region": "north", "chosen": chosen}))
    (tmp_path / "personalize.yaml").write_text("mode: head\n")
    config = {
        **deployed_node,
        keys.NODE_PERSONALIZE: str(tmp_path / "personalize.yaml"),
        keys.NODE_PERSONAL_DIR: str(own),
    }
    out = tmp_path / "report"
    assert main(["audit", "node", "--node-config", _config_string(config), "--out", str(out)]) == 0
    body = json.loads((out / REPORT_JSON).read_text())
    assert body["served"] == chosen
    assert body["models"]["global"]["loss"]["auc"] > 0.7
    assert abs(body["models"]["served"]["loss"]["auc"] - 0.5) < 0.2  # it never saw the members


def test_kept_globals_are_bounded_and_tied_to_their_run(overfit_task: ClientTask, tmp_path: Path) -> None:
    state = adapter_state(build_model(overfit_task.model, overfit_task.lora, LABELS, seed=0).model)
    keep = tmp_path / "kept"
    keep_global(
        keep, "north", replace(overfit_task, run_key="earlier", server_round=4), state, delivered=False, count=2
    )
    for r in range(1, 6):  # rounds 1-5 of this run: their train messages carry the results of rounds 0-4
        keep_global(keep, "north", replace(overfit_task, server_round=r), state, delivered=False, count=2)
    keep_global(keep, "north", replace(overfit_task, server_round=2), state, delivered=True, count=2)
    kept = kept_globals(keep, "north")
    # the earlier run's file is gone; of this run, the newest two rounds and the delivered (best) one stay
    assert [(k.round, k.delivered) for k in kept] == [(2, True), (3, False), (4, False)]
    assert sorted(p.name for p in (keep / "north").iterdir()) == [f"round-00{r}{KEPT_SUFFIX}" for r in (2, 3, 4)]
    # a file of that name that is no kept adapter (damaged, or the operator's own) is never deleted; the audit
    # then names it
    stranger = keep / "north" / f"round-009{KEPT_SUFFIX}"
    stranger.write_bytes(b"not an adapter")
    keep_global(keep, "north", replace(overfit_task, server_round=6), state, delivered=False, count=2)
    assert stranger.read_bytes() == b"not an adapter"
    with pytest.raises(NodeAuditError, match="round-009"):
        kept_globals(keep, "north")


def test_without_an_earlier_round_kept_the_initial_adapter_is_the_reference(
    deployed_node: dict[str, str | int], tmp_path: Path
) -> None:
    import shutil

    kept_dir = tmp_path / "kept"
    shutil.copytree(Path(str(deployed_node[keys.NODE_KEEP_GLOBALS])), kept_dir)
    (kept_dir / "north" / f"round-000{KEPT_SUFFIX}").unlink()  # pruned, as with a small keep-globals-count
    config = {**deployed_node, keys.NODE_KEEP_GLOBALS: str(kept_dir)}
    out = tmp_path / "report"
    assert (
        main(["audit", "node", "--node-config", _config_string(config), "--out", str(out), "--bootstrap", "200"]) == 0
    )
    body = json.loads((out / REPORT_JSON).read_text())
    assert len(body["references"]) == 1 and body["references"][0].startswith("round 0: the initial global adapter")
    # rebuilt from the run's seed, it is the very adapter round 1 started from: the same numbers as with it kept
    assert body["models"]["global"]["reference"]["auc"] > 0.7
    assert "initial global adapter" in (out / REPORT_MD).read_text()


def test_clear_errors_for_what_the_node_lacks(
    deployed_node: dict[str, str | int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(config: dict[str, str | int]) -> str:
        assert main(["audit", "node", "--node-config", _config_string(config), "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    without = {
        k: v for k, v in deployed_node.items() if k not in (keys.NODE_KEEP_GLOBALS, keys.NODE_KEEP_GLOBALS_COUNT)
    }
    assert "node config has no keep-globals" in run(without)
    assert f"{tmp_path / 'nowhere'}: no such folder (node config data-dir)" in run(
        {**deployed_node, keys.NODE_DATA_DIR: str(tmp_path / "nowhere")}
    )
    no_test = write_node_data(tmp_path / "north", test=False)
    assert f"{no_test}: region north has no test split" in run({**deployed_node, keys.NODE_DATA_DIR: str(no_test)})
    empty = tmp_path / "empty-kept"
    assert f"{empty / 'north'}: no such folder" in run({**deployed_node, keys.NODE_KEEP_GLOBALS: str(empty)})
    broken = tmp_path / "broken-kept"
    import shutil

    shutil.copytree(Path(str(deployed_node[keys.NODE_KEEP_GLOBALS])), broken)
    bad = broken / "north" / f"round-001{KEPT_SUFFIX}"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    assert f"{bad}: not a readable kept global adapter" in run({**deployed_node, keys.NODE_KEEP_GLOBALS: str(broken)})
    assert "--node-config" in run({keys.NODE_REGION: "north"})  # no data-dir
    assert re.search(
        r"keep-globals-count=0.*whole number >= 1", run({**deployed_node, keys.NODE_KEEP_GLOBALS_COUNT: 0})
    )
