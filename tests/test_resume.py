"""Resume: a stopped and restarted server goes on after its last checkpoint and ends where a run that never
stopped ends, to the last bit; a different config is refused; failures name the checkpoint they leave.

Most tests run the real ClientApp in this process through a small Grid (seconds); one runs the real Flower
simulation with Ray and is marked slow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from client.app import make_app as make_client_app
from common import keys
from common.config import EarlyStopping, Region, RunConfig, load_config
from common.runfiles import CONFIG_FILE, PERSONALIZED_REPORT, SERVER_ERROR_FILE, STATE_FILE, SUMMARY_FILE
from server.federation import (
    RESUMABLE_CHANGES,
    FederationError,
    FederationResult,
    ResumeError,
    RunState,
    check_resumable,
    config_settings,
    federate,
    fingerprint,
    read_state,
    write_state,
)
from tests.conftest import tiny_config

TRAIN = {"lr": 3e-2, "epochs": 1, "batch_size": 8, "max_steps": 4, "threads": 1}
NODE_BASE = 100  # node id of partition 0 in the local grid


@pytest.fixture(scope="module", autouse=True)
def server_task_identity() -> Iterator[None]:
    """Flower's runtime tells the ServerApp process who it is before the strategy builds any message."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TaskIdentity, "_run_id", 1)
        mp.setattr(TaskIdentity, "_node_id", 0)
        mp.setattr(TaskIdentity, "_task_id", 1)
        yield


class LocalGrid:
    """A Grid that runs the real ClientApp in this process: one node per region, node id 100 + partition id.

    ``failing`` nodes answer with an error, as a ClientApp that raised would. Every message sent is logged as
    (type, round, split). ``node_configs`` gives a node a deployed node's config instead of its partition id.
    """

    def __init__(self, regions: tuple[Region, ...], node_configs: dict[int, dict[str, Any]] | None = None) -> None:
        self.app = make_client_app(regions)
        self.node_ids = [NODE_BASE + i for i in range(len(regions))]
        self.node_configs = node_configs or {}
        self.failing: set[int] = set()
        self.sent: list[tuple[str, int, str | None]] = []
        self.array_records: list[tuple[str | None, list[str]]] = []  # (split, the message's array records)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids do when they push
            config = msg.content.config_records[keys.CONFIG]
            split = config.get(keys.SPLIT)
            self.sent.append((msg.metadata.message_type, int(config[keys.SERVER_ROUND]), split))  # type: ignore[arg-type]
            self.array_records.append((split, sorted(msg.content.array_records)))  # type: ignore[arg-type]
            node = msg.metadata.dst_node_id
            if node in self.failing:
                replies.append(Message(Error(code=0, reason="out of memory"), reply_to=msg))
                continue
            context = Context(
                run_id=1,
                node_id=node,
                node_config=self.node_configs.get(node, {keys.NODE_PARTITION_ID: node - NODE_BASE}),
                state=RecordDict(),
                run_config={},
            )
            replies.append(self.app(msg, context))
        return replies

    def trained_rounds(self) -> list[int]:
        return sorted({rnd for kind, rnd, _ in self.sent if kind == MessageType.TRAIN})


class Crash(Exception):
    """Stands in for the server process dying."""


def config(tmp_path: Path, tiny_bert: Path, two_regions: Path, rounds: int, **extra: Any) -> RunConfig:
    path = tiny_config(
        tmp_path / f"run-{uuid.uuid4().hex[:6]}.yaml", tiny_bert, two_regions, rounds=rounds, train=TRAIN
    )
    cfg = load_config(path)
    return dataclasses.replace(cfg, **extra) if extra else cfg


def run(cfg: RunConfig, out: Path, resume: bool = False, **kwargs: Any) -> tuple[FederationResult, LocalGrid]:
    grid = LocalGrid(cfg.regions)
    return federate(grid, cfg, out, resume=resume, **kwargs), grid  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def reference(tiny_bert: Path, two_regions: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, Path]:
    """Three rounds that were never stopped."""
    root = tmp_path_factory.mktemp("resume-ref")
    cfg = config(root, tiny_bert, two_regions, rounds=3)
    run(cfg, root / "out")
    return cfg, root / "out"


def metrics_lines(out: Path) -> list[str]:
    return (out / "metrics.jsonl").read_text().splitlines()


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def federation(out: Path) -> dict[str, Any]:
    """federation.json without wall times, which differ between any two runs."""
    data = {k: v for k, v in json.loads((out / "federation.json").read_text()).items() if k != "seconds"}
    data["rounds"] = [{k: v for k, v in r.items() if k != "seconds"} for r in data["rounds"]]
    return data


def assert_same_run(out: Path, ref: Path) -> None:
    """``out`` holds exactly what the uninterrupted run in ``ref`` holds: lines, records, adapter bits."""
    lines = metrics_lines(out)
    keys_of = Counter((x["round"], x["region"], x["split"]) for x in map(json.loads, lines))
    assert max(keys_of.values()) == 1, "a metrics line is duplicated"
    assert lines == metrics_lines(ref)
    assert federation(out) == federation(ref)
    assert [r["round"] for r in federation(out)["rounds"]] == [1, 2, 3]
    got, want = adapter(out), adapter(ref)
    assert got.keys() == want.keys()
    assert max(float((got[k] - want[k]).abs().max()) for k in want) == 0.0


