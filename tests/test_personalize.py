"""Personalization on the node and the paired bootstrap of the A/B evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client.personalize import (
    GLOBAL,
    PERSONALIZED,
    Difference,
    balanced,
    choose,
    keeps_global,
    local_lora,
    local_settings,
    paired_bootstrap,
    personalize,
    stack_local,
)
from common.config import LoraSettings, ModelSettings, PersonalizeSettings, TrainSettings
from common.data import Example, load_region
from common.errors import ConfigError
from common.metrics import macro_f1
from common.model import LoadedModel, adapter_state, build_model, save_adapter
from tests.conftest import assert_chosen_by_confidence, perturb, write_region

LABELS = ("neg", "pos")


def test_bootstrap_of_identical_predictions_is_exactly_zero() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 50)
    pred = rng.integers(0, 2, 50)
    d = paired_bootstrap(truth, pred, pred.copy(), 2, resamples=200, seed=1)
    assert (d.diff, d.low, d.high) == (0.0, 0.0, 0.0)


def test_bootstrap_difference_and_interval() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 300)
    good = np.where(rng.random(300) < 0.9, truth, (truth + 1) % 3)
    bad = np.where(rng.random(300) < 0.5, truth, (truth + 1) % 3)
    d = paired_bootstrap(truth, bad, good, 3, resamples=500, seed=2)
    assert d.diff == pytest.approx(macro_f1(truth, good, 3) - macro_f1(truth, bad, 3))
    assert 0 < d.low < d.diff < d.high  # a large real gain: the interval excludes 0 and holds the estimate
    again = paired_bootstrap(truth, bad, good, 3, resamples=500, seed=2)
    assert again == d  # seeded
    flipped = paired_bootstrap(truth, good, bad, 3, resamples=500, seed=2)
    assert flipped.diff == pytest.approx(-d.diff) and flipped.high == pytest.approx(-d.low)


def test_bootstrap_rejects_mismatched_arrays() -> None:
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_bootstrap(np.zeros(3), np.zeros(3), np.zeros(2), 2, resamples=100, seed=0)


def test_personalization_trains_with_adamw_whatever_the_rounds_use() -> None:
    """personalize.lr is an AdamW learning rate: a run whose rounds train with SGD does not hand it to SGD."""
    rounds = TrainSettings(lr=0.1, optimizer="sgd", momentum=0.5)
    own = local_settings(rounds, PersonalizeSettings(mode="continue", lr=2e-3))
    assert (own.optimizer, own.momentum, own.lr) == ("adamw", None, 2e-3)


def test_settings_are_validated_together() -> None:
    with pytest.raises(ConfigError) as err:
        PersonalizeSettings(
            mode="all",  # type: ignore[arg-type]
            epochs=0,
            bootstrap=10,
            local_r=0,
            choice="vote",  # type: ignore[arg-type]
            start="first",  # type: ignore[arg-type]
            dual_train="alone",  # type: ignore[arg-type]
        )
    text = str(err.value)
    assert "dual_train: must be one of joint, apart, got 'alone'" in text
    assert "start: must be one of best, last, got 'first'" in text
    assert "mode: must be one of none, head, continue, local, probe, dual, got 'all'" in text
    assert "local_r: must be in [1, 64], got 0" in text
    assert "choice: must be one of point, confident, got 'vote'" in text
    assert "epochs: must be in (0, 10], got 0" in text and "bootstrap: must be >= 100, got 10" in text


@pytest.mark.parametrize("mode", ["head", "continue", "local"])
def test_personalize_trains_a_copy_and_chooses_on_validation(tmp_path: Path, tiny_bert: Path, mode: str) -> None:
    region = load_region("r", write_region(tmp_path / "r", 40, 20, seed=3), LABELS)
    assert region.val  # the choice below is made on it
    loaded = build_model(ModelSettings(base=str(tiny_bert), max_length=32), LoraSettings(r=4, alpha=8), LABELS, 0)
    before = adapter_state(loaded.model)
    settings = PersonalizeSettings(mode=mode, epochs=2, lr=5e-2)  # type: ignore[arg-type]
    result = personalize(loaded, region, settings, TrainSettings(batch_size=8, threads=1), max_length=32, seed=0)

    after_global = adapter_state(loaded.model)
    assert all(np.array_equal(before[k], after_global[k]) for k in before), "the global model must stay untouched"
    personal = adapter_state(result.loaded.model)
    changed = {k for k in before if not np.array_equal(before[k], personal[k])}
    assert changed and all(("modules_to_save" in k or "classifier" in k) for k in changed) == (mode == "head")
    assert result.train.steps == 10  # 2 epochs of 40 examples in batches of 8
    assert_chosen_by_confidence(result)


def _correct_on(truth: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Predictions right on ``count`` random examples of ``truth`` (two labels) and wrong on the others."""
    right = np.random.default_rng(seed).permutation(len(truth)) < count
    return np.where(right, truth, 1 - truth)


