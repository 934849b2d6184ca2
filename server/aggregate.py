"""The aggregation maths, as pure functions over arrays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Arrays = Mapping[str, np.ndarray]


def aggregation_weights(num_examples: Sequence[int], method: str) -> list[float]:
    """Normalised weights: by examples (``weighted``, the joint objective Σ N_r/N · L_r) or equal (``uniform``)."""
    if not num_examples:
        raise ValueError("no updates to weigh")
    if method == "uniform":
        return [1.0 / len(num_examples)] * len(num_examples)
    if method != "weighted":
        raise ValueError(f"unknown aggregation method {method!r}")
    if any(n < 0 for n in num_examples):
        raise ValueError(f"example counts must be >= 0, got {list(num_examples)}")
    total = float(sum(num_examples))
    if total <= 0:
        raise ValueError(f"example counts must sum to > 0, got {list(num_examples)}")
    return [n / total for n in num_examples]


def weighted_average(updates: Sequence[Arrays], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Σ_i w_i · update_i for every tensor name; the weights must already sum to 1."""
    if len(updates) != len(weights) or not updates:
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    out: dict[str, np.ndarray] = {}
    for name in updates[0]:
        # float64 accumulation keeps the mean exact to fp32 precision whatever the number of regions
        acc = np.zeros(np.shape(updates[0][name]), dtype=np.float64)
        for update, w in zip(updates, weights, strict=True):
            acc += w * np.asarray(update[name], dtype=np.float64)
        out[name] = acc.astype(np.asarray(updates[0][name]).dtype)
    return out


def server_step(current: Arrays, average: Arrays, lr: float) -> dict[str, np.ndarray]:
    """Move the global model ``lr`` times along the averaged update; ``lr == 1`` returns the average (FedAvg)."""
    if lr == 1.0:
        return {k: np.asarray(v).copy() for k, v in average.items()}
    return {
        k: (np.asarray(current[k], np.float64) + lr * (np.asarray(average[k], np.float64) - current[k])).astype(
            np.asarray(average[k]).dtype
        )
        for k in average
    }


def update_problem(update: Arrays, reference: Arrays) -> str | None:
    """Why an update cannot be aggregated with ``reference`` (names, shapes, dtypes, finiteness), or None."""
    if set(update) != set(reference):
        missing = sorted(set(reference) - set(update))[:3]
        extra = sorted(set(update) - set(reference))[:3]
        return f"tensor names differ (missing {missing}, unexpected {extra})"
    for name, ref in reference.items():
        arr = np.asarray(update[name])
        if arr.shape != np.shape(ref) or arr.dtype != np.asarray(ref).dtype:
            return f"{name}: got {arr.dtype}{list(arr.shape)}, expected {np.asarray(ref).dtype}{list(np.shape(ref))}"
        if not np.isfinite(arr).all():
            return f"{name}: holds NaN or infinity"
    return None


def mean_from_sum(total: Arrays, total_weight: int, clipping_range: float, target_range: int) -> dict[str, np.ndarray]:
    """The weighted mean Σ w_r·θ_r / Σ w_r from a secure round's unmasked sums, as float64.

    ``total`` holds Σ w_r·q_r per tensor, with q_r a region's values quantized from [-B, B] onto [0, T]
    (B = ``clipping_range``, T = ``target_range``); the mean of the quantized values maps back the same way, so
    this equals the weighted mean of the dequantized updates (within one step 2B/T of the unquantized one).
    """
    if total_weight <= 0:
        raise ValueError(f"the sum of weights must be > 0, got {total_weight}")
    step = 2.0 * clipping_range / target_range
    return {k: np.asarray(v, np.float64) / total_weight * step - clipping_range for k, v in total.items()}
