"""Personalization on a region's own node: adapt the global adapter to the region, then keep whichever of the
global and the personalized model is better on the region's validation split. Nothing here sends anything.

Also the paired bootstrap used to compare two models on the same test examples (A/B evaluation).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np

from common.config import PersonalizeSettings, TrainSettings
from common.data import RegionData
from common.metrics import macro_f1
from common.model import LoadedModel
from common.train import EvalResult, TrainResult, evaluate, train_local

GLOBAL = "global"
PERSONALIZED = "personalized"


@dataclass(frozen=True)
class Personalized:
    """The outcome of personalizing one region: the model and why it was (or was not) chosen."""

    loaded: LoadedModel  # the personalized model
    train: TrainResult
    val_global: EvalResult
    val_personalized: EvalResult
    chosen: str  # GLOBAL or PERSONALIZED, by validation macro-F1 (ties keep the global model)


def _freeze_all_but_head(loaded: LoadedModel) -> None:
    for name, param in loaded.model.named_parameters():
        param.requires_grad_("modules_to_save" in name)


def local_settings(train: TrainSettings, settings: PersonalizeSettings) -> TrainSettings:
    """The training settings of personalization: the run's, with its own lr, epochs and KL weight."""
    return dataclasses.replace(
        train,
        lr=settings.lr,
        epochs=settings.epochs,
        max_steps=None,
        warmup_steps=0,
        kl_to_global=settings.kl_to_global if settings.mode == "continue" else 0.0,
    )


def personalize(
    global_model: LoadedModel,
    data: RegionData,
    settings: PersonalizeSettings,
    train: TrainSettings,
    *,
    max_length: int,
    seed: int,
) -> Personalized:
    """Fine-tune a copy of ``global_model`` on the region's train split (``head``: the head only; ``continue``:
    adapter + head, optionally pulled toward the global predictions by KL) and choose on validation.

    Without a validation split the personalized model is chosen (there is nothing to choose by).
    """
    if settings.mode not in ("head", "continue"):
        raise ValueError(f"personalize.mode {settings.mode!r} cannot run (head or continue)")
    local = LoadedModel(copy.deepcopy(global_model.model), global_model.tokenizer, global_model.labels)
    if settings.mode == "head":
        _freeze_all_but_head(local)
    result = train_local(
        local.model, local.tokenizer, data.train, local_settings(train, settings), max_length=max_length, seed=seed
    )
    n = len(global_model.labels)
    batch = train.eval_batch_size
    val_g = evaluate(global_model.model, global_model.tokenizer, data.val, n, max_length=max_length, batch_size=batch)
    val_p = evaluate(local.model, local.tokenizer, data.val, n, max_length=max_length, batch_size=batch)
    better = not data.val or val_p.macro_f1 > val_g.macro_f1
    return Personalized(local, result, val_g, val_p, PERSONALIZED if better else GLOBAL)


@dataclass(frozen=True)
class Difference:
    """Macro-F1 of B minus A on the same examples, with a paired-bootstrap confidence interval."""

    diff: float
    low: float
    high: float
    resamples: int
    level: float

    def to_json(self) -> dict[str, float]:
        """A JSON-able view."""
        return dataclasses.asdict(self)


def paired_bootstrap(
    truth: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    num_labels: int,
    *,
    resamples: int,
    seed: int,
    level: float = 0.95,
) -> Difference:
    """Macro-F1(B) − macro-F1(A) and its percentile CI from resampling examples with replacement.

    Both models are scored on the same resampled indices each time, which is what makes it paired.
    """
    if not len(truth) == len(pred_a) == len(pred_b) or len(truth) == 0:
        raise ValueError(f"need equal, non-empty arrays, got {len(truth)}, {len(pred_a)}, {len(pred_b)}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(truth), size=(resamples, len(truth)))
    diffs = np.array(
        [macro_f1(truth[i], pred_b[i], num_labels) - macro_f1(truth[i], pred_a[i], num_labels) for i in idx]
    )
    tail = (1.0 - level) / 2.0
    return Difference(
        diff=macro_f1(truth, pred_b, num_labels) - macro_f1(truth, pred_a, num_labels),
        low=float(np.quantile(diffs, tail)),
        high=float(np.quantile(diffs, 1.0 - tail)),
        resamples=resamples,
        level=level,
    )