def test_choice_rules_differ_only_where_validation_cannot_tell() -> None:
    truth = np.random.default_rng(0).integers(0, 2, 100)
    same, bootstrap = _correct_on(truth, 60, seed=1), {"resamples": 500, "seed": 3}
    right, wrong = np.flatnonzero(same == truth), np.flatnonzero(same != truth)
    slightly_worse = same.copy()  # 4 new errors and 1 fixed, on 100 examples
    flipped = np.concatenate([right[:4], wrong[:1]])
    slightly_worse[flipped] = 1 - same[flipped]
    clearly_worse = _correct_on(truth, 40, seed=2)

    # a small loss on validation: the point rule goes back to the global model, the confident one does not
    point, d = choose(truth, same, slightly_worse, 2, rule="point", **bootstrap)
    assert point == GLOBAL and d is not None and d.diff < 0 < d.high
    assert choose(truth, same, slightly_worse, 2, rule="confident", **bootstrap)[0] == PERSONALIZED
    # a large loss: both go back
    for rule in ("point", "confident"):
        chosen, d = choose(truth, same, clearly_worse, 2, rule=rule, **bootstrap)
        assert chosen == GLOBAL and d is not None and d.high < 0
        assert choose(truth, clearly_worse, same, 2, rule=rule, **bootstrap)[0] == PERSONALIZED
    assert choose(truth, same, same, 2, rule="point", **bootstrap)[0] == GLOBAL  # a tie keeps the global model
    assert choose(truth, same, same, 2, rule="confident", **bootstrap)[0] == PERSONALIZED
    # no validation split: nothing to choose by
    empty = np.zeros(0, dtype=int)
    assert choose(empty, empty, empty, 2, rule="confident", **bootstrap) == (PERSONALIZED, None)
    with pytest.raises(ValueError, match=r"personalize\.choice must be one of point, confident, got 'vote'"):
        choose(truth, same, same, 2, rule="vote", **bootstrap)
    with pytest.raises(ValueError, match=r"personalize\.choice must be one of"):
        choose(empty, empty, empty, 2, rule="vote", **bootstrap)


@pytest.mark.parametrize("rule", ["point", "confident"])
def test_personalize_chooses_by_the_configured_rule(
    tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch, rule: str
) -> None:
    import client.personalize as module

    rules: list[str] = []

    def spy(*args: Any, **kwargs: Any) -> tuple[str, Difference | None]:
        rules.append(kwargs["rule"])
        return choose(*args, **kwargs)

    monkeypatch.setattr(module, "choose", spy)
    region = load_region("r", write_region(tmp_path / "r", 40, 20, seed=3), LABELS)
    loaded = build_model(ModelSettings(base=str(tiny_bert), max_length=32), LoraSettings(r=4, alpha=8), LABELS, 0)
    settings = PersonalizeSettings(mode="head", epochs=1, lr=5e-2, choice=rule)  # type: ignore[arg-type]
    result = personalize(loaded, region, settings, TrainSettings(batch_size=8, threads=1), max_length=32, seed=0)
    assert rules == [rule] and result.val_difference is not None
    assert result.chosen == (GLOBAL if keeps_global(result.val_difference, rule) else PERSONALIZED)


R, LOCAL_R = 4, 2
TEXTS = ["good movie", "the hotel room was very bad", "love it", "awful and sad phone"]


