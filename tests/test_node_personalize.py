"""Personalization on a deployed node: the operator's own setting, run on the final global model when the test
evaluation arrives; the model and its report stay on the node and the reply is unchanged."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from client.task import NodeConfigError, NodeSettings, evaluate_round, node_settings, personalize_node
from common import keys
from common.config import ClientTask, PersonalizeSettings, Region
from common.errors import ConfigError
from common.model import adapter_state, build_model
from common.runfiles import KEPT_CHECKPOINT, PERSONALIZED_REPORT
from runfolder.export import load_exported
from tests.conftest import write_region

LABELS = ("neg", "pos")


@pytest.fixture(scope="module")
def task(north_task: ClientTask) -> ClientTask:
    return replace(north_task, server_round=3)  # the test evaluation of a later round


def _settings_file(path: Path, **values: object) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def test_node_config_reads_the_personalization_settings_and_folder(tmp_path: Path) -> None:
    settings = _settings_file(tmp_path / "p.yaml", mode="probe")
    node = node_settings({keys.NODE_PERSONALIZE: str(settings), keys.NODE_PERSONAL_DIR: str(tmp_path / "own")})
    assert node.personalize == PersonalizeSettings(mode="probe") and node.personal_dir == tmp_path / "own"
    assert node_settings({}).personalize is None
    assert (node.personal_rank, node.personal_apart) == (None, False)
    for dual_train, apart in (("joint", False), ("apart", True)):
        own = _settings_file(tmp_path / f"{dual_train}.yaml", mode="dual", local_r=2, dual_train=dual_train)
        dual = node_settings({keys.NODE_PERSONALIZE: str(own), keys.NODE_PERSONAL_DIR: str(tmp_path / "own")})
        assert (dual.personal_rank, dual.personal_apart) == (2, apart)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({keys.NODE_PERSONALIZE: "p.yaml"}, "personalize='p.yaml': must be the absolute path"),
        ({keys.NODE_PERSONAL_DIR: "/x"}, "go together: the settings and where the personalized model stays"),
        ({keys.NODE_PERSONALIZE: "{p}"}, "go together"),
    ],
)
def test_node_config_refuses_half_a_personalization(tmp_path: Path, given: dict[str, str], message: str) -> None:
    settings = _settings_file(tmp_path / "p.yaml", mode="probe")
    config = {k: v.format(p=settings) for k, v in given.items()}
    with pytest.raises(NodeConfigError, match=message):
        node_settings(config)


def test_node_config_names_the_bad_personalization_file(tmp_path: Path) -> None:
    folder = str(tmp_path / "own")
    none = _settings_file(tmp_path / "none.yaml", mode="none")
    with pytest.raises(NodeConfigError, match=f"{none}: mode: is 'none'"):
        node_settings({keys.NODE_PERSONALIZE: str(none), keys.NODE_PERSONAL_DIR: folder})
    bad = _settings_file(tmp_path / "bad.yaml", mode="probe", epochs=0, lr=2)
    with pytest.raises(ConfigError) as err:
        node_settings({keys.NODE_PERSONALIZE: str(bad), keys.NODE_PERSONAL_DIR: folder})
    assert "epochs: must be in (0, 10], got 0" in str(err.value) and "lr: must be in (0, 1), got 2" in str(err.value)
    assert str(bad) in str(err.value)


@pytest.mark.parametrize("mode", ["probe", "local"])
def test_node_keeps_its_personalized_model_and_report(tmp_path: Path, task: ClientTask, mode: str) -> None:
    region = Region(name="north", data=write_region(tmp_path / "north", 40, 16, seed=3))
    state = adapter_state(build_model(task.model, task.lora, task.labels, seed=task.seed).model)
    node = NodeSettings(threads=1, personalize=PersonalizeSettings(mode=mode, lr=5e-2), personal_dir=tmp_path / "own")  # type: ignore[arg-type]
    report = personalize_node(region, task, state, node, now=1_700_000_000.0)

    folder = tmp_path / "own" / "north"
    assert json.loads((folder / PERSONALIZED_REPORT).read_text()) == report
    assert report["time"] == 1_700_000_000.0 and report["round"] == 3 and report["bytes_sent"] == 0
    val, evidence = report["val_macro_f1"], report["val_ab"]
    assert evidence["diff"] == pytest.approx(val["personalized"] - val["global"]) and report["choice"] == "confident"
    assert report["chosen"] == ("global" if evidence["high"] < 0 else "personalized")
    # the global test score is the one the node's test reply carries
    reply = evaluate_round(region, task, state, keys.TEST, node)
    assert report["test_macro_f1"]["global"] == pytest.approx(reply.macro_f1)
    ab = report["ab"]["vs_federated"]
    assert ab["diff"] == pytest.approx(report["test_macro_f1"]["served"] - report["test_macro_f1"]["global"])
    assert ab["low"] <= ab["diff"] <= ab["high"]
    # both models are ordinary adapter folders (what `fedlocale export` / `predict` load)
    exported = load_exported(folder / "personalized")
    received = load_exported(folder / "global")
    got = adapter_state(received.model)
    assert all(np.allclose(got[k], v.numpy()) for k, v in state.items())
    assert exported.labels == LABELS


def test_the_test_message_predicts_the_global_model_once_for_its_reply_and_personalization(
    tmp_path: Path, task: ClientTask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test evaluation's predictions of the global model are the ones personalization's A/B reads: one
    forward pass of it over the test split per message, not two."""
    import client.personalize
    import client.task
    from client.task import evaluate_message, load_data

    region = Region(name="north", data=write_region(tmp_path / "north", 40, 16, seed=3))
    state = adapter_state(build_model(task.model, task.lora, task.labels, seed=task.seed).model)
    node = NodeSettings(threads=1, personalize=PersonalizeSettings(mode="probe"), personal_dir=tmp_path / "own")  # type: ignore[arg-type]
    data = load_data(region, task, node)
    passes: list[int] = []
    for module in (client.task, client.personalize):
        real = module.predict_proba_encoded

        def counted(model, ids, *, real=real, **kw):  # type: ignore[no-untyped-def]
            passes.append(len(ids))
            return real(model, ids, **kw)

        monkeypatch.setattr(module, "predict_proba_encoded", counted)
    reply = evaluate_message(region, task, state, keys.TEST, node, data, lambda: None, 0.0)
    report = json.loads((tmp_path / "own" / "north" / PERSONALIZED_REPORT).read_text())
    tests = len(data.data.test)
    # one pass for the reply (the global model) and one for the personalized model, both over the test split
    assert passes.count(tests) == 2 and report["test_macro_f1"]["global"] == pytest.approx(reply.macro_f1)


