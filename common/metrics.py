"""Classification metrics as pure functions over label arrays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def accuracy(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    """Fraction of predictions equal to the truth (0.0 for no examples)."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return float((t == p).mean()) if t.size else 0.0


def confusion(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, num_labels: int) -> np.ndarray:
    """Counts of (truth, prediction) pairs: row = true label, column = predicted label, ``num_labels`` square.
    Regions' matrices add up to the matrix of their pooled examples (``pooled_macro_f1``)."""
    t, p = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape:
        raise ValueError(f"{t.size} labels but {p.size} predictions")
    outside = np.concatenate([t, p])
    if outside.size and (outside.min() < 0 or outside.max() >= num_labels):
        raise ValueError(f"a label or prediction outside 0..{num_labels - 1}")
    return np.bincount(t * num_labels + p, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def macro_f1_of(counts: np.ndarray) -> float:
    """Unweighted mean of per-label F1 of a ``confusion`` matrix, over the labels present in the truth or the
    predictions (a label absent from both says nothing about the split); 0.0 for no examples."""
    counts = np.asarray(counts, dtype=np.int64)
    tp = np.diag(counts)
    fp = counts.sum(axis=0) - tp
    fn = counts.sum(axis=1) - tp
    present = tp + fp + fn > 0
    if not present.any():
        return 0.0
    return float(np.mean(2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])))


def macro_f1(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, num_labels: int) -> float:
    """Unweighted mean of per-label F1 over labels present in the truth or the predictions.

    On a split of one class this is degenerate: predicting that class everywhere scores 1.0, and a model right
    on 89 % of it scores about 0.47 (the wrongly predicted class enters with F1 0). Across label-skewed regions
    compare ``pooled_macro_f1`` instead."""
    return macro_f1_of(confusion(y_true, y_pred, num_labels))


def pooled_macro_f1(matrices: Sequence[np.ndarray]) -> float:
    """Macro-F1 of every region's examples pooled, from the regions' ``confusion`` matrices (each region
    predicted by its own model of one mode): not degenerate on regions of one class, unlike a mean of the
    regions' macro-F1."""
    arrays = [np.asarray(m, dtype=np.int64) for m in matrices]
    if not arrays:
        raise ValueError("pooled_macro_f1 needs at least one confusion matrix")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 or len(arrays[0].shape) != 2 or arrays[0].shape[0] != arrays[0].shape[1]:
        raise ValueError(f"confusion matrices of one square shape needed, got {sorted(shapes)}")
    return macro_f1_of(np.sum(arrays, axis=0))


def weighted_mean(values: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Mean of ``values`` weighted by ``weights`` over their shared keys (0.0 when the weights sum to 0)."""
    shared = [k for k in values if k in weights]
    total = sum(weights[k] for k in shared)
    return float(sum(values[k] * weights[k] for k in shared) / total) if total else 0.0