def _trained_global(tiny_bert: Path) -> LoadedModel:
    """A global model whose adapter and head are not at their initial values (a fresh B is 0)."""
    loaded = build_model(ModelSettings(base=str(tiny_bert), max_length=32), LoraSettings(r=R, alpha=8), LABELS, 0)
    return perturb(loaded, seed=7)


def _logits(model: torch.nn.Module, loaded: LoadedModel) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**loaded.tokenizer(TEXTS, padding=True, return_tensors="pt")).logits  # type: ignore[no-any-return]


def test_local_lora_starts_as_the_global_model_and_stacks_into_one_adapter(tiny_bert: Path) -> None:
    g = _trained_global(tiny_bert)
    expected = _logits(g.model, g)
    local = local_lora(g, LOCAL_R, seed=0)
    trainable = {n for n, p in local.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert torch.allclose(_logits(local, g), expected, atol=1e-5)  # the new B is 0: nothing changes yet
    stacked = stack_local(g, local)
    assert torch.allclose(_logits(stacked, g), expected, atol=1e-5)
    config = stacked.peft_config["default"]
    assert (config.r, config.lora_alpha) == (R + LOCAL_R, 12)  # scale alpha/r = 8/4 = 12/6: the global part's
    state, before = adapter_state(stacked), adapter_state(g.model)
    for key, value in before.items():
        if ".lora_A." in key:
            assert state[key].shape[0] == R + LOCAL_R and torch.equal(state[key][:R], value)
        elif ".lora_B." in key:
            assert torch.equal(state[key][:, :R], value) and not state[key][:, R:].any()


def test_local_personalization_keeps_the_global_adapter_and_exports(tmp_path: Path, tiny_bert: Path) -> None:
    from runfolder.export import load_exported

    region = load_region("r", write_region(tmp_path / "r", 40, 20, seed=3), LABELS)
    g = _trained_global(tiny_bert)
    before, expected = adapter_state(g.model), _logits(g.model, g)
    settings = PersonalizeSettings(mode="local", epochs=2, lr=5e-2, local_r=LOCAL_R)
    result = personalize(g, region, settings, TrainSettings(batch_size=8, threads=1), max_length=32, seed=0)

    assert torch.equal(_logits(g.model, g), expected), "the global model must stay untouched"
    personal = adapter_state(result.loaded.model)
    for key, value in before.items():  # the global rank-R part is bit for bit the global adapter
        if ".lora_A." in key:
            assert torch.equal(personal[key][:R], value)
        elif ".lora_B." in key:
            assert torch.equal(personal[key][:, :R], value) and personal[key][:, R:].abs().sum() > 0
    outputs = _logits(result.loaded.model, g)
    assert not torch.allclose(outputs, expected, atol=1e-4)  # training changed what the model says

    out = save_adapter(result.loaded, tmp_path / "personalized" / "r")
    exported = load_exported(out)  # as `fedlocale export` / `serve` load it: one peft adapter + head
    assert exported.model.peft_config["default"].r == R + LOCAL_R
    assert torch.allclose(_logits(exported.model, g), outputs, atol=1e-5)


def test_stacked_adapter_computes_what_the_local_model_learnt(tmp_path: Path, tiny_bert: Path) -> None:
    from client.train import train_local

    region = load_region("r", write_region(tmp_path / "r", 40, 20, seed=5), LABELS)
    g = _trained_global(tiny_bert)
    local = local_lora(g, LOCAL_R, seed=1)
    settings = TrainSettings(lr=5e-2, batch_size=8, threads=1)
    train_local(local, g.tokenizer, region.train, settings, max_length=32, seed=0)
    assert torch.allclose(_logits(stack_local(g, local), g), _logits(local, g), atol=1e-5)


def test_personalize_command_updates_a_finished_run(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import yaml

    from common.config import load_config
    from common.model import save_adapter
    from fedlocale.cli import main
    from simulations.runner import config_dict
    from tests.conftest import tiny_config

    regions = tmp_path / "regions"
    for i, name in enumerate(["north", "south"]):
        write_region(regions / name, 30, 16, seed=40 + i)
    cfg = load_config(tiny_config(tmp_path / "run.yaml", tiny_bert, regions))
    run = tmp_path / "run"
    save_adapter(build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed), run / "adapter")
    (run / "config.yaml").write_text(yaml.safe_dump(config_dict(cfg)))
    summary = {"regions": {n: {"num_test": 16} for n in cfg.region_names}, "overall": {}}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "metrics.jsonl").write_text("")

    assert main(["personalize", str(run)]) == 2  # personalize.mode is none in the run's config
    # a damaged federation.json is refused naming it, before any data or model is loaded, and nothing is written
    (run / "federation.json").write_text(json.dumps({"rounds": 5}))
    before = (run / "summary.json").read_bytes()
    assert main(["personalize", str(run), "--set", "personalize.mode=head"]) == 2
    assert f"{run / 'federation.json'}: not a finished run's record" in capsys.readouterr().err
    assert (run / "summary.json").read_bytes() == before and not (run / "personalized").exists()
    (run / "federation.json").unlink()
    assert main(["personalize", str(run), "--set", "personalize.mode=head", "--set", "personalize.bootstrap=100"]) == 0
    written = json.loads((run / "summary.json").read_text())
    for name in cfg.region_names:
        entry = written["regions"][name]["personalized"]
        assert entry["mode"] == "head" and entry["bytes_sent"] == 0 and "vs_federated" in entry["ab"]
        assert (run / "personalized" / name / "adapter_model.safetensors").exists()
    assert "personalized" in written["overall"] and "Personalization (A/B)" in (run / "report.md").read_text()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe", "cannot be read"),
        (b"[1, 2]", "not a finished run's record"),
        (b'{"best_round": "1", "rounds": []}', "not a finished run's record"),
        (b'{"best_round": 3, "rounds": [{}, {}]}', "best_round 3 is not one of its 2 rounds"),
    ],
)
def test_run_rounds_refuses_a_damaged_record_naming_it(tmp_path: Path, content: bytes, message: str) -> None:
    from common.errors import InputError
    from simulations.personalize import run_rounds

    record = tmp_path / "federation.json"
    record.write_bytes(content)
    with pytest.raises(InputError, match=f"{record}: {message}"):
        run_rounds(record)
    record.write_text('{"best_round": 2, "rounds": [{}, {}, {}]}')
    assert run_rounds(record) == (2, 3)