# ---------------------------------------------------------------------------------------------------------
# Resume in process


def test_crash_between_checkpoint_and_state_redoes_that_round_only(
    reference: tuple[RunConfig, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, ref = reference
    out = tmp_path / "out"
    real_write = write_state

    def dying_write(out_dir: Path, state: RunState) -> None:
        if state.completed_round == 2:
            raise Crash("killed after the round-2 checkpoint, before its state")
        real_write(out_dir, state)

    monkeypatch.setattr("server.federation.write_state", dying_write)
    with pytest.raises(Crash):
        run(cfg, out)
    monkeypatch.undo()
    state = read_state(out)
    assert state is not None and state.completed_round == 1
    assert (out / "checkpoints" / "round-002" / "adapter_model.safetensors").exists()
    assert any(json.loads(x)["round"] == 2 for x in metrics_lines(out))  # lines the crashed round left behind
    assert not (out / "federation.json").exists()

    _, grid = run(cfg, out, resume=True)
    assert grid.trained_rounds() == [2, 3]
    assert_same_run(out, ref)


def test_more_rounds_on_a_finished_run_go_on_from_its_last_round(
    reference: tuple[RunConfig, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg3, ref = reference
    out = tmp_path / "out"
    cfg2 = dataclasses.replace(cfg3, rounds=2)
    with caplog.at_level("INFO", logger="fedlocale.server"):
        run(cfg2, out, resume=True)  # nothing to resume: a fresh start, said so
    assert f"no {STATE_FILE} in {out}, so the run starts at round 1" in caplog.text
    assert [r["round"] for r in federation(out)["rounds"]] == [1, 2]

    seen: list[int] = []
    _, grid = run(cfg3, out, resume=True, on_round=lambda record: seen.append(record["round"]))
    assert grid.trained_rounds() == [3]
    assert seen == [3]  # on_round is called for the rounds run in this process only
    assert_same_run(out, ref)


def test_resuming_a_finished_run_repeats_only_the_test_evaluation(
    reference: tuple[RunConfig, Path], tmp_path: Path
) -> None:
    cfg, ref = reference
    out = tmp_path / "copy"
    shutil.copytree(ref, out)
    (out / "federation.json").unlink()  # as if the crash came during the final test evaluation
    _, grid = run(cfg, out, resume=True)
    assert {(kind, split) for kind, _, split in grid.sent} == {(MessageType.EVALUATE, keys.TEST)}
    assert_same_run(out, ref)


def test_a_fresh_start_drops_an_older_runs_state(reference: tuple[RunConfig, Path], tmp_path: Path) -> None:
    cfg, ref = reference
    out = tmp_path / "copy"
    shutil.copytree(ref, out)
    grid = LocalGrid(cfg.regions)
    grid.failing.add(NODE_BASE)
    with pytest.raises(FederationError):
        federate(grid, cfg, out)  # type: ignore[arg-type]
    # its rounds would otherwise be resumed on top of this run's checkpoints
    assert read_state(out) is None


# ---------------------------------------------------------------------------------------------------------
# The server optimizer's state (aggregation.optimizer): saved every round, restored on resume

ADAM = {"optimizer": "fedadam", "server_lr": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}


def adam_config(tmp_path: Path, tiny_bert: Path, two_regions: Path, rounds: int = 3) -> RunConfig:
    path = tiny_config(
        tmp_path / f"adam-{uuid.uuid4().hex[:6]}.yaml",
        tiny_bert,
        two_regions,
        rounds=rounds,
        train=TRAIN,
        aggregation={"min_clients": 2, **ADAM},
    )
    return load_config(path)


@pytest.fixture(scope="module")
def adam_reference(
    tiny_bert: Path, two_regions: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[RunConfig, Path]:
    """Three fedadam rounds that were never stopped."""
    root = tmp_path_factory.mktemp("resume-adam")
    cfg = adam_config(root, tiny_bert, two_regions)
    run(cfg, root / "out")
    return cfg, root / "out"


@pytest.fixture(scope="module")
def adam_stopped(adam_reference: tuple[RunConfig, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run, stopped after round 1 (a crash once round 1's state was written)."""
    cfg, _ = adam_reference
    out = tmp_path_factory.mktemp("resume-adam-stopped") / "out"

    def stop_at_one(record: dict[str, Any]) -> None:
        if record["round"] == 1:
            raise Crash("stopped after round 1")

    with pytest.raises(Crash):
        run(cfg, out, on_round=stop_at_one)
    return out


def test_fedadam_stopped_after_round_one_and_resumed_equals_an_uninterrupted_one(
    adam_reference: tuple[RunConfig, Path], adam_stopped: Path, reference: tuple[RunConfig, Path], tmp_path: Path
) -> None:
    cfg, ref = adam_reference
    out = tmp_path / "out"
    shutil.copytree(adam_stopped, out)
    state = read_state(out)
    assert state is not None and state.completed_round == 1 and state.optimizer_state is not None
    saved = state.optimizer_state
    assert saved["file"] == "checkpoints/round-001/server-optimizer.safetensors"
    assert saved["step"] == 1 and saved["optimizer"] == {
        "name": "fedadam",
        **{k: v for k, v in ADAM.items() if k != "optimizer"},
    }
    data = (out / saved["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == saved["sha256"]
    moments = load_file(str(out / saved["file"]))
    names = set(adapter(ref))
    assert set(moments) == {f"{b}/{n}" for b in ("m", "v") for n in names}
    assert all(t.dtype == torch.float64 for t in moments.values())
    assert any(float(t.abs().max()) > 0 for t in moments.values())

    _, grid = run(cfg, out, resume=True)
    assert grid.trained_rounds() == [2, 3]
    assert_same_run(out, ref)
    final = read_state(out)
    assert final is not None and final.optimizer_state is not None and final.optimizer_state["step"] == 3
    # and the optimizer did something: the same rounds under fedavg end elsewhere
    fedavg = adapter(reference[1])
    assert max(float((adapter(ref)[k] - fedavg[k]).abs().max()) for k in fedavg) > 0


def test_a_missing_or_changed_optimizer_state_is_refused(
    adam_reference: tuple[RunConfig, Path], adam_stopped: Path, tmp_path: Path
) -> None:
    cfg, _ = adam_reference

    def copy(name: str) -> tuple[Path, Path]:
        out = tmp_path / name
        shutil.copytree(adam_stopped, out)
        return out, out / "checkpoints" / "round-001" / "server-optimizer.safetensors"

    missing, path = copy("missing")
    path.unlink()
    with pytest.raises(ResumeError, match=f"names the server optimizer state {path}, which is missing"):
        federate(object(), cfg, missing, resume=True)  # type: ignore[arg-type]

    changed, path = copy("changed")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one bit of one moment
    path.write_bytes(bytes(data))
    with pytest.raises(ResumeError, match=r"does not hash to the sha256 state\.json records for it"):
        federate(object(), cfg, changed, resume=True)  # type: ignore[arg-type]

    unnamed, _ = copy("unnamed")
    raw = json.loads((unnamed / STATE_FILE).read_text())
    del raw["optimizer_state"]
    (unnamed / STATE_FILE).write_text(json.dumps(raw))
    with pytest.raises(ResumeError, match="records no server optimizer state, and fedadam cannot go on without"):
        federate(object(), cfg, unnamed, resume=True)  # type: ignore[arg-type]


def test_the_optimizer_and_its_hyperparameters_are_fingerprinted(
    adam_reference: tuple[RunConfig, Path], reference: tuple[RunConfig, Path], tmp_path: Path
) -> None:
    cfg, _ = adam_reference
    fedavg_cfg, _ = reference
    saved_state(cfg, tmp_path)
    other = dataclasses.replace(cfg, aggregation=dataclasses.replace(cfg.aggregation, beta_1=0.5))
    with pytest.raises(ResumeError, match=r"aggregation\.beta_1: 0\.9 when started, 0\.5 now"):
        federate(object(), other, tmp_path, resume=True)  # type: ignore[arg-type]
    # a default filled in is the same setting as the value written out
    implicit = dataclasses.replace(cfg, aggregation=dataclasses.replace(cfg.aggregation, beta_2=None))
    assert fingerprint(config_settings(implicit)) == fingerprint(config_settings(cfg))
    # fedavg is fingerprinted as before optimizers existed (server_lr alone), so that earlier runs still resume
    settings = config_settings(fedavg_cfg)
    assert settings["aggregation.server_lr"] == 1.0
    assert not {"aggregation.optimizer", "aggregation.momentum", "aggregation.beta_1", "aggregation.tau"} & set(
        settings
    )
    assert config_settings(cfg)["aggregation.optimizer"] == "fedadam"


# ---------------------------------------------------------------------------------------------------------
# What may change between a stop and a resume


def saved_state(cfg: RunConfig, out: Path, completed: int = 1) -> None:
    settings = config_settings(cfg)
    rounds = [{"round": r} for r in range(1, completed + 1)]
    write_state(out, RunState(completed, rounds, 1, 0.5, 1.0, fingerprint(settings), settings))


def test_a_different_config_is_refused_naming_both(tmp_path: Path, tiny_bert: Path, two_regions: Path) -> None:
    cfg = config(tmp_path, tiny_bert, two_regions, rounds=3)
    saved_state(cfg, tmp_path)
    changed = dataclasses.replace(cfg, seed=7, train=dataclasses.replace(cfg.train, lr=0.01))
    with pytest.raises(ResumeError) as info:
        federate(object(), changed, tmp_path, resume=True)  # type: ignore[arg-type]
    message = str(info.value)
    before, after = fingerprint(config_settings(cfg)), fingerprint(config_settings(changed))
    assert f"cannot resume {tmp_path}: the config differs from the one the run started with" in message
    assert f"(fingerprint {before} then, {after} now)" in message
    assert "seed: 0 when started, 7 now; train.lr: 0.03 when started, 0.01 now." in message
    assert "restore the config, or start afresh without resume" in message
    assert read_state(tmp_path) is not None  # the refused state is left alone


def test_sgd_momentum_at_its_default_is_the_same_setting_as_null(
    tmp_path: Path, tiny_bert: Path, two_regions: Path
) -> None:
    cfg = config(tmp_path, tiny_bert, two_regions, rounds=3)
    sgd = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, optimizer="sgd"))
    explicit = dataclasses.replace(sgd, train=dataclasses.replace(sgd.train, momentum=0.9))
    other = dataclasses.replace(sgd, train=dataclasses.replace(sgd.train, momentum=0.5))
    assert config_settings(explicit) == config_settings(sgd)
    assert config_settings(other)["train.momentum"] == 0.5
    # a run stopped before the two were one setting recorded 0.9 with its own fingerprint: it still resumes
    older = {**config_settings(sgd), "train.momentum": 0.9}
    write_state(tmp_path, RunState(1, [{"round": 1}], 1, 0.5, 1.0, fingerprint(older), older))
    state = read_state(tmp_path)
    assert state is not None and state.fingerprint != fingerprint(config_settings(sgd))
    check_resumable(state, sgd, tmp_path)
    check_resumable(state, explicit, tmp_path)
    with pytest.raises(ResumeError, match=r"train\.momentum: '\(absent\)' when started, 0\.5 now"):
        check_resumable(state, other, tmp_path)


def test_simulate_refuses_a_different_config_before_starting_anything(
    tmp_path: Path, tiny_bert: Path, two_regions: Path
) -> None:
    from simulations.runner import simulate

    cfg = config(tmp_path, tiny_bert, two_regions, rounds=3)
    saved_state(cfg, tmp_path)
    changed = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, r=8))
    with pytest.raises(ResumeError, match=r"lora\.r: 4 when started, 8 now"):
        simulate(changed, tmp_path, resume=True)
    assert not (tmp_path / CONFIG_FILE).exists()


def test_operational_settings_may_change(tmp_path: Path, tiny_bert: Path, two_regions: Path) -> None:
    cfg = config(tmp_path, tiny_bert, two_regions, rounds=3)
    moved = tmp_path / "moved-north"
    shutil.copytree(cfg.regions[0].data, moved)
    operated = dataclasses.replace(
        cfg,
        name="renamed",
        rounds=9,
        baselines=("centralized",),
        regions=(dataclasses.replace(cfg.regions[0], data=moved), cfg.regions[1]),
        aggregation=dataclasses.replace(cfg.aggregation, round_timeout=5.0, node_timeout=9.0, min_clients=1),
        simulation=dataclasses.replace(cfg.simulation, cpus_per_client=3),
        early_stopping=dataclasses.replace(cfg.early_stopping, every=4),
    )
    assert fingerprint(config_settings(operated)) == fingerprint(config_settings(cfg))
    assert {"aggregation.round_timeout", "aggregation.min_clients", "rounds"} <= set(RESUMABLE_CHANGES)
    # but not the regions themselves, nor their order
    swapped = dataclasses.replace(cfg, regions=cfg.regions[::-1])
    assert fingerprint(config_settings(swapped)) != fingerprint(config_settings(cfg))


def test_rounds_may_change_only_under_the_constant_learning_rate(
    tmp_path: Path, tiny_bert: Path, two_regions: Path
) -> None:
    """Under train.lr_schedule: cosine round r trains at a rate set by r and the number of rounds; a resume with
    another number would go on at the other plan's rates, so it is refused naming rounds."""
    cfg = config(tmp_path, tiny_bert, two_regions, rounds=3)
    more = dataclasses.replace(cfg, rounds=6)
    assert fingerprint(config_settings(more)) == fingerprint(config_settings(cfg))
    cosine = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr_schedule="cosine"))
    assert fingerprint(config_settings(dataclasses.replace(cosine, rounds=6))) != fingerprint(config_settings(cosine))
    settings = config_settings(cosine)
    state = RunState(2, [{"round": 1}, {"round": 2}], 1, 0.5, 1.0, fingerprint(settings), settings)
    with pytest.raises(ResumeError, match=r"rounds: 3 when started, 6 now.*not under a train\.lr_schedule"):
        check_resumable(state, dataclasses.replace(cosine, rounds=6), tmp_path)
    check_resumable(state, cosine, tmp_path)  # the same plan resumes
    # a cosine run started before rounds was fingerprinted recorded no plan: it resumes as it did then
    older = {k: v for k, v in settings.items() if k != "rounds"}
    check_resumable(RunState(2, [{"round": 1}, {"round": 2}], 1, 0.5, 1.0, fingerprint(older), older), cosine, tmp_path)


def test_later_training_settings_at_their_defaults_keep_old_fingerprints(
    tmp_path: Path, tiny_bert: Path, two_regions: Path
) -> None:
    cfg = config(tmp_path, tiny_bert, two_regions, rounds=3)
    settings = config_settings(cfg)
    # a run started before these settings existed saved none of them, and still resumes
    assert not {"train.local_steps", "train.prox_mu", "train.logit_adjust", "train.head", "aggregation.lora"} & set(
        settings
    )
    for train in ({"local_steps": 4, "max_steps": None}, {"prox_mu": 0.1}, {"logit_adjust": 1.0}, {"head": "frozen"}):
        changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))  # type: ignore[arg-type]
        assert fingerprint(config_settings(changed)) != fingerprint(settings), train
    ffa = dataclasses.replace(cfg, aggregation=dataclasses.replace(cfg.aggregation, lora="ffa"))
    assert fingerprint(config_settings(ffa)) != fingerprint(settings)


def test_personalization_may_change_except_the_personal_lora_the_rounds_train(
    tmp_path: Path, tiny_bert: Path, two_regions: Path
) -> None:
    cfg = config(tmp_path, tiny_bert, two_regions, rounds=3)

    def with_personalize(**values: object) -> RunConfig:
        return dataclasses.replace(cfg, personalize=dataclasses.replace(cfg.personalize, **values))  # type: ignore[arg-type]

    probe, dual = with_personalize(mode="probe"), with_personalize(mode="dual", local_r=2)
    assert fingerprint(config_settings(probe)) == fingerprint(config_settings(cfg))  # runs after the rounds
    assert fingerprint(config_settings(with_personalize(mode="probe", local_r=2))) == fingerprint(config_settings(cfg))
    assert fingerprint(config_settings(dual)) != fingerprint(config_settings(cfg))  # trains in the rounds
    assert fingerprint(config_settings(with_personalize(mode="dual", local_r=4))) != fingerprint(config_settings(dual))
    apart = with_personalize(mode="dual", local_r=2, dual_train="apart")  # the global adapter trains otherwise
    assert fingerprint(config_settings(apart)) != fingerprint(config_settings(dual))
    assert config_settings(with_personalize(mode="probe", dual_train="apart")) == config_settings(cfg)
    saved_state(dual, tmp_path)
    with pytest.raises(ResumeError, match="personal_lora_rank: 2 when started, '\\(absent\\)' now"):
        federate(object(), probe, tmp_path, resume=True)  # type: ignore[arg-type]


def test_fewer_rounds_than_already_done_is_refused(tmp_path: Path, tiny_bert: Path, two_regions: Path) -> None:
    cfg = config(tmp_path, tiny_bert, two_regions, rounds=3)
    saved_state(cfg, tmp_path, completed=3)
    with pytest.raises(ResumeError, match="3 rounds already finished but rounds is 2; set rounds to 3 or more"):
        federate(object(), dataclasses.replace(cfg, rounds=2), tmp_path, resume=True)  # type: ignore[arg-type]


def test_a_state_file_written_before_run_keys_existed_still_resumes(tmp_path: Path) -> None:
    raw = {"version": 1, "completed_round": 1, "rounds": [{"round": 1}], "best_round": 1, "best_value": 0.5}
    raw.update({"seconds": 1.0, "fingerprint": "f", "settings": {}})
    assert RunState.from_json(raw, tmp_path / "state.json").run_key == ""
    assert RunState.from_json({**raw, "run_key": "k"}, tmp_path / "state.json").run_key == "k"


def test_a_broken_state_file_is_refused(tmp_path: Path, tiny_bert: Path, two_regions: Path) -> None:
    cfg = config(tmp_path, tiny_bert, two_regions, rounds=3)
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(ResumeError, match=f"cannot resume: {tmp_path / STATE_FILE} cannot be read"):
        federate(object(), cfg, tmp_path, resume=True)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"completed_round": "1"}, r"wrong type: completed_round: '1'"),
        ({"best_value": "high", "settings": []}, r"wrong type: best_value: 'high'; settings: \[\]"),
        ({"best_round": True}, r"wrong type: best_round: True"),
        ({"best_round": 2}, r"says round 2 was the best of 1 finished round"),
        ({"best_round": 0}, r"says round 0 was the best of 1 finished round"),
    ],
)
def test_a_state_file_with_values_of_the_wrong_kind_is_refused_naming_them(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    # a hand-edited or damaged state.json: refused naming the file and the field, not a TypeError mid-resume
    raw = {"version": 1, "completed_round": 1, "rounds": [{"round": 1}], "best_round": 1, "best_value": 0.5}
    raw.update({"seconds": 1.0, "fingerprint": "f", "settings": {}, **change})
    with pytest.raises(ResumeError, match=rf"cannot resume: {tmp_path / 'state.json'} .*{message}"):
        RunState.from_json(raw, tmp_path / "state.json")


def test_a_state_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_bytes(b"\xff\xfe{}")
    with pytest.raises(ResumeError, match=f"cannot resume: {tmp_path / STATE_FILE} cannot be read"):
        read_state(tmp_path)


def test_resume_run_config_key_is_declared_and_read_as_a_flag() -> None:
    import tomllib

    from server.app import run_config_flag

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"][keys.RUN_RESUME] is False  # Flower refuses undeclared -c keys
    assert run_config_flag(True, "resume") and run_config_flag(" TRUE", "resume")
    assert not run_config_flag(False, "resume") and not run_config_flag("false", "resume")
    with pytest.raises(ValueError, match="run config resume: must be true or false, got 'yes'"):
        run_config_flag("yes", "resume")


# ---------------------------------------------------------------------------------------------------------
# Failures name the checkpoint they leave


def test_nodes_that_never_come_back_end_the_run_naming_the_checkpoint(
    tmp_path: Path, tiny_bert: Path, two_regions: Path
) -> None:
    cfg = config(tmp_path, tiny_bert, two_regions, rounds=3)
    cfg = dataclasses.replace(cfg, aggregation=dataclasses.replace(cfg.aggregation, node_timeout=0.05))
    grid = LocalGrid(cfg.regions)

    def lose_south(record: dict[str, Any]) -> None:
        grid.node_ids.remove(NODE_BASE + 1)

    with pytest.raises(FederationError) as info:
        federate(grid, cfg, tmp_path / "out", on_round=lose_south)  # type: ignore[arg-type]
    assert str(info.value).startswith("round 2: 1 node(s) connected, at least 2 needed; gave up after waiting ")
    assert str(info.value).endswith(
        f" s (aggregation.node_timeout); the last checkpoint is {tmp_path / 'out' / 'checkpoints' / 'round-001'} "
        "(restart with resume=true to go on from it)"
    )


def test_too_few_replies_end_the_run_naming_missing_regions_and_the_checkpoint(
    tmp_path: Path, tiny_bert: Path, two_regions: Path
) -> None:
    cfg = config(tmp_path, tiny_bert, two_regions, rounds=3)
    grid = LocalGrid(cfg.regions)

    def break_south(record: dict[str, Any]) -> None:
        grid.failing.add(NODE_BASE + 1)

    with pytest.raises(FederationError) as info:
        federate(grid, cfg, tmp_path / "out", on_round=break_south)  # type: ignore[arg-type]
    checkpoint = tmp_path / "out" / "checkpoints" / "round-001"
    assert str(info.value) == (
        "round 2: 1 region(s) replied, at least 2 needed; missing: south; rejected: south: node failed: out of "
        f"memory; the last checkpoint is {checkpoint} (restart with resume=true to go on from it)"
    )


def test_no_checkpoint_yet_is_said_so(tmp_path: Path, tiny_bert: Path, two_regions: Path) -> None:
    cfg = config(tmp_path, tiny_bert, two_regions, rounds=3)
    grid = LocalGrid(cfg.regions)
    grid.failing.add(NODE_BASE)
    with pytest.raises(FederationError, match=r"; no round had finished, so there is no checkpoint yet$"):
        federate(grid, cfg, tmp_path / "out")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# The real Flower simulation: the server stopped after round 2, then started again


class StopServer(Exception):
    """Raised by on_round to stop the ServerApp the way a crash would."""


@pytest.mark.slow
def test_simulation_stopped_after_round_two_and_resumed_equals_an_uninterrupted_one(
    tiny_bert: Path, two_regions: Path, tmp_path: Path
) -> None:
    """Under fedadam, whose resume restores more than fedavg's (the moments beside the adapter), along the same
    code path: the server optimizer's state is saved and restored for fedavg too. Resuming fedavg runs is checked
    in process, to the last bit, by test_crash_between_checkpoint_and_state_redoes_that_round_only and
    test_more_rounds_on_a_finished_run_go_on_from_its_last_round (the real ClientApp; what the Ray simulation adds
    does not depend on the optimizer)."""
    import ray

    from simulations.runner import simulate

    path = tiny_config(
        tmp_path / "run.yaml",
        tiny_bert,
        two_regions,
        rounds=3,
        train=TRAIN,
        aggregation={"min_clients": 2, **ADAM},
    )
    cfg = load_config(path)

    def quiet(text: str) -> None:
        return None

    simulate(cfg, tmp_path / "whole", say=quiet)

    def stop_at_two(record: dict[str, Any]) -> None:
        if record["round"] == 2:
            raise StopServer("stopped after round 2")

    out = tmp_path / "stopped"
    with pytest.raises(StopServer):
        simulate(cfg, out, on_round=stop_at_two, say=quiet)
    # the server thread ended and Ray is down: nothing of the stopped run goes on
    assert not [t for t in threading.enumerate() if "server_th" in t.name]
    assert not ray.is_initialized()
    state = read_state(out)
    assert state is not None and state.completed_round == 2
    assert not (out / "federation.json").exists()
    assert "StopServer" in (out / SERVER_ERROR_FILE).read_text()

    seen: list[int] = []
    summary = simulate(cfg, out, on_round=lambda record: seen.append(record["round"]), resume=True, say=quiet)
    assert seen == [3]
    assert not (out / SERVER_ERROR_FILE).exists()
    assert_same_run(out, tmp_path / "whole")
    # the resumed run is the same run: it kept its key (the nodes tie what they keep between rounds to it)
    resumed, whole_state = read_state(out), read_state(tmp_path / "whole")
    assert resumed is not None and whole_state is not None
    assert resumed.run_key == state.run_key and len(state.run_key) == 16 and whole_state.run_key != state.run_key
    assert [r["round"] for r in summary.communication["per_round"]] == [1, 2, 3]
    whole = json.loads((tmp_path / "whole" / SUMMARY_FILE).read_text())
    assert summary.communication["per_round"] == whole["communication"]["per_round"]
    assert summary.overall == whole["overall"]


# ---------------------------------------------------------------------------------------------------------
# Validation after every K-th round only (early_stopping.every)


def every_config(tmp_path: Path, tiny_bert: Path, two_regions: Path, patience: int | None = None) -> RunConfig:
    """Three rounds validated after rounds 2 and 3 (every 2nd and the last)."""
    return config(tmp_path, tiny_bert, two_regions, rounds=3, early_stopping=EarlyStopping(patience=patience, every=2))


def test_every_second_round_and_the_last_are_validated_and_only_they_can_be_kept(
    reference: tuple[RunConfig, Path], tiny_bert: Path, two_regions: Path, tmp_path: Path
) -> None:
    _, every_round = reference
    out = tmp_path / "out"
    result, grid = run(every_config(tmp_path, tiny_bert, two_regions), out)
    validated = sorted({rnd for kind, rnd, split in grid.sent if kind == MessageType.EVALUATE and split == keys.VAL})
    assert validated == [2, 3] and grid.trained_rounds() == [1, 2, 3]
    assert result.best_round in (2, 3)
    first = federation(out)["rounds"][0]
    assert (first["val"], first["val_overall"]) == ({}, {})
    assert [r["validated"] for r in federation(out)["rounds"]] == [False, True, True]
    # the training is the same as the every-round run's, and so are the scores of the rounds validated
    lines = [json.loads(x) for x in metrics_lines(out)]
    reference_lines = [json.loads(x) for x in metrics_lines(every_round)]
    assert [x for x in lines if x["split"] == keys.TRAIN] == [x for x in reference_lines if x["split"] == keys.TRAIN]
    assert [x for x in lines if x["split"] == keys.VAL] == [
        x for x in reference_lines if x["split"] == keys.VAL and x["round"] in (2, 3)
    ]


def test_a_run_stopped_before_its_first_validation_resumes_as_if_never_stopped(
    tiny_bert: Path, two_regions: Path, tmp_path: Path
) -> None:
    # patience 1: a resumed run that counted the unvalidated round 1 as one without progress would stop at once
    cfg = every_config(tmp_path, tiny_bert, two_regions, patience=1)
    run(cfg, tmp_path / "whole")

    def stop_at_one(record: dict[str, Any]) -> None:
        if record["round"] == 1:
            raise Crash("killed after round 1")

    out = tmp_path / "out"
    with pytest.raises(Crash):
        run(cfg, out, on_round=stop_at_one)
    state = read_state(out)
    assert state is not None and (state.completed_round, state.best_round) == (1, 0)
    _, grid = run(cfg, out, resume=True)
    assert grid.trained_rounds() == [2, 3]
    assert_same_run(out, tmp_path / "whole")


def test_a_run_cut_to_rounds_none_of_which_was_validated_keeps_its_last_one(
    tiny_bert: Path, two_regions: Path, tmp_path: Path
) -> None:
    cfg = every_config(tmp_path, tiny_bert, two_regions)
    out = tmp_path / "out"

    def stop_at_one(record: dict[str, Any]) -> None:
        if record["round"] == 1:
            raise Crash("killed after round 1")

    with pytest.raises(Crash):
        run(cfg, out, on_round=stop_at_one)
    result, grid = run(dataclasses.replace(cfg, rounds=1), out, resume=True)
    assert result.best_round == 1
    assert {(kind, rnd, split) for kind, rnd, split in grid.sent} == {(MessageType.EVALUATE, 1, keys.TEST)}
    saved = load_file(str(out / "checkpoints" / "round-001" / "adapter_model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in adapter(out).items())


# ---------------------------------------------------------------------------------------------------------
# The final test evaluation and personalize.start


def test_a_node_personalizes_from_the_last_round_when_it_is_not_the_best(
    tiny_bert: Path, two_regions: Path, tmp_path: Path
) -> None:
    settings = tmp_path / "personalize.yaml"
    settings.write_text("mode: probe\nstart: last\nbootstrap: 100\n")
    # a min_delta above any gain keeps round 1 the best while the run goes on to round 3
    cfg = config(tmp_path, tiny_bert, two_regions, rounds=3, early_stopping=EarlyStopping(min_delta=10.0))
    north = {
        keys.NODE_REGION: "north",
        keys.NODE_DATA_DIR: str(two_regions / "north"),
        keys.NODE_PERSONALIZE: str(settings),
        keys.NODE_PERSONAL_DIR: str(tmp_path / "own"),
    }
    grid = LocalGrid(cfg.regions, node_configs={NODE_BASE: north})
    out = tmp_path / "out"
    result = federate(grid, cfg, out)  # type: ignore[arg-type]
    assert result.best_round == 1 and len(result.rounds) == 3
    report = json.loads((tmp_path / "own" / "north" / PERSONALIZED_REPORT).read_text())
    assert (report["round"], report["start_round"]) == (1, 3)
    # a probe refits the head only: the personalized adapter's LoRA is the last round's, not the best round's
    personalized = load_file(str(tmp_path / "own" / "north" / "personalized" / "adapter_model.safetensors"))
    last, best = (load_file(str(out / "checkpoints" / f"round-00{r}" / "adapter_model.safetensors")) for r in (3, 1))
    lora = [k for k in personalized if ".lora_" in k]
    assert lora and all(torch.equal(personalized[k], last[k]) for k in lora)
    assert any(not torch.equal(personalized[k], best[k]) for k in lora)
    # the test evaluation itself, and the run's adapter, are the best round's
    assert all(torch.equal(v, best[k]) for k, v in adapter(out).items())
    # only the test evaluation carries the last round's adapter; training and validation carry the global one
    carried = {(split, tuple(names)) for split, names in grid.array_records}
    assert carried == {(None, (keys.ARRAYS,)), (keys.VAL, (keys.ARRAYS,)), (keys.TEST, (keys.ARRAYS, keys.LAST_ARRAYS))}


def test_a_run_whose_last_round_is_the_best_sends_one_adapter_to_test(
    tiny_bert: Path, two_regions: Path, tmp_path: Path
) -> None:
    cfg = config(tmp_path, tiny_bert, two_regions, rounds=1)
    _, grid = run(cfg, tmp_path / "out")
    assert (keys.TEST, [keys.ARRAYS]) in grid.array_records
    assert all(keys.LAST_ARRAYS not in names for _, names in grid.array_records)


def test_a_test_evaluation_with_half_of_the_last_round_is_refused() -> None:
    from flwr.app import ArrayRecord, ConfigRecord

    from client.app import _last_round

    arrays = ArrayRecord({"w": torch.zeros(2)})
    for content in (
        RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.LAST_ROUND: 3})}),
        RecordDict({keys.ARRAYS: arrays, keys.LAST_ARRAYS: arrays, keys.CONFIG: ConfigRecord()}),
    ):
        msg = Message(content, dst_node_id=NODE_BASE, message_type=MessageType.EVALUATE)
        with pytest.raises(ValueError, match="only one of 'last-round' and 'last-arrays'"):
            _last_round(msg)
    whole = RecordDict({keys.ARRAYS: arrays, keys.LAST_ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.LAST_ROUND: 3})})
    got = _last_round(Message(whole, dst_node_id=NODE_BASE, message_type=MessageType.EVALUATE))
    assert got is not None and got[0] == 3 and torch.equal(got[1]["w"], torch.zeros(2))


