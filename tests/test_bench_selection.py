"""The round-selection benchmark: its pooled scores are the weighted means they stand for, and on a real finished
simulation it reproduces the validation scores the federation recorded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.bench_selection import CRITERIA, main, picked, round_scores
from common.metrics import accuracy, macro_f1


def _probs(rng: np.random.Generator, n: int) -> np.ndarray:
    raw = rng.random((n, 3)) + 1e-3
    return raw / raw.sum(axis=1, keepdims=True)


def test_pooled_accuracy_and_loss_are_the_example_weighted_means_of_the_regions() -> None:
    rng = np.random.default_rng(0)
    labels = {"a": rng.integers(0, 3, 40), "b": np.zeros(7, dtype=int), "empty": np.zeros(0, dtype=int)}
    probs = {name: _probs(rng, len(y)) for name, y in labels.items()}
    scores = round_scores(labels, probs, 3)
    counts = {"a": 40, "b": 7}
    weighted = {
        "mean_macro_f1": sum(macro_f1(labels[r], probs[r].argmax(1), 3) * n for r, n in counts.items()) / 47,
        "pooled_accuracy": sum(accuracy(labels[r], probs[r].argmax(1)) * n for r, n in counts.items()) / 47,
        "pooled_loss": sum(-np.log(probs[r][np.arange(n), labels[r]]).sum() for r, n in counts.items()) / 47,
    }
    for key, value in weighted.items():
        assert scores[key] == pytest.approx(value)
    everything = np.concatenate([labels["a"], labels["b"]])
    predicted = np.concatenate([probs["a"].argmax(1), probs["b"].argmax(1)])
    assert scores["pooled_macro_f1"] == pytest.approx(macro_f1(everything, predicted, 3))


def test_a_constant_predictor_wins_the_mean_of_one_class_regions_but_not_the_pooled_score() -> None:
    # two one-class regions: predicting class 0 everywhere scores 1.0 and 0.0 (mean 0.5); a model right on 9 of 10
    # in each scores below 0.5 in each (its one mistake brings in a class with F1 0), yet is far better pooled
    labels = {"neg": np.zeros(10, dtype=int), "pos": np.ones(10, dtype=int)}
    constant = {name: np.tile([0.9, 0.1], (10, 1)) for name in labels}
    good = {name: np.tile(np.eye(2)[int(name == "pos")] * 0.8 + 0.1, (10, 1)) for name in labels}
    for probs in good.values():
        probs[0] = probs[0][::-1]  # one mistake per region
    curve = [round_scores(labels, constant, 2), round_scores(labels, good, 2)]
    assert curve[0]["pooled_macro_f1"] == pytest.approx(1 / 3)
    assert curve[1]["pooled_macro_f1"] == pytest.approx(0.9)
    assert picked(curve, "pooled_macro_f1") == picked(curve, "pooled_accuracy") == picked(curve, "pooled_loss") == 2
    assert curve[0]["mean_macro_f1"] == pytest.approx(0.5) and curve[1]["mean_macro_f1"] < 0.5
    assert picked(curve, "mean_macro_f1") == 1


def test_ties_and_gains_within_min_delta_keep_the_earlier_round_as_the_federation_does() -> None:
    curve = [dict.fromkeys(CRITERIA, 0.5), dict.fromkeys(CRITERIA, 0.5)]
    assert {picked(curve, c) for c in CRITERIA} == {1}
    rising = [{"pooled_accuracy": v, "pooled_loss": 1 - v} for v in (0.80, 0.805, 0.81, 0.85)]
    assert picked(rising[:3], "pooled_accuracy") == picked(rising[:3], "pooled_loss") == 3
    assert picked(rising[:3], "pooled_accuracy", 0.01) == picked(rising[:3], "pooled_loss", 0.01) == 1
    assert picked(rising, "pooled_accuracy", 0.01) == picked(rising, "pooled_loss", 0.01) == 4


def test_validating_every_kth_round_looks_only_at_those_and_the_last() -> None:
    curve = [{"mean_macro_f1": v} for v in (0.5, 0.9, 0.6, 0.7)]
    assert picked(curve, "mean_macro_f1", every=1) == 2
    assert picked(curve, "mean_macro_f1", every=2) == 2  # rounds 2 and 4
    assert picked(curve, "mean_macro_f1", every=3) == 4  # rounds 3 and 4: the best round 2 is never looked at


def test_on_a_finished_simulation_it_reproduces_the_recorded_validation(
    simulated_run: tuple[Path, Path], tmp_path: Path
) -> None:
    _, run = simulated_run
    out = tmp_path / "selection.json"
    assert main([str(run), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["recorded_val_mismatch"] < 1e-6
    assert len(result["curves"]["val"]) == len(result["curves"]["test"]) == 2
    assert result["choices"]["mean_macro_f1"]["round"] == result["kept_round"]
    # validated every round, the coarser choices' first is the run's own
    assert result["choices"]["mean_macro_f1"]["every_1"]["round"] == result["kept_round"]
    summary = json.loads((run / "summary.json").read_text())
    kept = result["curves"]["test"][result["kept_round"] - 1]["pooled_macro_f1"]
    assert kept == pytest.approx(summary["overall"]["federated"]["pooled_macro_f1"])


def test_a_run_missing_a_rounds_adapter_is_refused_naming_it(simulated_run: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    _, run = simulated_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    gone = copy / "checkpoints" / "round-002" / "adapter_model.safetensors"
    gone.unlink()
    with pytest.raises(SystemExit, match=rf"1 of 2 rounds: {gone}"):
        main([str(copy), "--json", str(tmp_path / "out.json")])
    assert not (tmp_path / "out.json").exists()


def test_average_scores_the_mean_of_the_recent_rounds_adapters(
    simulated_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """--average 2 scores round 2 as the element-wise mean of rounds 1 and 2: a copy of the run whose round-2
    adapter is that mean, scored plainly, gives the same curve; round 1 has nothing before it."""
    import shutil

    from safetensors.torch import load_file, save_file

    _, run = simulated_run
    assert main([str(run), "--average", "2", "--json", str(tmp_path / "avg.json")]) == 0
    assert main([str(run), "--json", str(tmp_path / "plain.json")]) == 0
    averaged, plain = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("avg", "plain"))
    assert averaged["average"] == 2 and averaged["recorded_val_mismatch"] is None
    assert averaged["curves"]["test"][0] == plain["curves"]["test"][0]
    assert averaged["curves"]["test"][1] != plain["curves"]["test"][1]

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    first, second = (copy / "checkpoints" / f"round-00{r}" / "adapter_model.safetensors" for r in (1, 2))
    one, two = load_file(str(first)), load_file(str(second))
    save_file({k: (one[k] + two[k]) / 2 for k in one}, str(second))
    assert main([str(copy), "--json", str(tmp_path / "mean.json")]) == 0
    mean = json.loads((tmp_path / "mean.json").read_text())
    for split in ("val", "test"):
        assert mean["curves"][split][1] == pytest.approx(averaged["curves"][split][1])


def test_centralized_retrains_the_runs_baseline_and_scores_each_checkpoint(
    simulated_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """--centralized trains the centralized baseline again with the run's seed, data and steps: under the run's
    own criterion it keeps the checkpoint the summary recorded, and that checkpoint's pooled test macro-F1 is the
    summary's; every checkpoint is scored by every criterion."""
    _, run = simulated_run
    out = tmp_path / "centralized.json"
    assert main([str(run), "--centralized", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    summary = json.loads((run / "summary.json").read_text())
    recorded = next(iter(summary["regions"].values()))["centralized"]["kept_checkpoint"]
    assert result["kept"] == result["recorded_kept"] == recorded
    assert len(result["curves"]["val"]) == len(result["curves"]["test"]) == recorded["of"]
    assert result["choices"]["mean_macro_f1"]["round"] == recorded["number"]
    assert result["kept_test_pooled_macro_f1"] == pytest.approx(summary["overall"]["centralized"]["pooled_macro_f1"])
    assert set(result["choices"]) == set(CRITERIA)


def test_centralized_does_not_go_with_average(simulated_run: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = simulated_run
    with pytest.raises(SystemExit):
        main([str(run), "--centralized", "--average", "2", "--json", str(tmp_path / "out.json")])
    assert not (tmp_path / "out.json").exists()