def test_balanced_training_set_has_equal_classes_and_the_same_size() -> None:
    examples = [Example(f"n{i}", 0) for i in range(162)] + [Example(f"p{i}", 1) for i in range(88)]
    out = balanced(examples, seed=0)
    assert len(out) == 250 and sum(ex.label for ex in out) == 125
    assert {ex.text for ex in out if ex.label == 1} == {ex.text for ex in examples if ex.label == 1}  # all kept
    assert len({ex.text for ex in out if ex.label == 0}) == 125  # a subset, no repeats
    assert balanced(examples, seed=0) == out


def test_a_run_config_saved_with_relative_paths_loads_from_the_run_folder(
    tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    from common.config import load_config
    from simulations.runner import config_dict
    from tests.conftest import tiny_config

    write_region(tmp_path / "regions" / "north", 8, 4, seed=1)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "north.yaml").write_text("region: north\n")
    monkeypatch.chdir(tmp_path)  # the run is started from here, with paths relative to it
    tiny_config(tmp_path / "run.yaml", tiny_bert, Path("regions"), policies="policies", aggregation={"min_clients": 1})
    cfg = load_config(Path("run.yaml"))
    assert cfg.regions[0].policy is not None and not cfg.regions[0].policy.is_absolute()
    saved = tmp_path / "out" / "config.yaml"
    saved.parent.mkdir()
    saved.write_text(yaml.safe_dump(config_dict(cfg)))
    again = load_config(saved)  # as `fedlocale personalize out` reads it
    assert again.regions[0].policy == (tmp_path / "policies" / "north.yaml")
    assert again.regions[0].data == (tmp_path / "regions" / "north")


