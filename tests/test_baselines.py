"""The baselines keep their best validation checkpoint, as the federated run keeps its best round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import simulations.baselines as baselines
from client.local_only import checkpoint_steps, matched_settings
from client.train import plan_steps
from common.config import load_config
from common.data import load_region
from common.model import adapter_state
from common.runfiles import KEPT_CHECKPOINT
from simulations.baselines import run_centralized
from tests.conftest import tiny_config


def test_checkpoints_spread_the_steps_and_end_at_the_last() -> None:
    assert checkpoint_steps(12, 3) == [4, 8, 12]
    assert checkpoint_steps(10, 3) == [4, 7, 10]
    assert checkpoint_steps(2, 5) == [1, 2]  # fewer steps than rounds: every step, once
    assert checkpoint_steps(7, 1) == [7]


def test_validating_every_kth_round_puts_checkpoints_where_the_federation_validates() -> None:
    # the federation validates after rounds 3, 6, 9, 12 (every 3rd) and 3, 6, 9, 10 (every 3rd and the last)
    assert checkpoint_steps(120, 12, every=3) == [30, 60, 90, 120]
    assert checkpoint_steps(100, 10, every=3) == [30, 60, 90, 100]
    assert checkpoint_steps(12, 3, every=5) == [12]  # none but the last
    assert checkpoint_steps(12, 3, every=1) == checkpoint_steps(12, 3)


def test_a_baseline_validates_only_at_the_every_kth_checkpoints(
    tiny_bert: Path, two_regions: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions, rounds=5), ["early_stopping.every=2"])
    data = {r.name: load_region(r.name, r.data, cfg.labels) for r in cfg.regions}
    scripted = iter([0.9, 0.5, 0.7])  # validated after rounds 2, 4 and 5: the first is the best
    monkeypatch.setattr(baselines, "validation_score", lambda *args: next(scripted))
    scores, _ = run_centralized(cfg, data)
    union = sum(len(region.train) for region in data.values())
    total = plan_steps(union, matched_settings(cfg.train, cfg.rounds, len(data)))
    steps = checkpoint_steps(total, cfg.rounds, 2)
    assert len(steps) == 3 and next(scripted, None) is None  # exactly three validations
    kept = {"number": 1, "of": 3, "step": steps[0], "steps": total}
    assert {name: s[KEPT_CHECKPOINT] for name, s in scores.items()} == dict.fromkeys(data, kept)


def test_the_tested_model_is_the_best_checkpoint_on_validation(
    tiny_bert: Path, two_regions: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions, rounds=3))
    data = {r.name: load_region(r.name, r.data, cfg.labels) for r in cfg.regions}
    scripted = iter([0.5, 0.9, 0.7])  # the second checkpoint is the best
    states: list[dict[str, torch.Tensor]] = []
    tested: list[dict[str, torch.Tensor]] = []

    def score(cfg_: object, loaded: object, regions: object) -> float:
        states.append(adapter_state(loaded.model))  # type: ignore[attr-defined]
        return next(scripted)

    real_predict = baselines.predict_proba

    def predict_proba(model: torch.nn.Module, *args: object, **kwargs: object) -> object:
        tested.append({k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k})
        return real_predict(model, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(baselines, "validation_score", score)
    monkeypatch.setattr(baselines, "predict_proba", predict_proba)
    scores, _ = run_centralized(cfg, data)
    assert len(states) == 3
    # the three checkpoints differ (training went on), and what was tested is the second one
    assert not torch.equal(next(iter(states[1].values())), next(iter(states[2].values())))
    best = {k.replace(".default", ""): v for k, v in states[1].items() if "lora_" in k}
    for name, value in tested[0].items():
        assert torch.equal(value, best[name.replace(".default", "")]), name
    # and every region's scores say which: checkpoint 2 of 3, at the second of the checkpoint steps
    union = sum(len(region.train) for region in data.values())
    total = plan_steps(union, matched_settings(cfg.train, cfg.rounds, len(data)))
    steps = checkpoint_steps(total, cfg.rounds)
    kept = {"number": 2, "of": 3, "step": steps[1], "steps": total}
    assert len(steps) == 3 and {name: s[KEPT_CHECKPOINT] for name, s in scores.items()} == dict.fromkeys(data, kept)


def test_validation_score_is_the_example_weighted_mean_of_the_regions(
    tiny_bert: Path, two_regions: Path, tmp_path: Path
) -> None:
    from client.train import evaluate
    from common.model import build_model

    cfg = load_config(tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions))
    data = {r.name: load_region(r.name, r.data, cfg.labels) for r in cfg.regions}
    loaded = build_model(cfg.model, cfg.lora, cfg.labels, seed=0)
    each = {
        name: evaluate(loaded.model, loaded.tokenizer, region.val, 2, max_length=cfg.model.max_length)
        for name, region in data.items()
    }
    expected = sum(r.macro_f1 * r.num_examples for r in each.values()) / sum(r.num_examples for r in each.values())
    assert baselines.validation_score(cfg, loaded, data) == pytest.approx(expected)


def test_local_only_tests_each_region_once_and_its_predictions_are_what_it_scored(
    tiny_bert: Path, two_regions: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the served − local-only interval reads the baseline's test predictions: they must be those of the model
    # it scored, from the same single pass over the test split (no second evaluation)
    import numpy as np

    from common.metrics import macro_f1

    cfg = load_config(tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions, rounds=2))
    data = {r.name: load_region(r.name, r.data, cfg.labels) for r in cfg.regions}
    tests = {name: [ex.text for ex in region.test] for name, region in data.items()}
    passes = {name: 0 for name in data}
    real_predict, real_evaluate = baselines.predict_proba, baselines.evaluate

    def count(texts: list[str]) -> None:
        for name, test in tests.items():
            passes[name] += list(texts) == test

    def predict_proba(model: torch.nn.Module, tokenizer: object, texts: list[str], **kwargs: object) -> object:
        count(texts)
        return real_predict(model, tokenizer, texts, **kwargs)  # type: ignore[arg-type]

    def evaluate(model: torch.nn.Module, tokenizer: object, examples: list[Any], *args: object, **kw: object) -> object:
        count([ex.text for ex in examples])
        return real_evaluate(model, tokenizer, examples, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(baselines, "predict_proba", predict_proba)
    monkeypatch.setattr(baselines, "evaluate", evaluate)
    predictions: dict[str, np.ndarray] = {}
    scores, _ = baselines.run_local_only(cfg, data, lambda _: None, predictions)
    assert passes == {name: 1 for name in data}
    for name, region in data.items():
        truth = np.array([ex.label for ex in region.test])
        assert len(predictions[name]) == len(truth)
        assert scores[name]["macro_f1"] == pytest.approx(macro_f1(truth, predictions[name], 2))


def test_share_out_gives_the_largest_jobs_to_the_least_loaded_process() -> None:
    # largest first to the least loaded: 9 → 0, 5 → 1, 4 → 1 (loads 9, 9), 3 → 0 (a tie goes to the first), 2 → 1
    assert baselines.share_out([4, 9, 2, 5, 3], 2) == [[1, 4], [3, 0, 2]]
    assert baselines.share_out([7], 3) == [[0]]  # no process is left without work and nothing is lost
    shares = baselines.share_out(list(range(1, 12)), 3)
    assert sorted(i for share in shares for i in share) == list(range(11))


def _run(cfg_path: Path, processes: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    cfg = load_config(cfg_path, overrides=[f"simulation.baseline_processes={processes}"])
    data = {r.name: load_region(r.name, r.data, cfg.labels) for r in cfg.regions}
    predictions: dict[str, Any] = {}
    adapters: dict[str, Any] = {}
    said: list[str] = []
    out = baselines.run_baselines(cfg, data, said.append, predictions, adapters)
    scores = {name: scores for name, (scores, _) in out.items()}
    return scores, predictions, {"adapters": adapters, "said": said}


def test_baselines_side_by_side_equal_the_baselines_in_process(
    tiny_bert: Path, two_regions: Path, tmp_path: Path
) -> None:
    # train.threads is 1 in the tiny config, so both ways sum in the same order: the results must agree exactly
    path = tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions, baselines=["centralized", "local_only"])
    alone, alone_preds, alone_rest = _run(path, 1)
    apart, apart_preds, apart_rest = _run(path, 2)
    assert set(apart) == {"centralized", "local_only"}
    assert apart == alone
    assert list(apart["local_only"]) == ["north", "south"]  # in the regions' order, whatever finished first
    assert apart_preds.keys() == alone_preds.keys() == {"north", "south"}
    for name in alone_preds:
        assert (apart_preds[name] == alone_preds[name]).all()
    assert apart_rest["adapters"].keys() == alone_rest["adapters"].keys() == {"north", "south"}
    for name, state in alone_rest["adapters"].items():
        assert state.keys() == apart_rest["adapters"][name].keys()
        assert all(torch.equal(value, apart_rest["adapters"][name][key]) for key, value in state.items())
    said = "\n".join(apart_rest["said"])
    assert "3 models (centralized, local_only) in 2 processes side by side" in said
    assert "local-only north: done in" in said and "centralized: training on the union of 144 examples" in said
    # the same start lines as one after another, where each region's training is its own line too
    assert "local-only: training south (48 examples)" in said and said.count("local-only: training") == 2
    assert set(alone_rest["said"]) <= set(apart_rest["said"])


def test_a_baseline_failing_in_its_process_is_reported_naming_the_job(
    tiny_bert: Path, two_regions: Path, tmp_path: Path
) -> None:
    import shutil

    from common.errors import EXIT_FAILED

    model = tmp_path / "model"
    shutil.copytree(tiny_bert, model)
    path = tiny_config(tmp_path / "run.yaml", model, two_regions, baselines=["centralized", "local_only"])
    cfg = load_config(path, overrides=["simulation.baseline_processes=2"])
    data = {r.name: load_region(r.name, r.data, cfg.labels) for r in cfg.regions}
    shutil.rmtree(model)  # gone after the checks: each process fails to load the base
    failed = r"the (centralized|local-only north|local-only south) baseline failed: OSError: .*test_a_baseline_failing"
    with pytest.raises(baselines.BaselineFailed, match=failed) as err:
        baselines.run_baselines(cfg, data, lambda line: None)
    assert err.value.exit_code == EXIT_FAILED  # not bad input: the base was there when the run was checked


def test_a_baseline_process_that_dies_stops_the_run_naming_its_models(
    tiny_bert: Path, two_regions: Path, tmp_path: Path
) -> None:
    import multiprocessing
    import os
    import signal

    path = tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions, baselines=["centralized", "local_only"])
    cfg = load_config(path, overrides=["simulation.baseline_processes=2"])
    data = {r.name: load_region(r.name, r.data, cfg.labels) for r in cfg.regions}
    killed: list[int] = []

    def say(line: str) -> None:
        # as if the system killed a process (out of memory): at the first model's start, one of the two gets SIGKILL
        if not killed and "training" in line:
            # by name: another test's process may live on in this pytest worker
            children = [c for c in multiprocessing.active_children() if c.name.startswith(baselines.WORKER_NAME)]
            assert len(children) == 2
            killed.append(children[0].pid or 0)
            os.kill(killed[0], signal.SIGKILL)

    with pytest.raises(baselines.BaselineFailed, match=r"the process training .+ ended with exit code -9 before"):
        baselines.run_baselines(cfg, data, say)
    left = [c for c in multiprocessing.active_children() if c.name.startswith(baselines.WORKER_NAME)]
    assert killed and not left  # the other process was stopped too