def _old_demo(tmp_path: Path) -> Path:
    """configs/demo.yaml as it was at 1772974, with its policies and empty region folders, under ``tmp_path``."""
    repo = Path(__file__).resolve().parents[1]
    configs = tmp_path / "configs"
    shutil.copytree(repo / "configs" / "policies", configs / "policies")
    for region in ("cn-books", "cn-electronics", "cn-hotel", "en-critics", "en-movies"):
        (tmp_path / "data" / "demo" / region).mkdir(parents=True)
        for split in ("train", "test"):
            (tmp_path / "data" / "demo" / region / f"{split}.jsonl").write_text("")
    (configs / "demo.yaml").write_text(DEMO_AT_1772974)
    return configs / "demo.yaml"


def test_the_demo_config_keeps_its_fingerprint_so_its_earlier_runs_resume(tmp_path: Path) -> None:
    """configs/demo.yaml as it was at 1772974 (below, without its comments) has fingerprinted to this value since:
    options added later are fingerprinted only when set, so a demo run started then still resumes under today's
    code. The demo's own settings may change; this old file's fingerprint must not."""
    cfg = load_config(_old_demo(tmp_path))
    assert fingerprint(config_settings(cfg)) == "1967280e2ca3b1d0"


def test_settings_added_later_are_fingerprinted_only_when_set(tmp_path: Path) -> None:
    """model.pooling, dp.train / optimizer / lr / batch_size and train.lr_schedule came after runs with DP settings
    of their own (dp.clip 0.5 here): at their defaults they stay out of the fingerprint, so such runs still resume;
    set, they are in it."""
    demo = _old_demo(tmp_path)
    later = ("model.pooling", "dp.train", "dp.optimizer", "dp.lr", "dp.batch_size", "train.lr_schedule")
    settings = config_settings(load_config(demo, ["dp.clip=0.5"]))
    assert settings["dp.clip"] == 0.5 and not set(later) & set(settings)
    changed = [
        "dp.clip=0.5",
        "model.pooling=mean",
        "dp.train=head",
        "dp.optimizer=sgd",
        "dp.lr=1.0",
        "dp.batch_size=64",
        "train.lr_schedule=cosine",
    ]
    assert set(later) <= set(config_settings(load_config(demo, changed)))


DEMO_AT_1772974 = """\
name: demo
seed: 0
rounds: 3
labels: [neg, pos]
regions_dir: ../data/demo
policies: policies
model:
  base: me5-small
  max_length: 64
lora:
  r: 8
  alpha: 16
  dropout: 0.1
  target_modules: null
train:
  lr: 2.0e-3
  weight_decay: 0.01
  epochs: 1
  batch_size: 16
  grad_clip: 1.0
  warmup_steps: 0
  kl_to_global: 0.0
data:
  val_fraction: 0.1
aggregation:
  method: weighted
  server_lr: 1.0
  min_clients: 2
early_stopping:
  patience: null
  metric: macro_f1
baselines: [centralized, local_only]
personalize:
  mode: dual
  choice: confident
  start: last
simulation:
  cpus_per_client: 2
"""
