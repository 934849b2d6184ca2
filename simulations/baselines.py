"""Baselines computed beside a simulation: centralized (the joint objective) and each region alone.

Both use the same model and optimizer as the federated run and as much training (``matched_settings``), the same
plain ``train_local`` / ``evaluate`` functions as the clients, and, as the federated run keeps its best round, keep
their best of as many validation checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping

import numpy as np
import torch

from client.train import EvalResult, evaluate, plan_steps, predict_proba, scores, train_local
from common.config import RunConfig, TrainSettings
from common.data import Example, RegionData
from common.metrics import weighted_mean
from common.model import LoadedModel, adapter_state, build_model, load_adapter_state
from common.seeds import derive_seed
from server.federation import EarlyStopper

Scores = dict[str, dict[str, float]]


def matched_settings(cfg: RunConfig, regions: int = 1) -> TrainSettings:
    """Training settings giving a baseline as much training as the federated run: as many passes over each
    example (``epochs × rounds``), or with ``train.local_steps`` as many optimizer steps as the ``regions`` it
    trains on did together (``local_steps × rounds × regions``: the same number of examples seen).

    The label-skew remedies apply as in the run: ``logit_adjust`` with the prior of the data the baseline trains
    on (centralized: the pooled prior, local-only: the region's own, as its node would), a frozen head frozen.
    ``prox_mu`` does not: a baseline is one training call, so its proximal term would pull toward the untrained
    initial adapter for the whole run, not toward a round's global model."""
    t = dataclasses.replace(cfg.train, prox_mu=0.0)
    if t.local_steps is not None:
        return dataclasses.replace(t, local_steps=t.local_steps * cfg.rounds * regions)
    return dataclasses.replace(
        t, epochs=t.epochs * cfg.rounds, max_steps=t.max_steps * cfg.rounds if t.max_steps else None
    )


def _scores(result: EvalResult) -> dict[str, float]:
    return {"accuracy": result.accuracy, "macro_f1": result.macro_f1, "loss": result.loss}


def checkpoint_steps(total: int, rounds: int) -> list[int]:
    """The steps after which a baseline of ``total`` steps is validated: as many checkpoints as the federated run
    has rounds (fewer when there are fewer steps), evenly spread, the last one at the end."""
    return sorted({max(1, math.ceil(total * k / rounds)) for k in range(1, rounds + 1)})


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


def _train_and_test(
    cfg: RunConfig,
    train: list[Example],
    tests: Mapping[str, RegionData],
    seed_tag: str,
    predictions: dict[str, np.ndarray] | None = None,
    regions: int = 1,
) -> Scores:
    """Train one model on ``train`` (the data of ``regions`` regions); test it on each region; put its test
    predictions in ``predictions``.

    Like the federated run, which keeps its best round on validation, the baseline keeps its best checkpoint:
    it is validated on the val splits of ``tests`` after each of ``cfg.rounds`` even shares of its steps
    (``checkpoint_steps``), and the best one (by ``early_stopping``'s metric) is the one tested. More passes
    over-fit a baseline as they do the federation: best is compared with best.
    """
    from tqdm import tqdm

    loaded = build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed)
    settings = matched_settings(cfg, regions)
    total = plan_steps(len(train), settings)
    checkpoints = checkpoint_steps(total, cfg.rounds)
    stopper = EarlyStopper(None, cfg.early_stopping.metric != "loss", cfg.early_stopping.min_delta)
    best: dict[str, torch.Tensor] | None = None
    # disable=None: a bar on a terminal, nothing in CI logs
    with tqdm(total=total, desc=seed_tag, unit="step", disable=None, leave=False) as bar:

        def progress(step: int, steps: int, loss: float) -> None:
            nonlocal best
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if step not in checkpoints:
                return
            stopper.update(step, validation_score(cfg, loaded, tests))
            if stopper.best_round == step:
                best = adapter_state(loaded.model)
            loaded.model.train()  # evaluating switched dropout off; the steps left train as before

        train_local(
            loaded.model,
            loaded.tokenizer,
            train,
            settings,
            max_length=cfg.model.max_length,
            seed=derive_seed(cfg.seed, seed_tag),
            progress=progress,
        )
    if best is not None:
        load_adapter_state(loaded.model, best)
    loaded.model.eval()
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
) -> tuple[Scores, float]:
    """Each region trains alone on its own data and is tested on its own test split.

    ``predictions``, if given, receives each region's test predictions (for the paired A/B comparison).
    """
    started = time.perf_counter()
    scores: Scores = {}
    for name, region in data.items():
        log(f"local-only: training {name} ({len(region.train)} examples)")
        scores.update(_train_and_test(cfg, region.train, {name: region}, f"local/{name}", predictions))
    return scores, time.perf_counter() - started
