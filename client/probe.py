"""A linear probe: the classifier's last layer refit, by L2-regularised logistic regression, on the features the
frozen model feeds it. Convex and deterministic (L-BFGS from zero), and it needs one forward pass over the data,
no backward pass: on a small region it is far less noisy than a few dozen SGD steps.

The regularisation strength is chosen by k-fold cross-validation on the training features, so that the region's
validation split stays free for the choice between the global and the personalized model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from client.train import num_labels_of, pad_batch
from common.metrics import macro_f1

L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)  # penalty on the squared weights of standardised features, per example
FOLDS = 5


@dataclass(frozen=True)
class Probe:
    """A fitted probe, already in the units of the raw features: logits = features @ weight.T + bias."""

    weight: torch.Tensor  # (num_labels, num_features)
    bias: torch.Tensor  # (num_labels,)
    l2: float
    cv_macro_f1: float  # mean macro-F1 over the folds at the chosen l2 (nan without folds)
    train_loss: float


def output_layer(model: nn.Module, num_labels: int) -> nn.Linear:
    """The layer that produces the logits: the last trainable ``nn.Linear`` with ``num_labels`` outputs.

    In a peft model that is the trainable copy of the head (``modules_to_save``), whatever the architecture
    calls it (BERT ``classifier``, RoBERTa ``classifier.out_proj``, DistilBERT ``classifier``).
    """
    found = [
        m
        for m in model.modules()
        if isinstance(m, nn.Linear) and m.out_features == num_labels and m.weight.requires_grad
    ]
    if not found:
        raise ValueError(f"{type(model).__name__} has no trainable linear layer with {num_labels} outputs")
    return found[-1]


def head_features(
    model: nn.Module, layer: nn.Linear, ids: Sequence[list[int]], *, pad_id: int, batch_size: int
) -> torch.Tensor:
    """What ``layer`` receives for each tokenised text, in eval mode (no dropout), in input order."""
    batches = (pad_batch(ids[start : start + batch_size], pad_id) for start in range(0, len(ids), batch_size))
    return layer_inputs(model, layer, batches).to(torch.float64)


@torch.no_grad()
def layer_inputs(model: nn.Module, layer: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
    """What ``layer`` receives when ``model`` runs on each of ``batches`` in eval mode (no dropout), row by row
    in order; every module of ``model`` is left in the mode it was in."""
    captured: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0].detach()))
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        for batch in batches:
            model(**batch)
    finally:
        hook.remove()
        for module, training in modes:
            module.train(training)
    return torch.cat(captured)


class CachedFeatures(nn.Module):
    """Stands in for ``model`` while ``layer``, its output layer, is all that trains: what ``layer`` receives
    for each distinct text (``layer_inputs``, eval mode) is computed once by the frozen rest of the model, and
    every later step runs ``layer`` alone on it.

    Training through it differs from training ``model`` only in the dropout before ``layer`` and inside the
    frozen encoder, which it leaves out; it costs one forward pass per distinct text instead of one per example
    and step. Each example's gradient is still a function of that example alone (DP-SGD's per-example gradients
    are Opacus's hooks on ``layer``, client.dp). ``batch_size``: the rows per forward pass of the frozen model.
    """

    def __init__(self, model: nn.Module, layer: nn.Linear, batch_size: int) -> None:
        super().__init__()
        self.layer = layer
        # in a tuple, not a submodule: the frozen model's parameters stay out of this module's
        self._model = (model,)
        self.batch_size = batch_size
        self._features: dict[tuple[int, ...], torch.Tensor] = {}

    def train(self, mode: bool = True) -> CachedFeatures:
        """Set the mode of ``layer`` and of the frozen model, which is no submodule: ``train_encoded`` leaves the
        model it trained in eval mode."""
        super().train(mode)
        self._model[0].train(mode)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SequenceClassifierOutput:
        """The model's logits for the batch, from the cached features (computing those not seen before)."""
        keys = [tuple(row[mask.bool()].tolist()) for row, mask in zip(input_ids, attention_mask, strict=True)]
        first: dict[tuple[int, ...], int] = {}  # each text not seen before, at its first row in the batch
        for i, key in enumerate(keys):
            if key not in self._features:
                first.setdefault(key, i)
        if first:
            rows = torch.tensor(list(first.values()))
            chunks = (
                {"input_ids": input_ids[part], "attention_mask": attention_mask[part]}
                for part in rows.split(self.batch_size)
            )
            self._features.update(zip(first, layer_inputs(self._model[0], self.layer, chunks), strict=True))
        return SequenceClassifierOutput(logits=self.layer(torch.stack([self._features[key] for key in keys])))