@pytest.mark.parametrize("mode", ["probe", "head"])
def test_a_node_and_a_simulation_personalize_a_region_the_same_way(tmp_path: Path, tiny_bert: Path, mode: str) -> None:
    """One function personalizes a region on a deployed node and in a simulation: same region, model and
    settings give the same record (only the node adds where and when, and the time taken differs)."""
    import dataclasses
    import json

    from client.task import NodeSettings, personalize_node
    from common.config import client_task, load_config
    from simulations.personalize import personalize_run
    from simulations.runner import load_all
    from tests.conftest import tiny_config

    regions = tmp_path / "regions"
    write_region(regions / "north", 30, 16, seed=40)
    cfg = load_config(tiny_config(tmp_path / "run.yaml", tiny_bert, regions, aggregation={"min_clients": 1}))
    settings = PersonalizeSettings(mode=mode, bootstrap=200)  # type: ignore[arg-type]
    cfg = dataclasses.replace(cfg, personalize=settings)
    run = tmp_path / "run"
    global_model = perturb(build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed), seed=5)
    save_adapter(global_model, run / "adapter")
    (run / "federation.json").write_text(json.dumps({"best_round": 2, "rounds": [{}, {}]}))  # best = last = 2

    simulated = personalize_run(cfg, run, load_all(cfg, lambda _: None), say=lambda _: None)["north"]
    node = NodeSettings(personalize=settings, personal_dir=tmp_path / "own")
    task = client_task(cfg, server_round=2)
    deployed = personalize_node(cfg.regions[0], task, adapter_state(global_model.model), node, now=0.0)

    assert {k: deployed.pop(k) for k in ("region", "time", "round")} == {"region": "north", "time": 0.0, "round": 2}
    assert deployed.pop("seconds") > 0 and simulated.pop("seconds") > 0
    assert deployed == simulated
    assert simulated["start_round"] == 2 and set(simulated["ab"]) == {"vs_federated"}
    assert simulated["test_macro_f1"]["served"] == simulated["macro_f1"]


def test_personalization_reads_the_runs_one_pass_of_the_global_model(
    tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the rounds the simulation loads the saved global adapter once and tokenises each test split once
    (``global_pass``); personalization given that pass neither loads nor tokenises them again, and its A/B
    scores the global model from the pass's predictions."""
    import dataclasses
    import json

    import simulations.personalize as module
    from common.config import load_config
    from simulations.runner import load_all
    from tests.conftest import tiny_config

    regions = tmp_path / "regions"
    write_region(regions / "north", 30, 16, seed=40)
    write_region(regions / "south", 30, 12, seed=41)
    cfg = load_config(tiny_config(tmp_path / "run.yaml", tiny_bert, regions, aggregation={"min_clients": 1}))
    cfg = dataclasses.replace(cfg, personalize=PersonalizeSettings(mode="probe", bootstrap=200))
    run = tmp_path / "run"
    save_adapter(perturb(build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed), seed=5), run / "adapter")
    (run / "federation.json").write_text(json.dumps({"best_round": 2, "rounds": [{}, {}]}))
    data = load_all(cfg, lambda _: None)
    loads: list[Path] = []
    encoded: list[int] = []
    real_load, real_encode = module.load_global, module.encode_examples

    def load(cfg, adapter_dir):  # type: ignore[no-untyped-def]
        loads.append(adapter_dir)
        return real_load(cfg, adapter_dir)

    def encode(tokenizer, examples, max_length):  # type: ignore[no-untyped-def]
        encoded.append(len(examples))
        return real_encode(tokenizer, examples, max_length)

    monkeypatch.setattr(module, "load_global", load)
    monkeypatch.setattr(module, "encode_examples", encode)
    made = module.global_pass(cfg, run, data)
    entries = module.personalize_run(cfg, run, data, say=lambda _: None, made=made)
    assert loads == [run / "adapter"] and sorted(encoded) == [12, 16]
    for name, region in data.items():
        truth = np.array([ex.label for ex in region.test])
        expected = macro_f1(truth, made.probs[name].argmax(axis=1), len(cfg.labels))
        assert entries[name]["test_macro_f1"]["global"] == pytest.approx(expected)
