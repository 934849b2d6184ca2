"""The aggregation maths, as pure functions over arrays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.config import OPTIMIZER_HYPERPARAMETERS, AggregationSettings

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


@dataclass(frozen=True, eq=False)
class OptimizerState:
    """What a server optimizer carries from one round to the next: its buffers and the steps taken.

    ``arrays`` holds float64 buffers named ``<buffer>/<tensor name>`` (``m/…`` and ``v/…`` for the adaptive
    optimizers, ``momentum/…`` for fedavgm; none for fedavg); they are zeros until the first step makes them.
    """

    step: int = 0
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)


# the buffers each optimizer keeps per tensor
_BUFFERS = {
    "fedavg": (),
    "fedavgm": ("momentum",),
    "fedadam": ("m", "v"),
    "fedyogi": ("m", "v"),
    "fedadagrad": ("m", "v"),
}


@dataclass(frozen=True)
class ServerOptimizer:
    """The server step from a round's mean adapter to the new global one (Reddi et al. 2021, Algorithm 2).

    With Δ = mean − θ for every tensor: fedavg θ ← θ + η·Δ (η = 1 returns the mean itself); fedavgm
    v ← β·v + Δ, θ ← θ + η·v; fedadagrad, fedadam, fedyogi m ← β1·m + (1−β1)·Δ, then v ← v + Δ²
    (adagrad), β2·v + (1−β2)·Δ² (adam), v − (1−β2)·Δ²·sign(v − Δ²) (yogi), and θ ← θ + η·m/(√v + τ). The
    buffers start at zero, as Flower's strategies' do (the paper asks v₋₁ ≥ τ² for its proof; √v + τ ≥ τ already
    bounds the step). No bias correction: Flower's FedAdam divides η by (1 − β1^(t+1))/√(1 − β2^(t+1)), the paper
    does not. Arithmetic is in float64; the new adapter has the dtype of the mean.

    Unused hyperparameters stay at their neutral values; ``hyperparameters`` names the ones the optimizer reads.
    """

    name: str = "fedavg"
    server_lr: float = 1.0
    momentum: float = 0.0
    beta_1: float = 0.0
    beta_2: float = 0.0
    tau: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZER_HYPERPARAMETERS:
            raise ValueError(f"unknown server optimizer {self.name!r} (known: {', '.join(OPTIMIZER_HYPERPARAMETERS)})")

    @classmethod
    def from_settings(cls, settings: AggregationSettings) -> ServerOptimizer:
        """The optimizer ``settings`` configure (``aggregation.optimizer`` and its hyperparameters)."""
        return cls(settings.optimizer, **settings.optimizer_settings())

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ServerOptimizer:
        """The optimizer a ledger entry or state file records as ``{"name": …, <hyperparameter>: …}``
        (``to_record``); a ValueError names what is unknown or missing."""
        name = str(record.get("name"))
        if name not in OPTIMIZER_HYPERPARAMETERS:
            raise ValueError(f"unknown server optimizer {name!r}")
        wanted = set(OPTIMIZER_HYPERPARAMETERS[name])
        if set(record) - {"name"} != wanted:
            raise ValueError(f"{name} records {sorted(set(record) - {'name'})}, expected {sorted(wanted)}")
        return cls(name, **{k: float(record[k]) for k in wanted})

    def hyperparameters(self) -> dict[str, float]:
        """The hyperparameters this optimizer reads, by their config names."""
        return {k: getattr(self, k) for k in OPTIMIZER_HYPERPARAMETERS[self.name]}

    def to_record(self) -> dict[str, Any]:
        """Name and hyperparameters as plain data (the ledger's and the state file's record)."""
        return {"name": self.name, **self.hyperparameters()}

    def state_problem(self, state: OptimizerState, reference: Arrays) -> str | None:
        """Why ``state`` cannot be this optimizer's state for an adapter shaped like ``reference``, or None."""
        expected = {f"{b}/{k}": np.shape(v) for b in _BUFFERS[self.name] for k, v in reference.items()}
        if state.step < 0:
            return f"step {state.step} is negative"
        if state.step == 0 and not state.arrays:
            return None
        if set(state.arrays) != set(expected):
            missing = sorted(set(expected) - set(state.arrays))[:3]
            extra = sorted(set(state.arrays) - set(expected))[:3]
            return f"its buffers are not {self.name}'s for this adapter (missing {missing}, unexpected {extra})"
        for name, shape in expected.items():
            arr = np.asarray(state.arrays[name])
            if arr.shape != shape or arr.dtype != np.float64 or not np.isfinite(arr).all():
                return f"{name}: got {arr.dtype}{list(arr.shape)}, expected finite float64{list(shape)}"
        return None

    def step(
        self, current: Arrays, average: Arrays, state: OptimizerState
    ) -> tuple[dict[str, np.ndarray], OptimizerState]:
        """The new global adapter from ``current`` (the one the round started from) and the round's weighted
        mean ``average``, and the state after the step. Pure: neither the inputs nor ``state`` are changed."""
        if set(current) != set(average):
            raise ValueError(f"the mean's tensors {sorted(average)[:3]}… are not the global adapter's")
        problem = self.state_problem(state, current)
        if problem:
            raise ValueError(f"not a {self.name} state for this adapter: {problem}")
        if self.name == "fedavg" and self.server_lr == 1.0:
            # the mean itself, bit for bit: no round trip through θ + (mean − θ)
            return {k: np.asarray(v).copy() for k, v in average.items()}, OptimizerState(state.step + 1)
        x = {k: np.asarray(current[k], np.float64) for k in average}
        delta = {k: np.asarray(average[k], np.float64) - x[k] for k in average}
        buffers = dict(state.arrays)
        for b in _BUFFERS[self.name]:
            for k in delta:
                buffers.setdefault(f"{b}/{k}", np.zeros_like(delta[k]))
        # each formula in the order of operations Flower's strategies use, so that both give the same bits
        moved: dict[str, np.ndarray] = {}
        for k, d in delta.items():
            if self.name == "fedavg":
                moved[k] = x[k] + self.server_lr * d
            elif self.name == "fedavgm":
                v = buffers[f"momentum/{k}"] = np.asarray(self.momentum * buffers[f"momentum/{k}"] + d)
                moved[k] = x[k] + self.server_lr * v
            else:
                m = buffers[f"m/{k}"] = np.asarray(self.beta_1 * buffers[f"m/{k}"] + (1 - self.beta_1) * d)
                v = buffers[f"v/{k}"] = np.asarray(self._second_moment(buffers[f"v/{k}"], d))
                moved[k] = x[k] + self.server_lr * m / (np.sqrt(v) + self.tau)
        new = {k: np.asarray(moved[k]).astype(np.asarray(average[k]).dtype) for k in average}
        return new, OptimizerState(state.step + 1, buffers)

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        squared = delta**2
        if self.name == "fedadagrad":
            return v + squared
        if self.name == "fedadam":
            return self.beta_2 * v + (1 - self.beta_2) * squared
        return v - (1.0 - self.beta_2) * squared * np.sign(v - squared)  # fedyogi


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


def frozen_problem(update: Arrays, reference: Arrays, fragment: str) -> str | None:
    """Why ``update`` breaks a freeze: the first tensor whose name contains ``fragment`` and whose values differ
    from ``reference`` (what was sent), or None. With ``aggregation.lora`` ffa the fragment is ``lora_A``: every
    node keeps A at the shared init, so only B is averaged and the average is exact."""
    for name in sorted(reference):
        if fragment in name and not np.array_equal(np.asarray(update[name]), np.asarray(reference[name])):
            return f"{name}: differs from the one sent, but aggregation.lora is ffa ({fragment} stays as sent)"
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
