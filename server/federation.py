"""The federated run on the server: rounds of train + validate, early stopping, checkpoints, final test.

Written as a plain loop over the strategy's verbs (``configure_train``, ``aggregate_train``, …) rather than
``Strategy.start`` because it also stops early, keeps the best round, and records every region every round.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from common import keys
from common.config import RunConfig, client_task
from common.model import (
    LoadedModel,
    adapter_state,
    build_model,
    full_model_nbytes,
    load_adapter_state,
    save_adapter,
    state_nbytes,
)
from server.strategy import RegionFedAvg, RoundLog

log = logging.getLogger("fedlocale.server")

FEDERATION_FILE = "federation.json"
METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
_METRIC_KEYS = {keys.ACCURACY: "accuracy", keys.MACRO_F1: "macro_f1", keys.LOSS: "loss"}


class FederationError(RuntimeError):
    """The federation cannot go on (too few regions replied)."""


@dataclass
class EarlyStopper:
    """Tracks the best round of a validation metric and says when ``patience`` rounds brought nothing."""

    patience: int | None
    higher_is_better: bool = True
    min_delta: float = 0.0
    best_round: int = 0
    best_value: float | None = None

    def update(self, server_round: int, value: float | None) -> bool:
        """Record a round's value; True when training should stop."""
        if value is not None:
            better = self.best_value is None or (
                value > self.best_value + self.min_delta
                if self.higher_is_better
                else value < self.best_value - self.min_delta
            )
            if better:
                self.best_round, self.best_value = server_round, value
        elif self.best_value is None:
            self.best_round = server_round  # nothing to compare: the newest model is the best we know
        return self.patience is not None and server_round - self.best_round >= self.patience


@dataclass
class FederationResult:
    """A finished federation: per-round records, the chosen round and its test results."""

    rounds: list[dict[str, Any]]
    best_round: int
    stopped_early: bool
    test: dict[str, dict[str, float]]
    adapter_bytes: int
    full_model_bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-able view."""
        return {
            "rounds": self.rounds,
            "best_round": self.best_round,
            "stopped_early": self.stopped_early,
            "test": self.test,
            "adapter_bytes": self.adapter_bytes,
            "full_model_bytes": self.full_model_bytes,
            "seconds": self.seconds,
        }


def _region_metrics(round_log: RoundLog) -> dict[str, dict[str, float]]:
    return {
        r.region: {
            **{name: r.metrics[k] for k, name in _METRIC_KEYS.items() if k in r.metrics},
            "num_examples": r.num_examples,
        }
        for r in round_log.replies
    }


class MetricsWriter:
    """Appends one JSON line per round × region × split to ``metrics.jsonl``, flushed each round."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("")

    def write(self, server_round: int, split: str, per_region: dict[str, dict[str, float]]) -> None:
        """Write the lines of one split of one round."""
        with self.path.open("a", encoding="utf-8") as fh:
            for region, values in per_region.items():
                fh.write(json.dumps({"round": server_round, "region": region, "split": split, **values}) + "\n")


def _send(grid: Grid, messages: Any, timeout: float) -> list[Any]:
    return list(grid.send_and_receive(messages=list(messages), timeout=timeout))


def _task_config(cfg: RunConfig, server_round: int, split: str | None = None) -> ConfigRecord:
    record = ConfigRecord({keys.TASK: client_task(cfg, server_round).to_json()})
    if split is not None:
        record[keys.SPLIT] = split
    return record


def _train_round(
    grid: Grid, strategy: RegionFedAvg, cfg: RunConfig, server_round: int, arrays: ArrayRecord
) -> tuple[ArrayRecord, dict[str, Any]]:
    timeout = cfg.aggregation.round_timeout
    replies = _send(
        grid, strategy.configure_train(server_round, arrays, _task_config(cfg, server_round), grid), timeout
    )
    new_arrays, _ = strategy.aggregate_train(server_round, replies)
    train = strategy.last_train
    if len(train.replies) < cfg.aggregation.min_clients:
        raise FederationError(
            f"round {server_round}: {len(train.replies)} region(s) replied, at least "
            f"{cfg.aggregation.min_clients} needed; rejected: {train.rejected or 'none'}"
        )
    participants = [r.region for r in train.replies]
    record = {
        "round": server_round,
        "participants": participants,
        "missing": [n for n in cfg.region_names if n not in participants],
        "rejected": train.rejected,
        "bytes_up": sum(r.bytes_up for r in train.replies),
        "bytes_down": train.bytes_down,
        "train": {
            r.region: {"loss": r.metrics[keys.TRAIN_LOSS], "num_examples": r.num_examples} for r in train.replies
        },
    }
    return new_arrays or arrays, record


