"""The metric functions against hand-computed values, and the pooled macro-F1 against pooling the examples."""

from __future__ import annotations

import numpy as np
import pytest

from common.metrics import confusion, macro_f1, pooled_macro_f1


def test_confusion_counts_truth_by_prediction() -> None:
    counts = confusion([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert confusion([], [], 2).tolist() == [[0, 0], [0, 0]]


def test_macro_f1_is_the_mean_f1_of_the_labels_present() -> None:
    # per label: F1(0) = 2*1/(2+1+1), F1(1) = 2*1/(2+1+0), F1(2) = 2*2/(4+0+1); label 3 absent from both
    expected = (2 / 4 + 2 / 3 + 4 / 5) / 3
    assert macro_f1([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 4) == pytest.approx(expected)
    assert macro_f1([], [], 2) == 0.0


def test_one_class_splits_are_degenerate_and_the_pooled_score_is_not() -> None:
    """The finding of issue 16: per-region macro-F1 rewards a constant predictor on one-class regions."""
    rng = np.random.default_rng(0)
    negative = np.zeros(100, dtype=int)  # a region of one class (0)
    positive = np.ones(100, dtype=int)  # and one of the other
    model = {"neg": np.where(rng.random(100) < 0.89, 0, 1), "pos": np.where(rng.random(100) < 0.89, 1, 0)}
    constant = {"neg": np.zeros(100, dtype=int), "pos": np.zeros(100, dtype=int)}  # "neg" everywhere
    # per region: the constant predictor is perfect on the negative region, the model that is mostly right is not
    assert macro_f1(negative, constant["neg"], 2) == 1.0
    assert macro_f1(negative, model["neg"], 2) < 0.5
    # pooled over both regions: the model is far better than the constant
    pooled = {
        name: pooled_macro_f1([confusion(negative, p["neg"], 2), confusion(positive, p["pos"], 2)])
        for name, p in (("model", model), ("constant", constant))
    }
    assert pooled["model"] > 0.8 and pooled["constant"] < 0.34
    # and it is exactly the macro-F1 of the concatenated examples
    both = np.concatenate([negative, positive])
    assert pooled["model"] == pytest.approx(macro_f1(both, np.concatenate([model["neg"], model["pos"]]), 2))


def _reference_macro_f1(truth: np.ndarray, pred: np.ndarray, num_labels: int) -> float:
    """Per-label counts by comparison, not through a confusion matrix (the definition, written out)."""
    scores = []
    for label in range(num_labels):
        tp = int(((truth == label) & (pred == label)).sum())
        fp = int(((truth != label) & (pred == label)).sum())
        fn = int(((truth == label) & (pred != label)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def test_macro_f1_and_the_pooled_score_agree_with_the_definition() -> None:
    rng = np.random.default_rng(1)
    parts = [(rng.integers(0, 5, n), rng.integers(0, 4, n)) for n in (300, 7, 40)]  # label 4 never predicted
    for truth, pred in parts:
        assert macro_f1(truth, pred, 5) == pytest.approx(_reference_macro_f1(truth, pred, 5))
    pooled = pooled_macro_f1([confusion(t, p, 5) for t, p in parts])
    every = np.concatenate([t for t, _ in parts]), np.concatenate([p for _, p in parts])
    assert pooled == pytest.approx(_reference_macro_f1(*every, 5))


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        pooled_macro_f1([])
    with pytest.raises(ValueError, match="one square shape"):
        pooled_macro_f1([np.zeros((2, 2)), np.zeros((3, 3))])
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        confusion([0, 2], [0, 1], 2)
    with pytest.raises(ValueError, match="2 labels but 1 predictions"):
        confusion([0, 1], [0], 2)