def test_a_node_without_personalization_settings_refuses_to_personalize(tmp_path: Path, task: ClientTask) -> None:
    region = Region(name="north", data=write_region(tmp_path / "north", 40, 16, seed=3))
    with pytest.raises(NodeConfigError, match="no personalize / personal-dir settings"):
        personalize_node(region, task, {}, NodeSettings(), now=0.0)


def test_a_node_weighing_its_local_only_model_trains_it_with_the_baselines_budget(
    tmp_path: Path, task: ClientTask
) -> None:
    # no simulation baseline on a node: it trains the local-only model itself, as the baseline would, keeps it
    # beside the other two and records whether and why it is served
    from client.local_only import train_local_only
    from common.data import load_region

    region = Region(name="north", data=write_region(tmp_path / "north", 40, 16, seed=3))
    state = adapter_state(build_model(task.model, task.lora, task.labels, seed=task.seed).model)
    settings = PersonalizeSettings(mode="probe", consider_local_only=True)
    node = NodeSettings(threads=1, personalize=settings, personal_dir=tmp_path / "own")
    report = personalize_node(region, task, state, node, now=0.0)

    local = report[keys.LOCAL_ONLY]
    assert local["compared_with"] in ("global", "personalized") and isinstance(local["why"], str)
    assert local["served"] == (report["chosen"] == keys.LOCAL_ONLY)
    kept = load_exported(tmp_path / "own" / "north" / keys.LOCAL_ONLY)
    data = load_region("north", region.data, task.labels)
    again, again_kept = train_local_only(
        "north", data, task.model, task.lora, task.labels, task.train, task.rounds, seed=task.seed
    )
    # the report says which validation checkpoint the served candidate kept, as the baseline's record does
    assert local[KEPT_CHECKPOINT] == again_kept.to_json()
    assert again_kept.number is not None and 1 <= again_kept.number <= again_kept.of
    mine = adapter_state(again.model)
    saved = adapter_state(kept.model)  # type: ignore[arg-type]  # load_exported gives the PeftModel it loaded
    assert all(np.allclose(saved[k], v.numpy(), atol=1e-6) for k, v in mine.items())


def test_a_node_keeps_its_local_only_checkpoint_by_the_runs_early_stopping(tmp_path: Path, task: ClientTask) -> None:
    # a run validating every second round: the node's local-only model is validated where the baseline's is
    # (after rounds 2 and 4 of 4, by the run's metric), not after every round's share
    from client.local_only import train_local_only
    from common.config import EarlyStopping
    from common.data import load_region

    task = replace(task, rounds=4, early_stopping=EarlyStopping(metric="loss", every=2))
    region = Region(name="north", data=write_region(tmp_path / "north", 40, 16, seed=3))
    state = adapter_state(build_model(task.model, task.lora, task.labels, seed=task.seed).model)
    settings = PersonalizeSettings(mode="probe", consider_local_only=True)
    node = NodeSettings(threads=1, personalize=settings, personal_dir=tmp_path / "own")
    report = personalize_node(region, task, state, node, now=0.0)

    data = load_region("north", region.data, task.labels)
    _, baseline = train_local_only(
        "north", data, task.model, task.lora, task.labels, task.train, 4, seed=task.seed, metric="loss", every=2
    )
    assert baseline.of == 2
    assert report[keys.LOCAL_ONLY][KEPT_CHECKPOINT] == baseline.to_json()
    # the task carries the setting to the node and back (a server without it: every round, as before)
    assert ClientTask.from_json(task.to_json()).early_stopping == EarlyStopping(metric="loss", every=2)
    raw = json.loads(task.to_json())
    del raw["early_stopping"]
    assert ClientTask.from_json(json.dumps(raw)).early_stopping == EarlyStopping()
