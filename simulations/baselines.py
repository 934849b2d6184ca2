"""Baselines computed beside a simulation: centralized (the joint objective) and each region alone.

Both use the same model and optimizer as the federated run and as much training
(``client.local_only.matched_settings``), the same plain ``train_local`` / ``evaluate`` functions as the clients,
and, as the federated run keeps its best round, keep their best of as many validation checkpoints
(``client.local_only.train_best_checkpoint``, with which a node trains its own local-only model).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from client.local_only import KeptCheckpoint, matched_settings, seed_tag, train_best_checkpoint
from client.train import EvalResult, evaluate, predict_proba, scores
from common.config import RunConfig
from common.data import Example, RegionData
from common.metrics import weighted_mean
from common.model import LoadedModel, adapter_state, build_model
from common.runfiles import CONFUSION, KEPT_CHECKPOINT
from common.seeds import derive_seed

Scores = dict[str, dict[str, Any]]


def _scores(result: EvalResult) -> dict[str, Any]:
    # the confusion matrix lets the summary pool the regions' test examples (runfolder.summary.POOLED)
    return {
        "accuracy": result.accuracy,
        "macro_f1": result.macro_f1,
        "loss": result.loss,
        CONFUSION: [list(row) for row in result.confusion],
    }


def _evaluate(cfg: RunConfig, loaded: LoadedModel, examples: list[Example]) -> EvalResult:
    return evaluate(
        loaded.model,
        loaded.tokenizer,
        examples,
        len(cfg.labels),
        max_length=cfg.model.max_length,
        batch_size=cfg.train.eval_batch_size,
    )


def validation_score(cfg: RunConfig, loaded: LoadedModel, regions: Mapping[str, RegionData]) -> float | None:
    """The federated run's validation criterion (``early_stopping.metric``, the example-weighted mean over the
    regions' val splits) for ``loaded`` on ``regions``; None when no region has a val example."""
    results = {name: _evaluate(cfg, loaded, region.val) for name, region in regions.items() if region.val}
    if not results:
        return None
    metric = cfg.early_stopping.metric
    return weighted_mean(
        {name: float(getattr(r, metric)) for name, r in results.items()},
        {name: float(r.num_examples) for name, r in results.items()},
    )


def train_baseline(
    cfg: RunConfig, train: list[Example], tag: str, regions: int, validate: Callable[[LoadedModel], float | None]
) -> tuple[LoadedModel, KeptCheckpoint]:
    """Train one baseline model on ``train`` (the data of ``regions`` regions) with as much training as the
    federated run (``client.local_only.matched_settings``), validated by ``validate`` after each of ``cfg.rounds``
    even shares of its steps; the best checkpoint (by ``early_stopping``'s metric) is left loaded."""
    loaded = build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed)
    kept = train_best_checkpoint(
        loaded,
        train,
        matched_settings(cfg.train, cfg.rounds, regions),
        cfg.rounds,
        lambda: validate(loaded),
        higher_is_better=cfg.early_stopping.metric != "loss",
        min_delta=cfg.early_stopping.min_delta,
        max_length=cfg.model.max_length,
        seed=derive_seed(cfg.seed, tag),
        desc=tag,
    )
    return loaded, kept


def _train_and_test(
    cfg: RunConfig,
    train: list[Example],
    tests: Mapping[str, RegionData],
    tag: str,
    predictions: dict[str, np.ndarray] | None = None,
    regions: int = 1,
    adapters: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Scores:
    """Train one model on ``train`` (the data of ``regions`` regions); test it on each region; put its test
    predictions in ``predictions`` and its adapter state (best checkpoint) in ``adapters``.

    Like the federated run, which keeps its best round on validation, the baseline keeps its best checkpoint:
    it is validated on the val splits of ``tests`` after each of ``cfg.rounds`` even shares of its steps
    (``train_baseline``), and the best one (by ``early_stopping``'s metric) is the one tested. More passes
    over-fit a baseline as they do the federation: best is compared with best.
    """
    loaded, kept = train_baseline(cfg, train, tag, regions, lambda model: validation_score(cfg, model, tests))
    if adapters is not None:
        for name in tests:
            adapters[name] = adapter_state(loaded.model)
    # one pass over each test split gives both the scores and the predictions the paired comparisons read
    out: Scores = {}
    for name, region in tests.items():
        probs = predict_proba(
            loaded.model,
            loaded.tokenizer,
            [ex.text for ex in region.test],
            max_length=cfg.model.max_length,
            batch_size=cfg.train.eval_batch_size,
        )
        out[name] = _scores(scores(probs, np.array([ex.label for ex in region.test], dtype=int), len(cfg.labels)))
        # which of its checkpoints the baseline kept, beside the federation's best round: best against best
        out[name][KEPT_CHECKPOINT] = kept.to_json()
        if predictions is not None:
            predictions[name] = probs.argmax(axis=1)
    return out


def run_centralized(cfg: RunConfig, data: Mapping[str, RegionData]) -> tuple[Scores, float]:
    """One model trained on the union of every region's train split; test scores per region and seconds."""
    started = time.perf_counter()
    union = [ex for region in data.values() for ex in region.train]
    return _train_and_test(cfg, union, data, "centralized", regions=len(data)), time.perf_counter() - started


def run_local_only(
    cfg: RunConfig,
    data: Mapping[str, RegionData],
    log: Callable[[str], None] = print,
    predictions: dict[str, np.ndarray] | None = None,
    adapters: dict[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[Scores, float]:
    """Each region trains alone on its own data (``client.local_only``, as a node would) and is tested on its own
    test split.

    ``predictions``, if given, receives each region's test predictions (for the paired A/B comparison);
    ``adapters`` each region's trained adapter state (for ``personalize.consider_local_only``, which may serve it).
    """
    started = time.perf_counter()
    scores: Scores = {}
    for name, region in data.items():
        log(f"local-only: training {name} ({len(region.train)} examples)")
        scores.update(_train_and_test(cfg, region.train, {name: region}, seed_tag(name), predictions, 1, adapters))
    return scores, time.perf_counter() - started