def cached_features(model: nn.Module, batch_size: int) -> nn.Module:
    """``CachedFeatures`` of ``model`` when its trainable parameters are exactly those of its output layer
    (``output_layer``), else ``model`` itself."""
    try:
        layer = output_layer(model, num_labels_of(model))
    except ValueError:  # no trainable layer with as many outputs as labels
        return model
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return CachedFeatures(model, layer, batch_size) if trainable == {id(p) for p in layer.parameters()} else model


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, num_labels: int, l2: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Multinomial logistic regression: mean cross-entropy + ``l2`` * ||W||² by L-BFGS from zero.
    Returns (weight (num_labels, d), bias, final loss)."""
    weight = torch.zeros(num_labels, x.shape[1], dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(num_labels, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + l2 * (weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        loss = float(F.cross_entropy(x @ weight.T + bias, y))
    return weight.detach(), bias.detach(), loss


def _folds(y: np.ndarray, k: int) -> list[np.ndarray]:
    # stratified and deterministic: every k-th example of each class, in data order
    folds: list[list[int]] = [[] for _ in range(k)]
    for label in np.unique(y):
        for j, i in enumerate(np.flatnonzero(y == label)):
            folds[j % k].append(int(i))
    return [np.array(sorted(f)) for f in folds if f]


def _standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), x.std(0).clamp_min(1e-6)


def cross_validate(x: torch.Tensor, y: torch.Tensor, num_labels: int, l2: float, k: int = FOLDS) -> float:
    """Mean macro-F1 of the probe on held-out folds of (x, y)."""
    scores = []
    labels = y.numpy()
    for held in _folds(labels, k):
        keep = np.setdiff1d(np.arange(len(labels)), held)
        mean, std = _standardise(x[keep])
        w, b, _ = fit_logistic((x[keep] - mean) / std, y[keep], num_labels, l2)
        pred = (((x[held] - mean) / std) @ w.T + b).argmax(1).numpy()
        scores.append(macro_f1(labels[held], pred, num_labels))
    return float(np.mean(scores))


def fit_probe(x: torch.Tensor, y: torch.Tensor, num_labels: int, grid: Sequence[float] = L2_GRID) -> Probe:
    """Choose l2 from ``grid`` by cross-validated macro-F1 (ties: the stronger penalty), then fit on all of x.

    Features are standardised for the fit (one penalty suits every feature), and the standardisation is folded
    into the returned weights so that the probe applies to raw features, as the model's layer does.
    """
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"need as many labels as feature rows, got {len(y)} and {len(x)}")
    can_fold = min(np.bincount(y.numpy(), minlength=num_labels)[np.unique(y.numpy())]) >= 2
    scored = [(cross_validate(x, y, num_labels, l2), l2) for l2 in grid] if can_fold else []
    cv, l2 = max(scored, key=lambda s: (s[0], s[1])) if scored else (float("nan"), max(grid))
    mean, std = _standardise(x)
    w, b, loss = fit_logistic((x - mean) / std, y, num_labels, l2)
    weight = w / std
    return Probe(weight=weight, bias=b - weight @ mean, l2=l2, cv_macro_f1=cv, train_loss=loss)


@torch.no_grad()
def install(layer: nn.Linear, probe: Probe) -> None:
    """Write the probe into the model's output layer (the model then computes the probe's logits)."""
    layer.weight.copy_(probe.weight.to(layer.weight.dtype))
    if layer.bias is None:
        raise ValueError("the output layer has no bias; the probe needs one")
    layer.bias.copy_(probe.bias.to(layer.bias.dtype))
