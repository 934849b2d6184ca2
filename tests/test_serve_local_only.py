"""personalize.consider_local_only: a region's local-only model as a third serving candidate, chosen on
validation by the personalized one's rule or its own (personalize.local_only_choice), reused from the
simulation's baseline, and exported when chosen."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from client.personalize import (
    GLOBAL,
    LOCAL_ONLY,
    PERSONALIZED,
    choose_local_only,
    personalize,
    switches_to_local_only,
)
from common.config import LoraSettings, ModelSettings, PersonalizeSettings, TrainSettings, load_config
from common.data import load_region
from common.errors import ConfigError
from common.model import LoadedModel, adapter_state, build_model
from common.runfiles import KEPT_CHECKPOINT
from tests.conftest import perturb, tiny_config, write_region

LABELS = ("neg", "pos")
TRAIN = TrainSettings(lr=3e-2, epochs=10, batch_size=8, threads=1)
# personalization that barely moves the poor global model: the local-only one must win on its own merit
NUDGE = {"mode": "head", "lr": 1e-3, "epochs": 0.2}


def _correct_on(truth: np.ndarray, count: int, seed: int) -> np.ndarray:
    right = np.random.default_rng(seed).permutation(len(truth)) < count
    return np.where(right, truth, 1 - truth)


def test_without_a_personalization_mode_the_setting_is_named_as_unused(
    tmp_path: Path, tiny_bert: Path, two_regions: Path
) -> None:
    from client.preflight import preflight

    assert PersonalizeSettings().consider_local_only is False  # off unless asked for
    assert PersonalizeSettings(mode="probe", consider_local_only=True).unused() == []
    # a config that weighs the local-only model (the demo's) still runs without personalization: the check says so
    path = tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions)
    sets = ["personalize.consider_local_only=true", "personalize.local_only_choice=point"]
    warnings = preflight(load_config(path, sets), {}).warnings
    assert any("consider_local_only has no effect with personalize.mode none" in w for w in warnings), warnings
    assert not any("without the local_only baseline" in w for w in warnings)  # nothing will be trained for it
    warnings = preflight(load_config(path, ["personalize.mode=probe", "personalize.local_only_choice=point"]), {})
    assert any("local_only_choice has no effect without" in w for w in warnings.warnings), warnings.warnings


def test_the_local_only_candidate_has_its_own_rule_which_defaults_to_choice() -> None:
    assert PersonalizeSettings(mode="dual", consider_local_only=True).local_only_rule() == "confident"
    assert PersonalizeSettings(mode="dual", choice="point", consider_local_only=True).local_only_rule() == "point"
    mixed = PersonalizeSettings(mode="dual", consider_local_only=True, local_only_choice="point")
    assert (mixed.choice, mixed.local_only_rule()) == ("confident", "point")
    with pytest.raises(ConfigError, match="local_only_choice: must be one of point, confident or null, got 'best'"):
        PersonalizeSettings(mode="dual", consider_local_only=True, local_only_choice="best")  # type: ignore[arg-type]


def test_switching_to_local_only_needs_evidence_under_the_confident_rule() -> None:
    truth = np.random.default_rng(0).integers(0, 2, 100)
    current, bootstrap = _correct_on(truth, 60, seed=1), {"resamples": 500, "seed": 3}
    right, wrong = np.flatnonzero(current == truth), np.flatnonzero(current != truth)
    slightly_better = current.copy()  # 4 errors fixed and 1 new, on 100 examples
    flipped = np.concatenate([wrong[:4], right[:1]])
    slightly_better[flipped] = 1 - current[flipped]
    clearly_better = _correct_on(truth, 85, seed=2)

    switch, d = choose_local_only(truth, current, slightly_better, 2, rule="point", **bootstrap)
    assert switch and d is not None and d.low < 0 < d.diff  # point: a higher score is enough
    assert choose_local_only(truth, current, slightly_better, 2, rule="confident", **bootstrap)[0] is False
    for rule in ("point", "confident"):
        switch, d = choose_local_only(truth, current, clearly_better, 2, rule=rule, **bootstrap)
        assert switch and d is not None and d.low > 0
        assert choose_local_only(truth, clearly_better, current, 2, rule=rule, **bootstrap)[0] is False
        assert choose_local_only(truth, current, current, 2, rule=rule, **bootstrap)[0] is False  # a tie stays
    empty = np.zeros(0, dtype=int)
    assert choose_local_only(empty, empty, empty, 2, rule="point", **bootstrap) == (False, None)


def _region(tmp_path: Path, seed: int = 3) -> Any:
    return load_region("r", write_region(tmp_path / "r", 96, 80, seed=seed), LABELS)


def _local_only(tiny_bert: Path, region: Any) -> LoadedModel:
    from client.local_only import train_local_only

    model = ModelSettings(base=str(tiny_bert), max_length=32)
    loaded, _ = train_local_only("r", region, model, LoraSettings(r=4, alpha=8), LABELS, TRAIN, 2, seed=0)
    return loaded


@pytest.mark.parametrize("rule", ["point", "confident"])
def test_a_clearly_better_local_only_model_is_served_and_an_equal_one_is_not(
    tmp_path: Path, tiny_bert: Path, rule: str
) -> None:
    region = _region(tmp_path)
    model = ModelSettings(base=str(tiny_bert), max_length=32)
    untrained = perturb(build_model(model, LoraSettings(r=4, alpha=8), LABELS, 0), seed=5)  # a poor global model
    local = _local_only(tiny_bert, region)
    settings = PersonalizeSettings(**NUDGE, choice=rule, consider_local_only=True)  # type: ignore[arg-type]
    result = personalize(untrained, region, settings, TRAIN, max_length=32, seed=0, local_only=local)
    candidate = result.local_only
    assert candidate is not None and candidate.difference is not None
    current = result.val_personalized if candidate.compared_with == PERSONALIZED else result.val_global
    assert candidate.difference.diff == pytest.approx(candidate.val.macro_f1 - current.macro_f1)
    assert candidate.difference.low > 0  # trained on the region's data for 20 epochs against a random model
    assert result.chosen == LOCAL_ONLY
    # the global model as its own "local-only" candidate: no evidence, never served
    same = personalize(untrained, region, settings, TRAIN, max_length=32, seed=0, local_only=untrained)
    assert same.chosen in (GLOBAL, PERSONALIZED) and same.local_only is not None
    assert same.local_only.difference is not None and not switches_to_local_only(same.local_only.difference, rule)
    # without the setting's candidate the choice is the old one
    plain = personalize(untrained, region, settings, TRAIN, max_length=32, seed=0)
    assert plain.chosen == candidate.compared_with and plain.local_only is None


def test_the_local_only_candidate_is_weighed_by_its_own_rule_and_the_record_names_it(
    tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import client.personalize as personalize_module
    from client.personalize import choice_record

    region = _region(tmp_path)
    model = ModelSettings(base=str(tiny_bert), max_length=32)
    untrained = perturb(build_model(model, LoraSettings(r=4, alpha=8), LABELS, 0), seed=5)
    local = _local_only(tiny_bert, region)
    rules: list[str] = []
    real = personalize_module.choose_local_only

    def recording(*args: Any, **kwargs: Any) -> Any:
        rules.append(kwargs["rule"])
        return real(*args, **kwargs)

    monkeypatch.setattr(personalize_module, "choose_local_only", recording)
    settings = PersonalizeSettings(**NUDGE, consider_local_only=True, local_only_choice="point")  # type: ignore[arg-type]
    result = personalize(untrained, region, settings, TRAIN, max_length=32, seed=0, local_only=local)
    assert rules == ["point"] and settings.choice == "confident"  # the two choices read different rules
    record = choice_record(result, settings.choice)
    assert record["choice"] == "confident" and record[LOCAL_ONLY]["choice"] == "point"
    assert "(point: served only if its macro-F1 is higher)" in record[LOCAL_ONLY]["why"]


def test_the_region_serves_the_local_only_model_on_test_and_records_why(tmp_path: Path, tiny_bert: Path) -> None:
    from client.personalize import Start, personalize_region
    from client.tokens import encode_examples
    from client.train import predict_proba

    region = _region(tmp_path)
    model = ModelSettings(base=str(tiny_bert), max_length=32)
    untrained = perturb(build_model(model, LoraSettings(r=4, alpha=8), LABELS, 0), seed=5)
    local = _local_only(tiny_bert, region)
    texts = [ex.text for ex in region.test]
    local_test = predict_proba(local.model, local.tokenizer, texts, max_length=32, batch_size=8).argmax(axis=1)
    settings = PersonalizeSettings(**NUDGE, consider_local_only=True, bootstrap=200)  # type: ignore[arg-type]
    _, record = personalize_region(
        "r",
        region,
        untrained,
        settings,
        TRAIN,
        encode_examples(untrained.tokenizer, region.test, 32),
        max_length=32,
        seed=0,
        start=Start(untrained, 1),
        baselines={"local_only": local_test},
        local_only=local,
    )
    entry = record.to_json()
    assert entry["chosen"] == LOCAL_ONLY
    why = entry[LOCAL_ONLY]
    assert why["served"] is True and why["compared_with"] in (GLOBAL, PERSONALIZED)
    assert (
        why["val_ab"]["low"] > 0 and "served (confident: served only if the 95 % interval lies above 0)" in why["why"]
    )
    # served is the local-only model: against the local-only baseline's predictions exactly nothing differs
    against = entry["ab"]["vs_local_only"]
    assert against["diff"] == against["low"] == against["high"] == 0.0
    truth = np.array([ex.label for ex in region.test])
    from common.metrics import macro_f1

    assert entry["macro_f1"] == pytest.approx(macro_f1(truth, local_test, 2))


def test_a_node_trains_the_same_local_only_model_as_the_simulations_baseline(
    tmp_path: Path, tiny_bert: Path, two_regions: Path
) -> None:
    # one function, one budget (matched_settings), one seed: what a node may serve is what the baseline measured
    from client.local_only import train_local_only
    from simulations.baselines import run_local_only

    cfg = load_config(tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions, rounds=2))
    data = {r.name: load_region(r.name, r.data, cfg.labels) for r in cfg.regions}
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    scores, _ = run_local_only(cfg, {"south": data["south"]}, lambda _: None, None, adapters)
    node, kept = train_local_only(
        "south", data["south"], cfg.model, cfg.lora, cfg.labels, cfg.train, cfg.rounds, seed=cfg.seed
    )
    mine = adapter_state(node.model)
    assert set(mine) == set(adapters["south"])
    initial = adapter_state(build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed).model)
    assert any(not torch.equal(mine[k], initial[k]) for k in mine)  # it trained
    for key, value in adapters["south"].items():
        assert torch.allclose(mine[key], value, atol=1e-6), key
    assert kept.to_json() == scores["south"][KEPT_CHECKPOINT]  # and it kept the checkpoint the baseline kept


def test_a_simulation_reuses_the_baselines_adapter_and_export_serves_the_choice(
    tmp_path: Path, tiny_bert: Path, two_regions: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import client.local_only
    from common.model import save_adapter
    from runfolder.export import choose_adapter, read_run
    from simulations.personalize import local_only_model, personalize_run

    cfg = load_config(
        tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions),
        ["personalize.mode=probe", "personalize.consider_local_only=true", "personalize.bootstrap=200"],
    )
    data = {r.name: load_region(r.name, r.data, cfg.labels) for r in cfg.regions}
    run = tmp_path / "run"
    save_adapter(perturb(build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed), seed=5), run / "adapter")
    # the baseline's adapters: perturbed copies stand for the trained ones; no training may happen
    adapters = {
        name: adapter_state(perturb(build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed), seed=i).model)
        for i, name in enumerate(data)
    }

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the baseline's adapter must be reused, not trained again")

    monkeypatch.setattr(client.local_only, "train_local_only", no_training)
    loaded = local_only_model(cfg, "north", data["north"], adapters)
    for key, value in adapter_state(loaded.model).items():
        assert torch.equal(value, adapters["north"][key]), key
    entries = personalize_run(cfg, run, data, None, lambda _: None, adapters)
    for name in data:
        assert LOCAL_ONLY in entries[name]  # the candidate was weighed and the record says why
        assert (run / "local_only" / name / "adapter_config.json").is_file()
    saved = load_file(str(run / "local_only" / "south" / "adapter_model.safetensors"))
    assert len(saved) == len(adapters["south"])
    assert all(any(torch.equal(v, w) for w in adapters["south"].values()) for v in saved.values())

    # export serves what summary.json says was chosen
    summary = {"regions": {n: {"num_test": 1, "personalized": entries[n]} for n in data}, "overall": {}}
    summary["regions"]["north"]["personalized"] = {**entries["north"], "chosen": LOCAL_ONLY}
    summary["regions"]["south"]["personalized"] = {**entries["south"], "chosen": GLOBAL}
    (run / "summary.json").write_text(json.dumps(summary))
    info = read_run(run)
    north = choose_adapter(info, "north")
    assert (north.path, north.kind) == (run / "local_only" / "north", LOCAL_ONLY) and "local-only" in north.reason
    assert choose_adapter(info, "south").kind == GLOBAL
    forced = choose_adapter(info, "south", LOCAL_ONLY)
    assert forced.path == run / "local_only" / "south" and "explicitly" in forced.reason
    # the export holds the local-only adapter, byte for byte
    from fedlocale.cli import main

    assert main(["export", str(run), "--region", "north", "--out", str(tmp_path / "export")]) == 0
    exported = json.loads((tmp_path / "export" / "fedlocale.json").read_text())
    assert exported["adapter"]["kind"] == LOCAL_ONLY
    assert (tmp_path / "export" / "adapter_model.safetensors").read_bytes() == (
        run / "local_only" / "north" / "adapter_model.safetensors"
    ).read_bytes()
    # chosen, but the folder is gone: the served model cannot be exported, and the global one is not it
    import shutil

    from runfolder.export import ExportError

    shutil.rmtree(run / "local_only" / "north")
    with pytest.raises(ExportError, match="the served model is missing"):
        choose_adapter(read_run(run), "north")


@pytest.mark.slow
def test_a_simulation_with_the_baseline_weighs_its_adapter_without_training_it_again(
    tmp_path: Path, tiny_bert: Path, two_regions: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the whole run: the baseline trains each region's local-only model once; personalization (in this
    # process) weighs that very adapter, keeps it in local_only/REGION and records the choice and the interval
    import client.local_only
    from fedlocale.cli import main

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the baseline's adapter must be reused, not trained again")

    monkeypatch.setattr(client.local_only, "train_local_only", no_training)
    cfg = tiny_config(
        tmp_path / "run.yaml",
        tiny_bert,
        two_regions,
        baselines=["local_only"],
        personalize={"mode": "probe", "consider_local_only": True, "choice": "point", "bootstrap": 200},
    )
    assert main(["simulate", str(cfg), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for name, region in summary["regions"].items():
        entry = region["personalized"]
        assert entry[LOCAL_ONLY]["served"] == (entry["chosen"] == LOCAL_ONLY), name
        assert (tmp_path / "out" / "local_only" / name / "adapter_config.json").is_file()
        against = region["served_vs_local_only"]
        assert against["served"] == entry["chosen"] and against == {
            "served": entry["chosen"],
            **entry["ab"]["vs_local_only"],
            "reaches_zero": entry["ab"]["vs_local_only"]["high"] >= 0,
        }
        if entry["chosen"] == LOCAL_ONLY:  # served is the baseline's own model: the same test score
            assert entry["macro_f1"] == pytest.approx(region["local_only"]["macro_f1"])
            assert against["diff"] == against["low"] == against["high"] == 0.0


def test_personalizing_a_finished_run_trains_the_local_only_candidate_it_lacks(
    tmp_path: Path, tiny_bert: Path, two_regions: Path
) -> None:
    # `fedlocale personalize RUN_DIR` has no baseline's adapters at hand: it trains each region's local-only model
    # as the baseline would (client.local_only), keeps it and records the choice
    import yaml

    from common.model import save_adapter
    from fedlocale.cli import main
    from simulations.runner import config_dict

    cfg = load_config(tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions))
    run = tmp_path / "run"
    save_adapter(build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed), run / "adapter")
    (run / "config.yaml").write_text(yaml.safe_dump(config_dict(cfg)))
    summary = {"regions": {n: {"num_test": 48} for n in cfg.region_names}, "overall": {}}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "metrics.jsonl").write_text("")
    sets = ["personalize.mode=probe", "personalize.consider_local_only=true", "personalize.bootstrap=100"]
    assert main(["personalize", str(run), *[x for s in sets for x in ("--set", s)]]) == 0
    written = json.loads((run / "summary.json").read_text())
    for name in cfg.region_names:
        entry = written["regions"][name]["personalized"]
        assert entry[LOCAL_ONLY]["served"] == (entry["chosen"] == LOCAL_ONLY)
        assert (run / "local_only" / name / "adapter_model.safetensors").is_file()
        # the trained candidate is the local-only model: the served model is A/B'd against it on test
        against = written["regions"][name]["served_vs_local_only"]
        assert against["served"] == entry["chosen"] and against["diff"] == entry["ab"]["vs_local_only"]["diff"]
        if entry["chosen"] == LOCAL_ONLY:
            assert against["diff"] == against["low"] == against["high"] == 0.0


def test_the_check_warns_when_the_candidate_must_be_trained_again(
    tmp_path: Path, tiny_bert: Path, two_regions: Path
) -> None:
    from client.preflight import preflight

    sets = ["personalize.mode=probe", "personalize.consider_local_only=true"]
    path = tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions)
    said = "personalize.consider_local_only without the local_only baseline"
    assert any(said in w for w in preflight(load_config(path, sets), {}).warnings)
    with_baseline = load_config(path, [*sets, "baselines=[local_only]"])
    assert not any(said in w for w in preflight(with_baseline, {}).warnings)
