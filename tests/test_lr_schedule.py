"""train.lr_schedule: the learning rate over a run's rounds, on the node (one factor per round) and in the
baselines (the same factors at the same shares of their steps), on the tiny model with real training."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from client.local_only import checkpoint_steps, train_best_checkpoint
from client.task import train_round
from client.train import lr_scale_over, round_lr_scale
from common.config import ClientTask, ConfigError, LoraSettings, ModelSettings, Region, TrainSettings, load_config
from common.data import load_region
from common.model import adapter_state, build_model
from tests.conftest import tiny_config, write_region

LABELS = ("neg", "pos")


def _task(tiny_bert: Path, server_round: int, rounds: int, **train: object) -> ClientTask:
    settings = {"lr": 2e-2, "local_steps": 3, "batch_size": 8, "threads": 1, **train}
    return ClientTask(
        seed=0,
        server_round=server_round,
        labels=LABELS,
        region_names=("north",),
        model=ModelSettings(base=str(tiny_bert), max_length=32),
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
        train=TrainSettings(**settings),  # type: ignore[arg-type]
        rounds=rounds,
    )


def test_the_cosine_factor_per_round_is_the_half_cosine_of_the_rounds_done() -> None:
    rounds = 12
    got = np.array([round_lr_scale("cosine", r, rounds) for r in range(1, rounds + 1)])
    expected = 0.5 * (1 + np.cos(np.pi * np.arange(rounds) / rounds))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got[0] == 1.0 and np.all(np.diff(got) < 0) and got[-1] > 0  # never 0: the last round still trains
    assert {round_lr_scale("constant", r, rounds) for r in range(1, rounds + 1)} == {1.0}
    assert round_lr_scale("cosine", rounds + 1, rounds) == got[-1]  # past the plan: never 0 (no training at all)


@pytest.mark.parametrize(("steps", "rounds"), [(60, 12), (300, 12), (10, 3), (7, 3), (5, 12)])
def test_a_baseline_takes_each_rounds_factor_over_that_rounds_share_of_its_steps(steps: int, rounds: int) -> None:
    # the k-th share ends where the baseline's k-th checkpoint (of every round) is: the same points of training
    scale = lr_scale_over("cosine", steps, rounds)
    for step in range(1, steps + 1):
        k = next(k for k in range(1, rounds + 1) if step <= math.ceil(steps * k / rounds))
        assert scale(step) == round_lr_scale("cosine", k, rounds), step
    # a checkpoint closes its round's share: the step after it takes the next round's factor
    for k, end in enumerate(checkpoint_steps(steps, rounds), start=1):
        if end < steps and steps >= rounds:
            assert (scale(end), scale(end + 1)) == (
                round_lr_scale("cosine", k, rounds),
                round_lr_scale("cosine", k + 1, rounds),
            )


def test_a_round_under_cosine_trains_as_the_constant_schedule_at_the_scaled_lr(tmp_path: Path, tiny_bert: Path) -> None:
    region = Region(name="north", data=write_region(tmp_path / "north", 30, 8, seed=2))
    start = _task(tiny_bert, 1, 4)
    state = adapter_state(build_model(start.model, start.lora, start.labels, seed=0).model)
    factor = round_lr_scale("cosine", 3, 4)
    assert 0 < factor < 1
    cosine, _ = train_round(region, _task(tiny_bert, 3, 4, lr_schedule="cosine"), state)
    scaled, _ = train_round(region, _task(tiny_bert, 3, 4, lr=2e-2 * factor), state)
    constant, _ = train_round(region, _task(tiny_bert, 3, 4), state)
    for key in cosine:
        torch.testing.assert_close(cosine[key], scaled[key], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(cosine[k], constant[k]) for k in cosine)  # the factor did change the training
    # round 1 takes the full lr: the same training as the constant schedule
    first, _ = train_round(region, _task(tiny_bert, 1, 4, lr_schedule="cosine"), state)
    again, _ = train_round(region, _task(tiny_bert, 1, 4), state)
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_a_baseline_under_cosine_steps_at_the_rounds_factors(
    tmp_path: Path, tiny_bert: Path, two_regions: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the learning rate each optimizer step of a baseline took, read off the real optimizer
    cfg = load_config(
        tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions, rounds=3),
        ["train.lr_schedule=cosine"],
    )
    south = next(r for r in cfg.regions if r.name == "south")
    data = load_region(south.name, south.data, cfg.labels)
    loaded = build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed)
    seen: list[float] = []
    original = torch.optim.AdamW.step

    def step(self: torch.optim.AdamW, *args: object, **kwargs: object) -> object:
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    settings = dataclasses.replace(cfg.train, local_steps=6)  # 6 steps over 3 rounds' shares: 2 each
    train_best_checkpoint(
        loaded,
        data.train,
        settings,
        3,
        lambda: None,
        higher_is_better=True,
        min_delta=0.0,
        max_length=cfg.model.max_length,
        seed=0,
        desc="test",
    )
    factors = [round_lr_scale("cosine", k, 3) for k in (1, 1, 2, 2, 3, 3)]
    np.testing.assert_allclose(seen, [cfg.train.lr * f for f in factors], rtol=1e-12)


def test_an_unknown_schedule_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="lr_schedule: must be one of constant, cosine, got 'linear'"):
        TrainSettings(lr_schedule="linear")  # type: ignore[arg-type]
