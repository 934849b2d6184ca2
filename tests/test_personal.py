"""personalize.mode dual: a personal LoRA trained alongside the global adapter in every round, kept on the node
(client.personal, client.task.train_dual) and stacked onto the final global adapter (client.personalize)."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from client.personal import (
    FROM_ROUND,
    PersonalStateError,
    Slices,
    clear_personal,
    init_personal,
    join,
    latest_personal,
    personal_folder,
    personal_tag,
    read_metadata,
    round_file,
    save_personal,
    split,
    widen,
)
from client.personalize import personalize, stack
from client.task import NodeSettings, train_dual, train_round
from common.config import ClientTask, LoraSettings, PersonalizeSettings, Region, RunConfig, TrainSettings
from common.data import load_region
from common.errors import ConfigError
from common.model import LoadedModel, adapter_state, build_model, load_adapter_state
from tests.conftest import perturb, write_region

RANK = 2
TEXTS = ["good movie", "the hotel room was very bad", "love it", "awful and sad phone"]


def _logits(loaded: LoadedModel, model: torch.nn.Module | None = None) -> torch.Tensor:
    model = model or loaded.model
    model.eval()
    with torch.no_grad():
        return model(**loaded.tokenizer(TEXTS, padding=True, return_tensors="pt")).logits  # type: ignore[no-any-return]


@pytest.fixture()
def global_model(north_task: ClientTask) -> LoadedModel:
    return perturb(build_model(north_task.model, north_task.lora, north_task.labels, seed=0), seed=7)


def test_join_and_split_are_inverse_and_keep_the_head(global_model: LoadedModel) -> None:
    state = adapter_state(global_model.model)
    personal = init_personal(state, RANK, seed=1)
    wide = join(state, personal)
    for key, value in state.items():
        if ".lora_A." in key:
            assert wide[key].shape == (value.shape[0] + RANK, value.shape[1])
        elif ".lora_B." in key:
            assert wide[key].shape == (value.shape[0], value.shape[1] + RANK)
        else:
            assert wide[key] is value
    back, again = split(wide, rank=global_model.model.peft_config["default"].r)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert again.keys() == personal.keys() and all(torch.equal(again[k], personal[k]) for k in personal)
    with pytest.raises(ValueError, match="personal LoRA does not match the global adapter: missing"):
        join(state, dict(list(personal.items())[1:]))


def test_fresh_personal_slices_are_seeded_and_change_nothing(global_model: LoadedModel, north_task: ClientTask) -> None:
    state = adapter_state(global_model.model)
    personal = init_personal(state, RANK, seed=3)
    assert all(torch.equal(v, init_personal(state, RANK, seed=3)[k]) for k, v in personal.items())
    assert not torch.equal(next(iter(personal.values())), next(iter(init_personal(state, RANK, seed=4).values())))
    for key, value in personal.items():
        if ".lora_B." in key:
            assert not value.any()
        else:  # peft's own A init: Kaiming uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            assert value.abs().max() <= 1 / math.sqrt(value.shape[1]) and value.std() > 0
    wide = build_model(north_task.model, widen(north_task.lora, RANK), north_task.labels, seed=0)
    load_adapter_state(wide.model, join(state, personal))
    assert torch.allclose(_logits(wide), _logits(global_model), atol=1e-5)


def test_widen_keeps_the_scale_and_the_config_refuses_one_it_cannot_keep(tmp_path: Path) -> None:
    wide = widen(LoraSettings(r=8, alpha=16), 4)
    assert (wide.r, wide.alpha) == (12, 24)
    with pytest.raises(ValueError, match=r"personalize\.local_r=2: .* got alpha=5, r=4"):
        widen(LoraSettings(r=4, alpha=5), 2)
    region = write_region(tmp_path / "r", 8, 4, seed=1)
    with pytest.raises(ConfigError, match=r"personalize\.local_r"):
        RunConfig(
            regions=(Region("r", region),),
            labels=("neg", "pos"),
            lora=LoraSettings(r=4, alpha=5),
            personalize=PersonalizeSettings(mode="dual", local_r=2),
        )


def test_kept_rounds_are_found_by_round_and_tag_and_checked(tmp_path: Path, global_model: LoadedModel) -> None:
    state = adapter_state(global_model.model)
    folder = tmp_path / "north" / "personal-lora"
    assert latest_personal(folder, before=5, tag="t", global_state=state) is None
    for server_round, seed in ((1, 1), (2, 2)):
        save_personal(folder, Slices(init_personal(state, RANK, seed), server_round), "t", from_round=server_round - 1)
    save_personal(folder, Slices(init_personal(state, RANK, 3), 3), "another run", from_round=0)
    assert sorted(p.name for p in folder.iterdir()) == [f"round-00{i}.safetensors" for i in (1, 2, 3)]  # no tmp

    newest = latest_personal(folder, before=5, tag="t", global_state=state)  # round 3 is another run's
    assert newest is not None and newest.round == 2
    assert all(torch.equal(newest.tensors[k], v) for k, v in init_personal(state, RANK, 2).items())
    earlier = latest_personal(folder, before=2, tag="t", global_state=state)  # round 2 trained again: from 1
    assert earlier is not None and earlier.round == 1 and read_metadata(round_file(folder, 2))[FROM_ROUND] == "1"

    wrong = init_personal(state, RANK, 0)
    wrong[next(iter(wrong))] = torch.zeros(RANK, 3)  # an A slice whose input size is not the layer's
    save_personal(folder, Slices(wrong, 4), "t", from_round=3)
    with pytest.raises(PersonalStateError, match=r"round-004\.safetensors: does not fit the global adapter"):
        latest_personal(folder, before=5, tag="t", global_state=state)
    round_file(folder, 4).write_bytes(b"not a safetensors file")
    with pytest.raises(PersonalStateError, match=r"round-004\.safetensors: not a readable personal LoRA file"):
        latest_personal(folder, before=5, tag="t", global_state=state)
    other_rank = init_personal(state, RANK + 1, 0)
    save_personal(folder, Slices(other_rank, 4), "t", from_round=3)
    with pytest.raises(PersonalStateError, match=r"the slices have rank \[3\], expected 2"):
        latest_personal(folder, before=5, tag="t", global_state=state, rank=RANK)
    flat = {k: v.flatten() for k, v in init_personal(state, RANK, 0).items()}  # readable, but not matrices
    save_personal(folder, Slices(flat, 4), "t", from_round=3)
    with pytest.raises(PersonalStateError, match="has shape"):
        latest_personal(folder, before=5, tag="t", global_state=state)
    (folder / "round-005.tmp").write_bytes(b"half written")
    clear_personal(folder)
    assert not list(folder.iterdir())


def test_the_node_personalizes_with_the_slices_of_the_round_it_is_given(
    tmp_path: Path, global_model: LoadedModel, north_task: ClientTask
) -> None:
    from client.task import personalize_node

    region = Region(name="north", data=write_region(tmp_path / "north", 30, 10, seed=4))
    state = adapter_state(global_model.model)
    settings = PersonalizeSettings(mode="dual", local_r=RANK, bootstrap=100)
    node = NodeSettings(threads=1, personalize=settings, personal_dir=tmp_path / "own", personal_rank=RANK)
    folder = personal_folder(tmp_path / "own", "north")
    tag = personal_tag("north", north_task.run_key, north_task.model.base, north_task.lora.r, RANK)
    for server_round in (1, 2, 3):
        save_personal(folder, Slices(init_personal(state, RANK, server_round), server_round), tag, server_round - 1)
    # the test evaluation carries the best round's adapter (here round 2): its partner is round 2's slices,
    # not the newest; a best round the node missed falls back to the newest before it
    report = personalize_node(region, replace(north_task, server_round=2), state, node, now=0.0)
    assert (report["mode"], report["start_round"], report["personal_round"]) == ("dual", 2, 2)
    # with personalize.start last it starts from the last round's adapter, sent beside the best one, and its slices
    last_state = adapter_state(perturb(build_model(north_task.model, north_task.lora, north_task.labels, 0), 9).model)
    from_last = replace(node, personalize=replace(settings, start="last"))
    task = replace(north_task, server_round=2)
    last = personalize_node(region, task, state, from_last, now=0.0, last=(3, last_state))
    assert (last["start_round"], last["personal_round"]) == (3, 3)
    assert last["val_macro_f1"]["global"] == report["val_macro_f1"]["global"]  # compared with the best round's
    stacked = load_file(str(tmp_path / "own" / "north" / "personalized" / "adapter_model.safetensors"))
    a_key = next(k for k in stacked if "lora_A" in k)
    global_a = next(v for k, v in last_state.items() if k.replace(".default", "") == a_key)
    assert torch.equal(stacked[a_key][: north_task.lora.r], global_a)  # the saved adapter stacks the last round's
    # a node that missed the last round stacks its newest slices onto that round's adapter
    round_file(folder, 3).unlink()
    missed = personalize_node(region, task, state, from_last, now=0.0, last=(3, last_state))
    assert (missed["start_round"], missed["personal_round"]) == (3, 2)
    # start best ignores the last round's adapter
    assert personalize_node(region, task, state, node, now=0.0, last=(3, last_state))["start_round"] == 2
    round_file(folder, 2).unlink()
    assert personalize_node(region, replace(north_task, server_round=2), state, node, now=0.0)["personal_round"] == 1


def _kept(folder: Path, server_round: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(round_file(folder, server_round))).items()}  # not the mapped file


def test_train_dual_sends_the_global_adapter_and_keeps_its_own(
    tmp_path: Path, north_task: ClientTask, caplog: pytest.LogCaptureFixture
) -> None:
    region = Region(name="north", data=write_region(tmp_path / "north", 32, 8, seed=3))
    state = adapter_state(build_model(north_task.model, north_task.lora, north_task.labels, seed=0).model)
    node = NodeSettings(threads=1, personal_dir=tmp_path / "own", personal_rank=RANK)
    folder = personal_folder(tmp_path / "own", "north")
    tag = personal_tag("north", north_task.run_key, north_task.model.base, north_task.lora.r, RANK)
    round2 = replace(north_task, server_round=2)

    sent, result = train_dual(region, north_task, state, node)
    assert result.num_examples == 32
    assert {k: v.shape for k, v in sent.items()} == {k: v.shape for k, v in state.items()}
    assert any(not torch.equal(sent[k], state[k]) for k in state)  # the global part trained
    first = _kept(folder, 1)
    assert read_metadata(round_file(folder, 1)) == {"tag": tag, "round": "1", FROM_ROUND: "0"}
    assert any(v.any() for k, v in first.items() if ".lora_B." in k)  # so did its own (B starts at 0)

    # round 2 continues round 1's slices, and that changes what it sends: a node without them sends otherwise
    continued, _ = train_dual(region, round2, sent, node)
    assert read_metadata(round_file(folder, 2))[FROM_ROUND] == "1"
    fresh_node = replace(node, personal_dir=tmp_path / "fresh")
    fresh, _ = train_dual(region, round2, sent, fresh_node)
    assert read_metadata(round_file(personal_folder(tmp_path / "fresh", "north"), 2))[FROM_ROUND] == "0"
    assert any(not torch.allclose(continued[k], fresh[k]) for k in sent)

    # round 2 trained again (after a failure) starts from round 1 again, so it ends exactly as the first time
    kept2 = _kept(folder, 2)
    train_dual(region, round2, sent, node)
    assert all(torch.equal(_kept(folder, 2)[k], v) for k, v in kept2.items())

    # a kept file that cannot be used is logged with its path and the slices start afresh
    round_file(folder, 1).write_bytes(b"broken")
    with caplog.at_level("WARNING", logger="fedlocale.node"):
        train_dual(region, round2, sent, node)
    assert str(round_file(folder, 1)) in caplog.text and "starts afresh in round 2" in caplog.text
    assert read_metadata(round_file(folder, 2))[FROM_ROUND] == "0"

    # another run's slices are never continued, even by a node that missed that run's round 1
    train_dual(region, replace(round2, run_key="another run"), sent, node)
    assert read_metadata(round_file(folder, 2))[FROM_ROUND] == "0"

    # round 1 of a (new) run clears the folder and starts from the same seeded slices
    train_dual(region, north_task, state, node)
    assert sorted(p.name for p in folder.iterdir()) == ["round-001.safetensors"]
    assert all(torch.equal(_kept(folder, 1)[k], v) for k, v in first.items())

    # the personal part changes what the global part learns: the sent update is not plain training's
    plain, _ = train_round(region, north_task, state, NodeSettings(threads=1))
    assert any(not torch.allclose(plain[k], sent[k]) for k in state)


def test_dual_apart_sends_what_plain_training_sends_and_trains_only_its_own_slices(
    tmp_path: Path, north_task: ClientTask
) -> None:
    """dual_train apart: the global adapter trains alone (the reply equals train_round's to the bit), and the
    slices train on top of the received global adapter, which stays as it was with the head."""
    region = Region(name="north", data=write_region(tmp_path / "north", 32, 8, seed=3))
    state = adapter_state(build_model(north_task.model, north_task.lora, north_task.labels, seed=0).model)
    node = NodeSettings(threads=1, personal_dir=tmp_path / "own", personal_rank=RANK, personal_apart=True)
    folder = personal_folder(tmp_path / "own", "north")

    sent, result = train_dual(region, north_task, state, node)
    plain, plain_result = train_round(region, north_task, state, NodeSettings(threads=1))
    assert sent.keys() == plain.keys() and all(torch.equal(sent[k], plain[k]) for k in plain)
    assert result == plain_result

    fresh = init_personal(state, RANK, seed=0)  # only for its keys and shapes
    first = _kept(folder, 1)
    assert first.keys() == fresh.keys() and all(first[k].shape == fresh[k].shape for k in fresh)
    assert any(v.any() for k, v in first.items() if ".lora_B." in k)  # B starts at 0: the slices trained

    # round 2 continues them on top of round 1's reply; the reply is still plain training's
    round2 = replace(north_task, server_round=2)
    again, _ = train_dual(region, round2, sent, node)
    plain2, _ = train_round(region, round2, sent, NodeSettings(threads=1))
    assert all(torch.equal(again[k], plain2[k]) for k in plain2)
    assert read_metadata(round_file(folder, 2))[FROM_ROUND] == "1"
    assert any(not torch.equal(_kept(folder, 2)[k], first[k]) for k in first)


def test_the_slices_trained_apart_move_only_the_personal_part(tmp_path: Path, north_task: ClientTask) -> None:
    """What ``_trained_apart`` trains: the global rows and columns and the head stay as received to the bit,
    and both personal matrices move; ``train_dual`` keeps exactly these slices, trained on the received adapter."""
    from client.pipeline import node_data
    from client.task import _trained_apart, encode_split, global_model
    from common.seeds import derive_seed

    region = Region(name="north", data=write_region(tmp_path / "north", 24, 8, seed=5))
    state = adapter_state(perturb(build_model(north_task.model, north_task.lora, north_task.labels, seed=0), 7).model)
    wide = replace(north_task, lora=widen(north_task.lora, RANK))
    start = init_personal(state, RANK, seed=derive_seed(north_task.seed, "personal", "north"))
    data = node_data(region.name, region.data, north_task.labels, None, seed=0, settings=north_task.data)
    node = NodeSettings(threads=1)
    stacked = global_model(wide, join(state, start))
    encoded = encode_split(stacked, data.train, north_task, node)
    kept, personal = split(_trained_apart(region, wide, stacked, encoded, north_task.lora.r, node), north_task.lora.r)
    assert kept.keys() == state.keys() and all(torch.equal(kept[k], state[k]) for k in state)
    moved = {k for k in personal if not torch.equal(personal[k], start[k])}
    assert any(".lora_A." in k for k in moved) and any(".lora_B." in k for k in moved)

    apart = replace(node, personal_dir=tmp_path / "own", personal_rank=RANK, personal_apart=True)
    train_dual(region, north_task, state, apart)
    mine = _kept(personal_folder(tmp_path / "own", "north"), 1)
    assert mine.keys() == personal.keys() and all(torch.equal(mine[k], personal[k]) for k in personal)


def test_dual_personalization_stacks_the_slices_and_probes_the_head(
    tmp_path: Path, global_model: LoadedModel, north_task: ClientTask
) -> None:
    data = load_region("r", write_region(tmp_path / "r", 40, 20, seed=5), global_model.labels)
    personal = {
        k: 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(2))
        for k, v in init_personal(adapter_state(global_model.model), RANK, seed=0).items()
    }
    settings = PersonalizeSettings(mode="dual", local_r=RANK)
    train = TrainSettings(batch_size=8, threads=1)
    with pytest.raises(ValueError, match="dual needs the region's personal LoRA"):
        personalize(global_model, data, settings, train, max_length=32, seed=0)

    before = _logits(global_model)
    result = personalize(global_model, data, settings, train, max_length=32, seed=0, personal=personal)
    assert torch.equal(_logits(global_model), before), "the global model must stay untouched"
    assert result.train.steps == 0 and result.loaded.model.peft_config["default"].r == north_task.lora.r + RANK
    got, stacked = adapter_state(result.loaded.model), adapter_state(stack(global_model, personal))
    for key, value in stacked.items():
        if ".lora_" in key:  # the adapter is the stacked one, bit for bit; only the head was refit
            assert torch.equal(got[key], value)
    assert any(not torch.equal(got[k], v) for k, v in stacked.items() if ".lora_" not in k)
    # the stacked adapter computes the wide model that trained it
    wide = build_model(north_task.model, widen(north_task.lora, RANK), north_task.labels, seed=0)
    load_adapter_state(wide.model, join(adapter_state(global_model.model), personal))
    assert torch.allclose(_logits(global_model, stack(global_model, personal)), _logits(wide), atol=1e-5)


def test_personalization_starts_from_start_and_is_compared_with_the_global_model(
    tmp_path: Path, global_model: LoadedModel, north_task: ClientTask
) -> None:
    from client.train import evaluate

    data = load_region("r", write_region(tmp_path / "r", 40, 20, seed=5), global_model.labels)
    last = perturb(build_model(north_task.model, north_task.lora, north_task.labels, seed=0), seed=11)
    personal = {
        k: 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(2))
        for k, v in init_personal(adapter_state(global_model.model), RANK, seed=0).items()
    }
    settings = PersonalizeSettings(mode="dual", local_r=RANK, bootstrap=100)
    train = TrainSettings(batch_size=8, threads=1)
    result = personalize(global_model, data, settings, train, max_length=32, seed=0, personal=personal, start=last)
    got = adapter_state(result.loaded.model)
    from_last, from_best = adapter_state(stack(last, personal)), adapter_state(stack(global_model, personal))
    lora = [k for k in got if ".lora_" in k]
    assert all(torch.equal(got[k], from_last[k]) for k in lora)  # the slices sit on the start's adapter
    assert any(not torch.equal(got[k], from_best[k]) for k in lora)

    def val_loss(loaded: LoadedModel) -> float:
        return evaluate(loaded.model, loaded.tokenizer, data.val, 2, max_length=32, batch_size=8).loss

    # the choice is between the personalized model and the global model given, not the start
    assert val_loss(last) != pytest.approx(val_loss(global_model))
    assert result.val_global.loss == pytest.approx(val_loss(global_model))


def test_a_run_is_personalized_from_the_round_personalize_start_names(
    tmp_path: Path, tiny_bert: Path, two_regions: Path, global_model: LoadedModel, north_task: ClientTask
) -> None:
    import json

    from common.config import load_config
    from common.model import save_adapter
    from common.runfiles import FEDERATION_FILE
    from server.federation import RunState, checkpoint_dir, write_state
    from simulations.personalize import personalize_run, run_personal, start_model
    from simulations.runner import load_all
    from tests.conftest import tiny_config

    out = tmp_path / "run"
    cfg = load_config(tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions, rounds=3))
    # a finished run of three rounds whose best round is the first: each round's global adapter and slices
    rounds = {r: perturb(build_model(cfg.model, cfg.lora, cfg.labels, seed=0), seed=20 + r) for r in (1, 2, 3)}
    for server_round, loaded in rounds.items():
        save_adapter(loaded, checkpoint_dir(out, server_round))
    save_adapter(rounds[1], out / "adapter")
    (out / FEDERATION_FILE).write_text(json.dumps({"best_round": 1, "rounds": [{}, {}, {}]}))
    write_state(out, RunState(3, [{"round": r} for r in (1, 2, 3)], 1, 0.5, 1.0, "", {}, run_key="k"))
    for name in ("north", "south"):
        folder = personal_folder(out / "personal", name)
        tag = personal_tag(name, "k", cfg.model.base, cfg.lora.r, RANK)
        for server_round, loaded in rounds.items():
            slices = Slices(init_personal(adapter_state(loaded.model), RANK, server_round), server_round)
            save_personal(folder, slices, tag, from_round=server_round - 1)

    def configured(start: str) -> RunConfig:
        return replace(cfg, personalize=PersonalizeSettings(mode="dual", local_r=RANK, bootstrap=100, start=start))

    best = start_model(configured("best"), out, rounds[1])
    assert best.round == 1 and best.model is rounds[1]
    last = start_model(configured("last"), out, rounds[1])
    assert last.round == 3
    assert all(torch.equal(v, adapter_state(rounds[3].model)[k]) for k, v in adapter_state(last.model.model).items())
    assert run_personal(configured("best"), out, "north", best).round == 1
    assert run_personal(configured("last"), out, "north", last).round == 3

    entries = personalize_run(configured("last"), out, load_all(cfg, lambda _: None), say=lambda _: None)
    assert {(e["start_round"], e["personal_round"]) for e in entries.values()} == {(3, 3)}
    assert entries["north"]["val_macro_f1"]["global"] == pytest.approx(
        personalize_run(configured("best"), out, load_all(cfg, lambda _: None), say=lambda _: None)["north"][
            "val_macro_f1"
        ]["global"]
    ), "either way the choice compares with the best round's global model"

    (checkpoint_dir(out, 3) / "adapter_model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"start: last needs the last round's global adapter, .*round-003"):
        start_model(configured("last"), out, rounds[1])


@pytest.mark.slow
def test_simulation_trains_personal_lora_on_the_nodes_and_serves_it(
    tmp_path: Path, tiny_bert: Path, two_regions: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import numpy as np
    from safetensors.torch import load_file

    from fedlocale.cli import main
    from server.audit import METRICS_KEY
    from tests.conftest import tiny_config

    personal = {"mode": "dual", "local_r": RANK, "bootstrap": 100}
    cfg = tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions, personalize=personal, audit={"keep_updates": True})
    out = tmp_path / "out"
    assert main(["simulate", str(cfg), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["audit"]["verified"] is True
    global_shapes = {k: v.shape for k, v in load_file(str(out / "adapter" / "adapter_model.safetensors")).items()}
    best = json.loads((out / "federation.json").read_text())["best_round"]
    for name in ("north", "south"):
        entry = summary["regions"][name]["personalized"]
        assert (entry["mode"], entry["local_r"], entry["epochs"], entry["bytes_sent"]) == ("dual", RANK, 0.0, 0)
        folder = personal_folder(out / "personal", name)
        assert sorted(p.name for p in folder.iterdir()) == ["round-001.safetensors", "round-002.safetensors"]
        for server_round in (1, 2):  # what each node sent and the server kept is a plain global adapter
            with np.load(out / "audit" / "updates" / f"round-00{server_round}" / f"{name}.npz") as update:
                assert {k: update[k].shape for k in update.files if k != METRICS_KEY} == global_shapes
        adapter = json.loads((out / "personalized" / name / "adapter_config.json").read_text())
        assert adapter["r"] == 4 + RANK and entry["personal_round"] == best  # the best round's own slices
    # personalized again from the last round (here the second): its global adapter and its own slices
    assert main(["personalize", str(out), "--set", "personalize.start=last"]) == 0
    again = json.loads((out / "summary.json").read_text())["regions"]
    assert {(again[n]["personalized"]["start_round"], again[n]["personalized"]["personal_round"]) for n in again} == {
        (2, 2)
    }
    assert re.search(r"\| north \| (global|personalized) \| 2 \|", (out / "report.md").read_text())
    # a run whose nodes kept no personal LoRA cannot be personalized with dual afterwards
    (out / "personal").rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["personalize", str(out), "--set", "personalize.mode=dual"]) == 2
    assert "dual trains it during the rounds" in capsys.readouterr().err


def test_a_simulation_gives_its_nodes_the_personal_lora_settings(tmp_path: Path, north_task: ClientTask) -> None:
    """dual_train reaches the simulated nodes: the run's Personal carries it, simulated_node passes it on."""
    from client.task import simulated_node
    from simulations.runner import personal_lora

    regions = tuple(Region(name, write_region(tmp_path / name, 8, 4, seed=1)) for name in ("north", "south"))
    cfg = RunConfig(regions=regions, labels=north_task.labels)
    assert personal_lora(cfg, tmp_path) is None
    for dual_train, apart in (("joint", False), ("apart", True)):
        own = PersonalizeSettings(mode="dual", local_r=3, dual_train=dual_train)  # type: ignore[arg-type]
        personal = personal_lora(replace(cfg, personalize=own), tmp_path / "run")
        assert personal is not None and (personal.rank, personal.apart) == (3, apart)
        node = simulated_node(cfg.regions[0], {}, None, personal)
        assert (node.personal_dir, node.personal_rank, node.personal_apart) == (personal.root, 3, apart)


def test_a_stacked_adapter_keeps_lora_in_the_last_layers_only(north_task: ClientTask) -> None:
    """Under `lora.layers` the stacked (global + personal) adapter has LoRA in the same layers as the global one
    and computes the wide model that trained it (the demo's personalization failed on this before)."""
    lora = replace(north_task.lora, layers=1)
    top = perturb(build_model(north_task.model, lora, north_task.labels, seed=0), seed=7)
    personal = {
        k: 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(2))
        for k, v in init_personal(adapter_state(top.model), RANK, seed=0).items()
    }
    stacked = stack(top, personal)
    assert stacked.peft_config["default"].layers_to_transform == [1]
    assert adapter_state(stacked).keys() == adapter_state(top.model).keys()
    wide = build_model(north_task.model, widen(lora, RANK), north_task.labels, seed=0)
    load_adapter_state(wide.model, join(adapter_state(top.model), personal))
    assert torch.allclose(_logits(top, stacked), _logits(wide), atol=1e-5)
