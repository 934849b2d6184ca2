"""Nothing assumes two labels: a four-label task goes through config, data loading, model, train_local and
evaluate with the tiny BERT of conftest, in memory and in seconds."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from assets.tiny import FILLER, make_tiny_model
from client.train import evaluate, predict_proba, train_local
from common.config import LoraSettings, ModelSettings, load_config
from common.data import load_region
from common.metrics import macro_f1
from common.model import LoadedModel, adapter_state, build_model, load_adapter_state, save_adapter
from runfolder.export import ExportError, load_exported, merge, save_merged
from tests.conftest import tiny_config

# Four classes, each told by which group its keyword comes from (all in the tiny tokenizer's vocabulary).
GROUPS = {
    "joy": ["good", "great", "happy"],
    "anger": ["bad", "awful", "hate"],
    "calm": ["love", "nice", "fine"],
    "gloom": ["sad", "poor", "ugly"],
}
LABELS = tuple(GROUPS)
# The tiny random encoder needs many passes to tell four classes apart: at 10, test macro-F1 ranged 0.39-0.82
# over training seeds 0-4 (either batch order); at 20, 0.78-0.93 with length-grouped batches.
EPOCHS, LR = 20.0, 1e-2


def _rows(n: int, rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        words = [*rng.sample(FILLER, 3), rng.choice(GROUPS[label])]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="module")
def headless_bert(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's tiny BERT without its (two-label) head, like a pretrained encoder such as MiniLM."""
    folder = tmp_path_factory.mktemp("tiny-bert-headless")
    AutoModel.from_pretrained(str(tiny_bert)).save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(tiny_bert)).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def four_label_region(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("four-labels")
    rng = random.Random(5)
    for split, n in (("train", 160), ("val", 40), ("test", 80)):
        (root / "r1").mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(r) + "\n" for r in _rows(n, rng))
        (root / "r1" / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    return root


def test_four_labels_end_to_end(headless_bert: Path, four_label_region: Path, tmp_path: Path) -> None:
    path = tiny_config(
        tmp_path / "run.yaml", headless_bert, four_label_region, labels=list(LABELS), aggregation={"min_clients": 1}
    )
    cfg = load_config(path)
    assert cfg.labels == LABELS
    region = load_region("r1", cfg.regions[0].data, cfg.labels)
    assert {ex.label for ex in region.train} == {0, 1, 2, 3}

    loaded = build_model(cfg.model, cfg.lora, cfg.labels, seed=0)
    head = {k: v for k, v in adapter_state(loaded.model).items() if "classifier" in k and k.endswith("weight")}
    assert [v.shape[0] for v in head.values()] == [4]

    before = evaluate(loaded.model, loaded.tokenizer, region.test, len(LABELS), max_length=cfg.model.max_length)
    train = dataclasses.replace(cfg.train, epochs=EPOCHS, lr=LR)
    result = train_local(loaded.model, loaded.tokenizer, region.train, train, max_length=cfg.model.max_length, seed=0)
    after = evaluate(loaded.model, loaded.tokenizer, region.test, len(LABELS), max_length=cfg.model.max_length)
    assert result.num_examples == 160
    assert after.loss < before.loss
    assert after.accuracy > 0.6  # chance is 0.25
    assert after.macro_f1 > 0.6

    probs = predict_proba(
        loaded.model, loaded.tokenizer, [ex.text for ex in region.test], max_length=cfg.model.max_length, batch_size=16
    )
    assert probs.shape == (len(region.test), 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert set(probs.argmax(axis=1).tolist()) == {0, 1, 2, 3}  # every class is predicted, not just two


def test_macro_f1_averages_over_all_labels() -> None:
    truth = [0, 1, 2, 3, 3, 2]
    assert macro_f1(truth, truth, 4) == 1.0
    # label 3 never predicted: its F1 is 0 and it counts
    assert macro_f1(truth, [0, 1, 2, 2, 2, 2], 4) == pytest.approx((1 + 1 + 2 / 3 + 0) / 4)


def test_four_label_head_on_a_checkpoint_with_a_two_label_head(tiny_bert: Path) -> None:
    loaded = build_model(ModelSettings(base=str(tiny_bert), max_length=32), LoraSettings(r=4), LABELS, seed=0)
    assert loaded.model.config.num_labels == 4
    assert loaded.model.config.id2label == dict(enumerate(LABELS))


# ---------------------------------------------------------------------------------------------------------
# Whatever head a base checkpoint has, a run starts from a fresh head drawn from its seed, and an export
# classifies with the trained head


FIVE = ("a", "b", "c", "d", "e")
HEAD_KINDS = ("bert", "distilbert", "roberta")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Per architecture: the tiny model with a 2-label head, the same with a 5-label head, and without a head."""
    out = {}
    for kind in HEAD_KINDS:
        two = make_tiny_model(tmp_path_factory.mktemp(f"{kind}-2"), kind)
        out[(kind, "2")] = two
        five = tmp_path_factory.mktemp(f"{kind}-5")
        config = AutoConfig.from_pretrained(str(two), num_labels=5)
        torch.manual_seed(123)
        AutoModelForSequenceClassification.from_config(config).save_pretrained(str(five))
        AutoTokenizer.from_pretrained(str(two)).save_pretrained(str(five))
        out[(kind, "5")] = five
        headless = tmp_path_factory.mktemp(f"{kind}-none")
        AutoModel.from_pretrained(str(two)).save_pretrained(str(headless))
        AutoTokenizer.from_pretrained(str(two)).save_pretrained(str(headless))
        out[(kind, "none")] = headless
    return out


def _head(model: torch.nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """The head's tensors of a plain or peft model, by their name in the plain model."""
    names = ("pre_classifier", "classifier") if kind == "distilbert" else ("classifier",)
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    state = inner.state_dict()
    out = {}
    for key, value in state.items():
        plain = key.replace("modules_to_save.default.", "")
        if plain.split(".")[0] in names and "original_module" not in key:
            out[plain] = value.detach().clone()
    assert out
    return out


def _saved_head(folder: Path, kind: str) -> dict[str, torch.Tensor]:
    return _head(AutoModelForSequenceClassification.from_pretrained(str(folder)), kind)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _build(folder: Path, seed: int, labels: tuple[str, ...] = FIVE) -> LoadedModel:
    return build_model(ModelSettings(base=str(folder), max_length=32), LoraSettings(r=4), labels, seed=seed)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_two_label_checkpoint_loads_as_five_labels_with_a_fresh_seeded_head(
    checkpoints: dict[tuple[str, str], Path], kind: str
) -> None:
    loaded = _build(checkpoints[(kind, "2")], seed=0)
    assert loaded.model.config.num_labels == 5
    assert loaded.model.config.id2label == dict(enumerate(FIVE))
    head = _head(loaded.model, kind)
    out_weight = "classifier.out_proj.weight" if kind == "roberta" else "classifier.weight"
    assert head[out_weight].shape[0] == 5
    # seeded: the same head again for the same seed, whatever the checkpoint holds (another size, or no head) ...
    assert _equal(head, _head(_build(checkpoints[(kind, "2")], seed=0).model, kind))
    assert _equal(head, _head(_build(checkpoints[(kind, "none")], seed=0).model, kind))
    # ... and another for another seed
    assert not torch.equal(head[out_weight], _head(_build(checkpoints[(kind, "2")], seed=1).model, kind)[out_weight])
    # the LoRA matrices do not depend on the checkpoint's head either: the whole exchanged state is the same
    a = adapter_state(loaded.model)
    b = adapter_state(_build(checkpoints[(kind, "none")], seed=0).model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_same_size_checkpoint_head_is_replaced_by_the_seeded_head(
    checkpoints: dict[tuple[str, str], Path], kind: str
) -> None:
    saved = _saved_head(checkpoints[(kind, "5")], kind)
    head = _head(_build(checkpoints[(kind, "5")], seed=0).model, kind)
    assert saved.keys() == head.keys()
    assert all(not torch.equal(saved[k], head[k]) for k in head if k.endswith("weight"))
    assert _equal(head, _head(_build(checkpoints[(kind, "2")], seed=0).model, kind))
    # also for the tiny model's own 2-label head under a 2-label task
    two = _build(checkpoints[(kind, "2")], seed=0, labels=("neg", "pos"))
    mine, theirs = _head(two.model, kind), _saved_head(checkpoints[(kind, "2")], kind)
    assert all(not torch.equal(mine[k], theirs[k]) for k in mine if k.endswith("weight"))
    assert _equal(mine, _head(_build(checkpoints[(kind, "none")], seed=0, labels=("neg", "pos")).model, kind))


@torch.no_grad()
def _logits(model: torch.nn.Module, loaded: LoadedModel) -> torch.Tensor:
    model.eval()
    batch = loaded.tokenizer(
        ["good great movie", "the awful room was bad", "a phone"], padding=True, return_tensors="pt"
    )
    return model(**batch).logits


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_export_of_a_five_label_run_on_a_two_label_checkpoint_uses_the_trained_head(
    checkpoints: dict[tuple[str, str], Path], tmp_path: Path, kind: str
) -> None:
    base = checkpoints[(kind, "2")]
    trained = _build(base, seed=0)
    # stands in for training: every exchanged tensor (LoRA and head) moved away from its initial value
    state = adapter_state(trained.model)
    load_adapter_state(trained.model, {k: v + 0.05 * torch.randn_like(v) for k, v in state.items()})
    folder = save_adapter(trained, tmp_path / "adapter")

    exported = load_exported(folder)  # what `fedlocale export` and `fedlocale predict` load
    assert exported.labels == FIVE
    assert torch.allclose(_logits(exported.model, trained), _logits(trained.model, trained), atol=1e-6)
    assert _equal(_head(exported.model, kind), _head(trained.model, kind))

    merged_dir = tmp_path / "merged"
    save_merged(merge(exported.model, FIVE), exported.tokenizer, FIVE, merged_dir)
    merged = AutoModelForSequenceClassification.from_pretrained(str(merged_dir)).eval()
    assert merged.config.num_labels == 5 and merged.config.id2label == dict(enumerate(FIVE))
    assert _equal(_head(merged, kind), _head(trained.model, kind))  # OUR head, not the checkpoint's or a random one
    assert torch.allclose(_logits(merged, trained), _logits(trained.model, trained), atol=1e-5)


def test_export_refuses_an_adapter_without_its_head(checkpoints: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    trained = _build(checkpoints[("bert", "2")], seed=0)
    folder = save_adapter(trained, tmp_path / "adapter")
    weights = load_file(str(folder / "adapter_model.safetensors"))
    save_file({k: v for k, v in weights.items() if "classifier" not in k}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ExportError, match="no trained weights for the head module 'classifier'"):
        load_exported(folder)
