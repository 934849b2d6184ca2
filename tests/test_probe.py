"""The linear-probe personalization: the convex fit, the choice of its penalty, and the model it leaves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from assets.tiny import make_tiny_model
from client.personalize import personalize
from client.probe import cross_validate, fit_logistic, fit_probe, head_features, install, output_layer
from client.train import encode
from common.config import LoraSettings, ModelSettings, PersonalizeSettings, TrainSettings
from common.data import load_region
from common.metrics import macro_f1
from common.model import adapter_state, build_model, save_adapter
from tests.conftest import assert_chosen_by_confidence, write_region

LABELS = ("neg", "pos")


def _blobs(n: int, d: int, num_labels: int, shift: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian classes with means ``shift`` apart along random directions, features on very different scales."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % num_labels
    centres = rng.normal(size=(num_labels, d)) * shift
    scale = np.exp(rng.uniform(-3, 3, size=d))  # a shared penalty is only fair after standardising
    x = (centres[y] + rng.normal(size=(n, d))) * scale + rng.normal(size=d) * 10
    return torch.tensor(x, dtype=torch.float64), torch.tensor(y)


def test_logistic_fit_reaches_the_optimum_of_its_objective() -> None:
    x, y = _blobs(120, 5, 3, shift=1.0, seed=0)
    x = (x - x.mean(0)) / x.std(0)
    w, b, _ = fit_logistic(x, y, 3, l2=0.1)
    w.requires_grad_(True)
    b.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + 0.1 * (w**2).sum()
    loss.backward()
    assert w.grad is not None and b.grad is not None
    assert w.grad.abs().max() < 1e-5 and b.grad.abs().max() < 1e-5  # stationary; the objective is convex


def test_probe_applies_to_raw_features_and_separates_separable_classes() -> None:
    x, y = _blobs(200, 8, 2, shift=4.0, seed=1)
    probe = fit_probe(x, y, 2)
    mean, std = x.mean(0), x.std(0)
    w, b, _ = fit_logistic((x - mean) / std, y, 2, probe.l2)
    folded = x @ probe.weight.T + probe.bias
    assert torch.allclose(folded, ((x - mean) / std) @ w.T + b, atol=1e-8)  # standardisation folded in exactly
    assert macro_f1(y.numpy(), folded.argmax(1).numpy(), 2) == 1.0
    assert probe.cv_macro_f1 == 1.0 and probe.l2 == 1.0  # a tie on the folds keeps the strongest penalty


def test_penalty_is_chosen_by_cross_validation_and_the_fit_is_deterministic() -> None:
    x, y = _blobs(60, 40, 2, shift=0.35, seed=2)  # few examples, many features: overfitting is possible
    grid = (1e-4, 1e-2, 1.0)
    scores = {l2: cross_validate(x, y, 2, l2) for l2 in grid}
    probe = fit_probe(x, y, 2, grid)
    assert probe.cv_macro_f1 == max(scores.values())
    assert scores[probe.l2] == probe.cv_macro_f1
    again = fit_probe(x, y, 2, grid)
    assert torch.equal(again.weight, probe.weight) and torch.equal(again.bias, probe.bias)


def test_probe_without_folds_uses_the_strongest_penalty() -> None:
    x, y = _blobs(3, 4, 2, shift=2.0, seed=3)  # one example of a class: no stratified fold holds it out
    y = torch.tensor([0, 0, 1])
    probe = fit_probe(x, y, 2)
    assert probe.l2 == 1.0 and np.isnan(probe.cv_macro_f1)
    with pytest.raises(ValueError, match="need as many labels as feature rows, got 2 and 3"):
        fit_probe(x, y[:2], 2)


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_installed_probe_is_what_the_model_computes(tmp_path: Path, kind: str) -> None:
    folder = make_tiny_model(tmp_path / kind, kind)
    loaded = build_model(ModelSettings(base=str(folder), max_length=32), LoraSettings(r=4, alpha=8), LABELS, 0)
    layer = output_layer(loaded.model, 2)
    assert any(layer is m for name, m in loaded.model.named_modules() if "modules_to_save" in name)
    texts = ["good movie", "the hotel room was very bad", "love it", "awful and sad phone", "fine"]
    ids = encode(loaded.tokenizer, texts, 32)
    pad = loaded.tokenizer.pad_token_id or 0
    features = head_features(loaded.model, layer, ids, pad_id=pad, batch_size=2)
    probe = fit_probe(features, torch.tensor([1, 0, 1, 0, 1]), 2)
    install(layer, probe)
    with torch.no_grad():
        logits = loaded.model(**loaded.tokenizer(texts, padding=True, return_tensors="pt")).logits
    assert torch.allclose(logits.double(), features @ probe.weight.T + probe.bias, atol=1e-4)


def test_probe_personalization_changes_only_the_output_layer_and_exports(tmp_path: Path, tiny_bert: Path) -> None:
    from runfolder.export import load_exported

    region = load_region("r", write_region(tmp_path / "r", 40, 20, seed=3), LABELS)
    g = build_model(ModelSettings(base=str(tiny_bert), max_length=32), LoraSettings(r=4, alpha=8), LABELS, 0)
    before = adapter_state(g.model)
    result = personalize(g, region, PersonalizeSettings(mode="probe"), TrainSettings(), max_length=32, seed=0)

    assert all(np.array_equal(before[k], v) for k, v in adapter_state(g.model).items()), "global model untouched"
    after = adapter_state(result.loaded.model)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {k for k in before if "classifier" in k and "lora_" not in k}  # the head, nothing else
    assert result.train.steps == 0 and result.train.num_examples == 40
    assert_chosen_by_confidence(result)

    out = save_adapter(result.loaded, tmp_path / "personalized" / "r")
    exported = load_exported(out)
    batch = g.tokenizer(["good movie", "awful phone"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = result.loaded.model(**batch).logits
        got = exported.model(**batch).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_probe_personalization_is_deterministic(tmp_path: Path, tiny_bert: Path) -> None:
    region = load_region("r", write_region(tmp_path / "r", 30, 10, seed=4), LABELS)
    g = build_model(ModelSettings(base=str(tiny_bert), max_length=32), LoraSettings(r=4, alpha=8), LABELS, 0)
    settings = PersonalizeSettings(mode="probe")
    runs = [personalize(g, region, settings, TrainSettings(), max_length=32, seed=s) for s in (0, 1)]
    a, b = (adapter_state(r.loaded.model) for r in runs)
    assert all(np.array_equal(a[k], b[k]) for k in a)  # no randomness: the seed does not matter
