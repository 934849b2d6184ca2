"""personalize.mode dual: a personal LoRA trained alongside the global adapter in every round, kept on the node
(common.personal, client.task.train_dual) and stacked onto the final global adapter (common.personalize)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from client.task import NodeSettings, personal_path, train_dual, train_round
from common.config import ClientTask, ConfigError, LoraSettings, PersonalizeSettings, Region, RunConfig, TrainSettings
from common.data import load_region
from common.model import LoadedModel, adapter_state, build_model, load_adapter_state
from common.personal import (
    init_personal,
    join,
    load_personal,
    personal_tag,
    save_personal,
    split,
    widen,
)
from common.personalize import personalize, stack
from tests.conftest import write_region

RANK = 2
TEXTS = ["good movie", "the hotel room was very bad", "love it", "awful and sad phone"]


def _logits(loaded: LoadedModel, model: torch.nn.Module | None = None) -> torch.Tensor:
    model = model or loaded.model
    model.eval()
    with torch.no_grad():
        return model(**loaded.tokenizer(TEXTS, padding=True, return_tensors="pt")).logits  # type: ignore[no-any-return]


def _perturbed(loaded: LoadedModel, seed: int) -> LoadedModel:
    """``loaded`` with every trainable tensor moved off its initial value (a fresh B is 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in loaded.model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    loaded.model.eval()
    return loaded


@pytest.fixture()
def global_model(north_task: ClientTask) -> LoadedModel:
    return _perturbed(build_model(north_task.model, north_task.lora, north_task.labels, seed=0), seed=7)


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
    back, again = split(wide, rank=4)
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
    with pytest.raises(ValueError, match="alpha=5, r=4, local_r=2"):
        widen(LoraSettings(r=4, alpha=5), 2)
    region = write_region(tmp_path / "r", 8, 4, seed=1)
    with pytest.raises(ConfigError, match=r"personalize\.local_r"):
        RunConfig(
            regions=(Region("r", region),),
            labels=("neg", "pos"),
            lora=LoraSettings(r=4, alpha=5),
            personalize=PersonalizeSettings(mode="dual", local_r=2),
        )


def test_saved_slices_are_reused_only_under_their_tag(tmp_path: Path, global_model: LoadedModel) -> None:
    personal = init_personal(adapter_state(global_model.model), RANK, seed=0)
    path = tmp_path / "n" / "personal-lora.safetensors"
    assert load_personal(path, "t") is None
    save_personal(path, personal, "t")
    loaded = load_personal(path, "t")
    assert loaded is not None and all(torch.equal(loaded[k], v) for k, v in personal.items())
    assert load_personal(path, "another run") is None
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_train_dual_sends_the_global_adapter_and_keeps_its_own(tmp_path: Path, north_task: ClientTask) -> None:
    region = Region(name="north", data=write_region(tmp_path / "north", 32, 8, seed=3))
    state = adapter_state(build_model(north_task.model, north_task.lora, north_task.labels, seed=0).model)
    node = NodeSettings(threads=1, personal_dir=tmp_path / "own", personal_rank=RANK)
    path = personal_path(region, node)
    tag = personal_tag("north", north_task.seed, north_task.lora.r, RANK)

    sent, result = train_dual(region, north_task, state, node)
    assert result.num_examples == 32
    assert {k: v.shape for k, v in sent.items()} == {k: v.shape for k, v in state.items()}
    assert any(not torch.equal(sent[k], state[k]) for k in state)  # the global part trained
    first = load_personal(path, tag)
    assert first is not None and any(v.any() for k, v in first.items() if ".lora_B." in k)  # so did its own

    # round 2 continues the kept slices; round 1 of a new run starts them afresh
    train_dual(region, replace(north_task, server_round=2), sent, node)
    second = load_personal(path, tag)
    assert second is not None and any(not torch.equal(second[k], first[k]) for k in first)
    train_dual(region, north_task, state, node)
    again = load_personal(path, tag)
    assert again is not None and all(torch.equal(again[k], first[k]) for k in first)  # seeded: the same round 1

    # the personal part changes what the global part learns: the sent update is not plain training's
    plain, _ = train_round(region, north_task, state, NodeSettings(threads=1))
    assert any(not torch.allclose(plain[k], sent[k]) for k in state)


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
    assert result.train.steps == 0 and result.loaded.model.peft_config["default"].r == 4 + RANK
    got, stacked = adapter_state(result.loaded.model), adapter_state(stack(global_model, personal))
    for key, value in stacked.items():
        if ".lora_" in key:  # the adapter is the stacked one, bit for bit; only the head was refit
            assert torch.equal(got[key], value)
    assert any(not torch.equal(got[k], v) for k, v in stacked.items() if ".lora_" not in k)
    # the stacked adapter computes the wide model that trained it
    wide = build_model(north_task.model, widen(north_task.lora, RANK), north_task.labels, seed=0)
    load_adapter_state(wide.model, join(adapter_state(global_model.model), personal))
    assert torch.allclose(_logits(global_model, stack(global_model, personal)), _logits(wide), atol=1e-5)


@pytest.mark.slow
def test_simulation_trains_personal_lora_on_the_nodes_and_serves_it(
    tmp_path: Path, tiny_bert: Path, two_regions: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from fedlocale.cli import main
    from tests.conftest import tiny_config

    personal = {"mode": "dual", "local_r": RANK, "bootstrap": 100}
    cfg = tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions, personalize=personal)
    out = tmp_path / "out"
    assert main(["simulate", str(cfg), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["audit"]["verified"] is True  # every update sent had the global adapter's shapes
    for name in ("north", "south"):
        entry = summary["regions"][name]["personalized"]
        assert (entry["mode"], entry["local_r"], entry["epochs"], entry["bytes_sent"]) == ("dual", RANK, 0.0, 0)
        assert (out / "personal-lora" / name / "personal-lora.safetensors").is_file()
        adapter = json.loads((out / "personalized" / name / "adapter_config.json").read_text())
        assert adapter["r"] == 4 + RANK
    # a run whose nodes kept no personal LoRA cannot be personalized with dual afterwards
    (out / "personal-lora").rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["personalize", str(out), "--set", "personalize.mode=dual"]) == 2
    assert "dual trains it during the rounds" in capsys.readouterr().err
