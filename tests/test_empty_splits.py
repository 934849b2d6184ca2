"""Empty splits are ordinary input: a region without a val file gets one carved from its train split, and every
path that evaluates, caches, summarises or personalizes takes a split of no examples without failing."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import make_app
from client.personalize import Start, personalize_region
from client.pipeline import carve_val, node_data
from client.task import NodeSettings, train_round
from client.tokens import Encoded, encode_cached
from client.train import encode, evaluate, evaluate_encoded, predict_proba, train_encoded
from common import keys
from common.config import ClientTask, DataSettings, PersonalizeSettings, Region, client_task, load_config
from common.data import Example, RegionData
from common.errors import InputError
from common.model import LoadedModel, adapter_state, build_model
from common.runfiles import PERSONALIZE_ERROR_FILE, PERSONALIZED_REPORT
from fedlocale.cli import main
from runfolder.report import write_report
from runfolder.summary import build_summary, with_personalized
from tests.conftest import tiny_config, write_region

LABELS = ("neg", "pos")


def _without_val(folder: Path) -> Path:
    (folder / "val.jsonl").unlink()
    return folder


@pytest.fixture(scope="module")
def loaded(north_task: ClientTask) -> LoadedModel:
    return build_model(north_task.model, north_task.lora, north_task.labels, seed=0)


# ------------------------------------------------------------------ evaluation of no examples


def test_no_texts_encode_to_no_ids_and_evaluate_to_zero_examples(loaded: LoadedModel, tmp_path: Path) -> None:
    assert encode(loaded.tokenizer, [], 32) == []
    probs = predict_proba(loaded.model, loaded.tokenizer, [], max_length=32, batch_size=8)
    assert probs.shape == (0, 2)
    result = evaluate(loaded.model, loaded.tokenizer, [], 2, max_length=32)
    assert result.num_examples == 0
    assert evaluate_encoded(loaded.model, [], [], 2, pad_id=0).num_examples == 0
    # with and without the node's token cache; an empty split writes no entry
    for cache in (None, tmp_path / "cache"):
        assert encode_cached(loaded.tokenizer, [], 32, LABELS, cache) == Encoded(ids=[], labels=[])
    assert not (tmp_path / "cache").exists()


def test_training_on_no_examples_is_an_input_error_not_a_hang(north_task: ClientTask, loaded: LoadedModel) -> None:
    with pytest.raises(InputError, match="no training examples"):
        train_encoded(loaded.model, [], [], north_task.train, pad_id=0, seed=0)


# ------------------------------------------------------------------ carving a validation split


def _region(labels: list[int]) -> RegionData:
    return RegionData("r", train=[Example(f"text {i}", lb) for i, lb in enumerate(labels)], test=[])


def test_carving_is_stratified_seeded_and_loses_no_example() -> None:
    data = _region([0] * 70 + [1] * 30)
    carved, note = carve_val(data, 0.1, seed=5)
    assert len(carved.val) == carved.val_carved == 10 and len(carved.train) == 90
    assert Counter(ex.label for ex in carved.val) == {0: 7, 1: 3}
    assert sorted(carved.train + carved.val, key=lambda ex: ex.text) == sorted(data.train, key=lambda ex: ex.text)
    assert "val carved from train: 10 of 100 examples" in note and "seed 5" in note
    assert carve_val(data, 0.1, seed=5)[0] == carved  # the same on every process
    assert carve_val(data, 0.1, seed=6)[0].val != carved.val


def test_a_tiny_region_keeps_every_example_for_training() -> None:
    for labels, fraction in (([0, 1, 0, 1, 0], 0.1), ([0], 0.5), ([0, 1], 0.5), ([0, 1] * 10, 0.0)):
        data = _region(labels)
        carved, note = carve_val(data, fraction, seed=0)
        assert carved.train == data.train and carved.val == [] and carved.val_carved == 0
        assert "none carved" in note
    # a label with one example keeps it for training (its remainder would round up): the other label gives more
    carved, _ = carve_val(_region([0] + [1] * 3), 0.5, seed=0)
    assert [ex.label for ex in carved.train] == [0, 1] and [ex.label for ex in carved.val] == [1, 1]


def test_a_region_without_val_file_is_carved_and_weighed_by_what_it_trains_on(
    tmp_path: Path, north_task: ClientTask
) -> None:
    folder = _without_val(write_region(tmp_path / "north", 40, 16, seed=3))
    said: list[str] = []
    data = node_data("north", folder, LABELS, seed=0, settings=DataSettings(), say=said.append).data
    assert (len(data.train), len(data.val), data.val_carved) == (36, 4, 4)
    assert any("val carved from train: 4 of 40" in line for line in said)
    # the FedAvg weight is the size of the train split left after carving
    state = adapter_state(build_model(north_task.model, north_task.lora, north_task.labels, seed=0).model)
    _, result = train_round(Region("north", folder), north_task, state, NodeSettings(threads=1))
    assert result.num_examples == 36
    # a val file that cleaning emptied is the user's split: left empty, nothing carved
    (folder / "val.jsonl").write_text((folder / "train.jsonl").read_text().splitlines()[0] + "\n")
    kept = node_data("north", folder, LABELS, seed=0, settings=DataSettings()).data
    assert (len(kept.train), len(kept.val), kept.val_carved) == (40, 0, 0)


def test_the_task_carries_the_fraction_to_the_node(tmp_path: Path, tiny_bert: Path) -> None:
    regions = tmp_path / "regions"
    write_region(regions / "north", 40, 16, seed=3)
    write_region(regions / "south", 40, 16, seed=4)
    cfg = load_config(tiny_config(tmp_path / "run.yaml", tiny_bert, regions, data={"val_fraction": 0.25}))
    task = ClientTask.from_json(client_task(cfg, 1).to_json())
    assert task.data == DataSettings(val_fraction=0.25)


def test_the_fraction_is_fingerprinted_only_when_it_is_not_the_default(tmp_path: Path, tiny_bert: Path) -> None:
    from server.federation import config_settings

    regions = tmp_path / "regions"
    write_region(regions / "north", 40, 16, seed=3)
    write_region(regions / "south", 40, 16, seed=4)
    default = config_settings(load_config(tiny_config(tmp_path / "a.yaml", tiny_bert, regions)))
    assert "data.val_fraction" not in default  # runs started before the setting existed still resume
    other = config_settings(
        load_config(tiny_config(tmp_path / "b.yaml", tiny_bert, regions, data={"val_fraction": 0.2}))
    )
    assert other == {**default, "data.val_fraction": 0.2}


# ------------------------------------------------------------------ through the CLI


def test_check_says_which_region_gets_a_carved_val_split(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    regions = tmp_path / "regions"
    write_region(regions / "north", 40, 16, seed=3)
    _without_val(write_region(regions / "south", 40, 16, seed=4))
    cfg = tiny_config(tmp_path / "run.yaml", tiny_bert, regions)
    assert main(["check", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "south: no val split: val carved from train: 4 of 40 examples" in out
    assert "north: no val split" not in out
    assert main(["check", str(cfg), "--set", "data.val_fraction=0"]) == 0
    assert "south: no val split and none carved (data.val_fraction is 0)" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["0.7", "-0.1", ".nan", "lots"])
def test_a_bad_val_fraction_is_refused_naming_the_field(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    regions = tmp_path / "regions"
    write_region(regions / "north", 40, 16, seed=3)
    cfg = tiny_config(tmp_path / "run.yaml", tiny_bert, regions, aggregation={"min_clients": 1})
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["check", str(cfg), "--set", f"data.val_fraction={value}"]) == 2
    assert "data.val_fraction" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# ------------------------------------------------------------------ a node's evaluate message on no examples


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are built as the server builds them (see tests/test_client_reply.py)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.mark.usefixtures("server_identity")
def test_a_node_answers_an_evaluation_of_an_empty_split_with_zero_examples(
    tmp_path: Path, north_task: ClientTask
) -> None:
    folder = _without_val(write_region(tmp_path / "north", 40, 16, seed=3))
    (folder / "test.jsonl").write_text("")  # a test split of no rows
    personalize = tmp_path / "personalize.yaml"
    personalize.write_text("mode: probe\n")
    node_config: dict[str, str | int] = {
        keys.NODE_REGION: "north",
        keys.NODE_DATA_DIR: str(folder),
        keys.NODE_THREADS: 1,
        keys.NODE_CACHE_DIR: str(tmp_path / "cache"),
        keys.NODE_PERSONALIZE: str(personalize),
        keys.NODE_PERSONAL_DIR: str(tmp_path / "own"),
    }
    task = replace(north_task, data=DataSettings(val_fraction=0.0))  # no val file, nothing carved
    state = adapter_state(build_model(task.model, task.lora, task.labels, seed=0).model)
    app = make_app()
    for split in (keys.VAL, keys.TEST):
        config = ConfigRecord({keys.TASK: task.to_json(), keys.SERVER_ROUND: 1, keys.SPLIT: split})
        content = RecordDict({keys.ARRAYS: ArrayRecord(state), keys.CONFIG: config})
        message = Message(content=content, dst_node_id=77, message_type=MessageType.EVALUATE)
        context = Context(run_id=1, node_id=77, node_config=dict(node_config), state=RecordDict(), run_config={})
        reply = app(message, context)
        assert not reply.has_error(), reply.error
        metrics = next(r for r in reply.content.values() if isinstance(r, MetricRecord))
        assert metrics[keys.NUM_EXAMPLES] == 0
    # personalization after the test message ran; its choice says why it compared nothing
    report = json.loads((tmp_path / "own" / "north" / PERSONALIZED_REPORT).read_text())
    assert report["chosen"] == "personalized" and report["val_examples"] == 0 and "choice_skipped" in report
    assert not (tmp_path / "own" / "north" / PERSONALIZE_ERROR_FILE).exists()


def test_personalization_without_validation_records_why_it_chose(north_task: ClientTask, loaded: LoadedModel) -> None:
    data = RegionData("north", train=[Example(f"good {i}", i % 2) for i in range(8)], test=[])
    _, record = personalize_region(
        "north",
        data,
        loaded,
        PersonalizeSettings(mode="probe"),
        north_task.train,
        Encoded(ids=[], labels=[]),
        max_length=32,
        seed=0,
        start=Start(loaded, 1),
    )
    entry = record.to_json()
    assert entry["chosen"] == "personalized" and entry["val_examples"] == 0 and "val_macro_f1" not in entry
    assert "accuracy" not in entry  # no test examples, no test score


# ------------------------------------------------------------------ the run's summary


def _federation(test: dict[str, dict[str, float]]) -> dict[str, Any]:
    """A federation record of one round whose final test scores are ``test``."""
    return {
        "test": test,
        "rounds": [],
        "best_round": 1,
        "stopped_early": False,
        "adapter_bytes": 1,
        "full_model_bytes": 2,
        "seconds": 1.0,
    }


def test_a_region_without_test_examples_has_no_scores_and_no_weight(tmp_path: Path, tiny_bert: Path) -> None:
    regions = tmp_path / "regions"
    write_region(regions / "north", 40, 16, seed=3)
    write_region(regions / "south", 40, 16, seed=4)
    cfg = load_config(tiny_config(tmp_path / "run.yaml", tiny_bert, regions))
    one = [Example("x", 0)]
    data = {
        "north": RegionData("north", train=one, test=one * 4),
        "south": RegionData("south", train=one, test=[], val=one, val_carved=1),
    }
    zero = {"accuracy": 0.0, "macro_f1": 0.0, "loss": 0.0, "num_examples": 0}
    north = {"accuracy": 0.75, "macro_f1": 0.5, "loss": 0.1, "num_examples": 4}
    federation = _federation({"north": north, "south": zero})
    summary = build_summary(cfg, data, federation, {}, 1.0, "run.yaml")
    assert keys.FEDERATED not in summary.regions["south"]
    assert summary.regions["south"]["val_carved_from_train"] == 1
    assert summary.overall[keys.FEDERATED] == {"accuracy": 0.75, "macro_f1": 0.5}
    # personalization of a region without test examples carries no score into the overall mean
    entries = {
        "north": {"accuracy": 1.0, "macro_f1": 1.0, "seconds": 1.0},
        "south": {"mode": "probe", "seconds": 1.0},
    }
    assert with_personalized(summary, entries).overall[keys.PERSONALIZED] == {"accuracy": 1.0, "macro_f1": 1.0}
    # no region with a test example: no overall score at all rather than a 0.0
    data["north"] = RegionData("north", train=one, test=[])
    federation["test"]["north"] = zero
    empty = build_summary(cfg, data, federation, {}, 1.0, "run.yaml")
    assert empty.overall == {}
    # the report renders both: a region without scores reads n/a, a run without any score says so
    assert "| south | 1 | 0 | n/a | n/a |" in write_report(tmp_path / "some", summary, []).read_text()
    assert "No test scores were recorded." in write_report(tmp_path / "none", empty, []).read_text()


def test_the_pooled_score_covers_every_region_with_test_examples_and_only_those(
    tmp_path: Path, tiny_bert: Path
) -> None:
    """A region without test examples (its baseline scores carry an empty matrix) adds nothing to the pooled
    macro-F1, and a mode that did not score every region with test examples gets none (it would pool fewer
    examples than the others)."""
    regions = tmp_path / "regions"
    for name, seed in (("north", 3), ("south", 4), ("west", 5)):
        write_region(regions / name, 40, 16, seed=seed)
    cfg = load_config(tiny_config(tmp_path / "run.yaml", tiny_bert, regions))
    one = [Example("x", 0)]
    data = {
        "north": RegionData("north", train=one, test=one * 4),
        "south": RegionData("south", train=one, test=[]),
        "west": RegionData("west", train=one, test=one * 2),
    }
    empty = {"accuracy": 0.0, "macro_f1": 0.0, "loss": 0.0, "num_examples": 0}
    federation = _federation(
        {
            "north": {"accuracy": 0.75, "macro_f1": 0.4, "loss": 0.1, "num_examples": 4},
            "south": empty,
            "west": {"accuracy": 1.0, "macro_f1": 1.0, "loss": 0.1, "num_examples": 2},
        }
    )
    # north: 3 of its 4 negatives right; west: both of its positives right
    north, west = [[3, 1], [0, 0]], [[0, 0], [0, 2]]
    baselines = {
        keys.LOCAL_ONLY: (
            {
                "north": {"accuracy": 0.75, "macro_f1": 0.4, "confusion": north},
                "south": {**empty, "confusion": []},
                "west": {"accuracy": 1.0, "macro_f1": 1.0, "confusion": west},
            },
            1.0,
        ),
        # a centralized run that scored north only
        keys.CENTRALIZED: ({"north": {"accuracy": 0.75, "macro_f1": 0.4, "confusion": north}}, 1.0),
    }
    summary = build_summary(
        cfg, data, federation, baselines, 1.0, "run.yaml", federated_confusion={"north": north, "west": west}
    )
    # pooled: 3 true neg, 1 neg read as pos, 2 true pos -> F1(neg) = 6/7, F1(pos) = 4/5
    expected = (6 / 7 + 4 / 5) / 2
    assert summary.overall[keys.FEDERATED]["pooled_macro_f1"] == pytest.approx(expected)
    assert summary.overall[keys.LOCAL_ONLY]["pooled_macro_f1"] == pytest.approx(expected)
    assert "pooled_macro_f1" not in summary.overall[keys.CENTRALIZED]
    assert summary.regions["north"][keys.FEDERATED]["confusion"] == north
    # the served models pool the same way; a personalization that skipped west gets no pooled score
    served: dict[str, dict[str, Any]] = {
        "north": {"accuracy": 0.75, "macro_f1": 0.4, "confusion": north, "seconds": 1.0}
    }
    partial = with_personalized(summary, served)
    assert "pooled_macro_f1" not in partial.overall[keys.PERSONALIZED]
    served["west"] = {"accuracy": 1.0, "macro_f1": 1.0, "confusion": west, "seconds": 1.0}
    served["south"] = {"mode": "probe", "seconds": 1.0}
    whole = with_personalized(summary, served)
    assert whole.overall[keys.PERSONALIZED]["pooled_macro_f1"] == pytest.approx(expected)
    # the report states them under its results table (centralized has none)
    text = write_report(tmp_path / "report", whole, []).read_text()
    assert "test examples pooled" in text and "federated 0.829, personalized 0.829, local-only 0.829." in text


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.1, 0.0])
def test_a_simulation_with_a_region_without_val_runs_cleanly(
    tmp_path: Path,
    tiny_bert: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    fraction: float,
) -> None:
    """South has train and test only: with the default fraction it validates on 4 carved examples, with 0 on none
    (its evaluation replies carry 0 examples, early stopping reads north alone)."""
    regions = tmp_path / "regions"
    write_region(regions / "north", 48, 24, seed=1)
    _without_val(write_region(regions / "south", 40, 24, seed=2))
    cfg = tiny_config(
        tmp_path / "run.yaml",
        tiny_bert,
        regions,
        baselines=["centralized", "local_only"],
        personalize={"mode": "probe"},
        early_stopping={"patience": 1},
        data={"val_fraction": fraction},
    )
    assert main(["simulate", str(cfg), "--out", str(tmp_path / "out")]) == 0
    captured = capfd.readouterr()
    # the processes' output and the run's log records: no traceback, no node failure, no rejected reply
    assert "Traceback" not in captured.out + captured.err + caplog.text
    assert "node failed" not in caplog.text and "rejected reply" not in caplog.text
    carved = 4 if fraction else 0
    said = "val carved from train: 4 of 40 examples" if fraction else "none carved (data.val_fraction is 0)"
    assert f"south: no val split{':' if fraction else ' and'} {said}" in captured.out + captured.err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    south = summary["regions"]["south"]
    assert (south["num_train"], south["num_val"], south.get("val_carved_from_train", 0)) == (
        40 - carved,
        carved,
        carved,
    )
    # what the federation weighed south by is what it trained on, every round
    federation = json.loads((tmp_path / "out" / "federation.json").read_text())
    assert {r["train"]["south"]["num_examples"] for r in federation["rounds"]} == {40 - carved}
    assert {r["val"]["south"]["num_examples"] for r in federation["rounds"]} == {carved}
    for mode in (keys.FEDERATED, keys.CENTRALIZED, keys.LOCAL_ONLY, keys.PERSONALIZED):
        assert 0.0 <= south[mode]["macro_f1"] <= 1.0, mode
    assert (south[keys.PERSONALIZED]["chosen"], "choice_skipped" in south[keys.PERSONALIZED]) in (
        ("personalized", not fraction),
        ("global", False),
    )