def _evaluate(
    grid: Grid, strategy: RegionFedAvg, cfg: RunConfig, server_round: int, arrays: ArrayRecord, split: str
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    messages = strategy.configure_evaluate(server_round, arrays, _task_config(cfg, server_round, split), grid)
    overall = strategy.aggregate_evaluate(server_round, _send(grid, messages, cfg.aggregation.round_timeout))
    per_region = _region_metrics(strategy.last_evaluate)
    named = {name: float(overall[k]) for k, name in _METRIC_KEYS.items()} if overall else {}  # type: ignore[arg-type]
    return per_region, named


def run_rounds(
    grid: Grid,
    cfg: RunConfig,
    loaded: LoadedModel,
    out_dir: Path,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> FederationResult:
    """Run the federation for ``cfg`` from the adapter in ``loaded``; write metrics, checkpoints, the adapter."""
    started = time.perf_counter()
    strategy = RegionFedAvg(
        cfg.region_names,
        method=cfg.aggregation.method,
        server_lr=cfg.aggregation.server_lr,
        fraction_train=cfg.aggregation.fraction_train,
        min_clients=cfg.aggregation.min_clients,
        seed=cfg.seed,
    )
    stop = cfg.early_stopping
    stopper = EarlyStopper(stop.patience, higher_is_better=stop.metric != "loss", min_delta=stop.min_delta)
    writer = MetricsWriter(out_dir / METRICS_FILE)
    arrays = best = ArrayRecord(adapter_state(loaded.model))
    rounds: list[dict[str, Any]] = []
    stopped_early = False
    for server_round in range(1, cfg.rounds + 1):
        arrays, record = _train_round(grid, strategy, cfg, server_round, arrays)
        record["val"], record["val_overall"] = _evaluate(grid, strategy, cfg, server_round, arrays, keys.VAL)
        record["bytes_down"] += strategy.last_evaluate.bytes_down
        writer.write(server_round, keys.TRAIN, record["train"])
        writer.write(server_round, keys.VAL, {k: v for k, v in record["val"].items() if v["num_examples"]})
        _save_checkpoint(loaded, arrays, out_dir / CHECKPOINTS_DIR / f"round-{server_round:03d}")
        rounds.append(record)
        if on_round is not None:
            on_round(record)
        should_stop = stopper.update(server_round, record["val_overall"].get(stop.metric))
        if stopper.best_round == server_round:
            best = arrays
        if should_stop:
            stopped_early = server_round < cfg.rounds
            if stopped_early:
                log.info(
                    "early stop after round %d: no better %s since round %d",
                    server_round,
                    stop.metric,
                    stopper.best_round,
                )
            break
    test, _ = _evaluate(grid, strategy, cfg, stopper.best_round, best, keys.TEST)
    writer.write(stopper.best_round, keys.TEST, test)
    load_adapter_state(loaded.model, best.to_torch_state_dict())
    save_adapter(loaded, out_dir / ADAPTER_DIR)
    state = adapter_state(loaded.model)
    return FederationResult(
        rounds=rounds,
        best_round=stopper.best_round,
        stopped_early=stopped_early,
        test=test,
        adapter_bytes=state_nbytes(state),
        full_model_bytes=full_model_nbytes(loaded.model),
        seconds=time.perf_counter() - started,
    )


def _save_checkpoint(loaded: LoadedModel, arrays: ArrayRecord, folder: Path) -> None:
    load_adapter_state(loaded.model, arrays.to_torch_state_dict())
    loaded.model.save_pretrained(str(folder))


def federate(
    grid: Grid, cfg: RunConfig, out_dir: Path, on_round: Callable[[dict[str, Any]], None] | None = None
) -> FederationResult:
    """Build the initial global model for ``cfg``, run every round, and write ``federation.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed)
    result = run_rounds(grid, cfg, loaded, out_dir, on_round)
    (out_dir / FEDERATION_FILE).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result
