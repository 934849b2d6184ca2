"""Classification metrics as pure functions over label arrays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def accuracy(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    """Fraction of predictions equal to the truth (0.0 for no examples)."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return float((t == p).mean()) if t.size else 0.0


def macro_f1(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, num_labels: int) -> float:
    """Unweighted mean of per-label F1 over labels present in the truth or the predictions."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    scores = []
    for label in range(num_labels):
        tp = int(((t == label) & (p == label)).sum())
        fp = int(((t != label) & (p == label)).sum())
        fn = int(((t == label) & (p != label)).sum())
        if tp + fp + fn == 0:
            continue  # a label absent from both says nothing about this split
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def weighted_mean(values: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Mean of ``values`` weighted by ``weights`` over their shared keys (0.0 when the weights sum to 0)."""
    shared = [k for k in values if k in weights]
    total = sum(weights[k] for k in shared)
    return float(sum(values[k] * weights[k] for k in shared) / total) if total else 0.0
