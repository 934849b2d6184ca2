"""The quality benchmark's own logic: its options are valid configs, baselines are borrowed only where stated."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_quality import OPTIONS, Option, merge_baselines, parse_option, row_of
from common.config import load_config
from tests.conftest import tiny_config


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_option_is_a_valid_config(name: str, tiny_bert: Path, two_regions: Path, tmp_path: Path) -> None:
    cfg = load_config(tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions), list(OPTIONS[name].overrides))
    assert cfg.rounds >= 1


def test_options_that_share_baselines_train_alike_on_the_nodes(
    tiny_bert: Path, two_regions: Path, tmp_path: Path
) -> None:
    # an option marked nodes=False borrows the baselines of another such option: their node training must agree
    path = tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions)
    shared = [load_config(path, list(o.overrides)) for o in OPTIONS.values() if not o.nodes]
    assert len(shared) >= 2
    assert all(cfg.train == shared[0].train and cfg.rounds == shared[0].rounds for cfg in shared)


def test_parse_option() -> None:
    assert parse_option("x=rounds=2,train.lr=0.1") == Option("x", ("rounds=2", "train.lr=0.1"))
    with pytest.raises(SystemExit, match="expected NAME=KEY=VALUE"):
        parse_option("x")


def test_merge_takes_only_the_baselines() -> None:
    run = {
        "overall": {"federated": 0.8},
        "regions": {"a": {"federated": 0.7}, "b": {"federated": 0.9}},
        "best_round": 3,
    }
    shared = {
        "overall": {"federated": 0.1, "centralized": 0.75, "local_only": 0.6},
        "pooled": {"federated": 0.2, "centralized": 0.77},
        "regions": {"a": {"federated": 0.1, "centralized": 0.7, "local_only": 0.5}, "b": {"centralized": 0.8}},
        "best_round": 9,
        "centralized_kept": {"number": 4, "of": 5, "step": 40, "steps": 50},
    }
    merged = merge_baselines({**run, "pooled": {"federated": 0.81}}, shared)
    assert merged["overall"] == {"federated": 0.8, "centralized": 0.75, "local_only": 0.6}
    assert merged["pooled"] == {"federated": 0.81, "centralized": 0.77}
    assert merged["regions"]["a"] == {"federated": 0.7, "centralized": 0.7, "local_only": 0.5}
    assert merged["regions"]["b"] == {"federated": 0.9, "centralized": 0.8}
    assert merged["best_round"] == 3
    assert merged["centralized_kept"] == shared["centralized_kept"]  # the checkpoint of the centralized it took
    older = {k: v for k, v in shared.items() if k != "centralized_kept"}  # a run that did not record it
    assert "centralized_kept" not in merge_baselines(run, older)


def test_row_of_reads_every_mode() -> None:
    summary = {
        "overall": {"federated": {"macro_f1": 0.8, "pooled_macro_f1": 0.5}, "centralized": {"macro_f1": 0.7}},
        "regions": {"a": {"federated": {"macro_f1": 0.6}, "num_train": 10}},
        "run": {"best_round": 2},
    }
    assert row_of(summary) == {
        "overall": {"federated": 0.8, "centralized": 0.7},
        "pooled": {"federated": 0.5},  # a summary written before the pooled score has none for centralized
        "regions": {"a": {"federated": 0.6}},
        "best_round": 2,
    }
    kept = {"number": 3, "of": 5, "step": 30, "steps": 50}
    summary["regions"]["a"]["centralized"] = {"macro_f1": 0.7, "kept_checkpoint": kept}
    assert row_of(summary)["centralized_kept"] == kept


def _compared(diff_high: float) -> dict[str, object]:
    low = diff_high - 0.1
    return {"served": "global", "diff": diff_high, "low": low, "high": diff_high, "reaches_zero": diff_high >= 0}


def test_rows_count_the_regions_whose_served_model_is_below_local_only(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.bench_quality import below_local_only, print_table

    summary = {
        "overall": {"federated": {"macro_f1": 0.8}},
        "regions": {
            "a": {"federated": {"macro_f1": 0.6}, "served_vs_local_only": _compared(-0.2)},
            "b": {"federated": {"macro_f1": 0.9}, "served_vs_local_only": _compared(0.0)},
            "c": {"federated": {"macro_f1": 0.7}},
        },
        "run": {"best_round": 2},
    }
    row = row_of(summary)
    assert row["vs_local_only_regions"] == 2 and row["below_local_only"] == ["a"]
    runs = [row, {**row, "below_local_only": []}, {"overall": {}, "regions": {}}]
    assert below_local_only(runs) == (1, 4)
    assert below_local_only(runs[2:]) is None
    table = {"scenario": "demo", "option": "s5", "mean": {"federated": 0.8}, "runs": runs}
    print_table([{**table, "mean_pooled": {"federated": 0.4, "centralized": 0.7}}])
    header, line = capsys.readouterr().out.splitlines()
    # after the served<local count: the pooled scores of the four modes and the pooled gap
    assert header.split()[-6:] == ["served<local", "p·fed", "p·cen", "p·loc", "p·pers", "p·fed−cen"]
    assert line.split()[-6:] == ["1/4", "0.400", "0.700", "nan", "nan", "-0.300"]


def test_a_run_borrowing_baselines_gets_their_local_only_predictions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # without them, a run that borrows the baselines could not compare its served models with local-only
    import benchmarks.bench_quality as bench

    given: list[tuple[tuple[str, ...], dict[str, object]]] = []

    def run_one(config: Path, overrides: list[str], regions_dir: object, seed: int, out: Path, preds: dict) -> tuple:  # type: ignore[type-arg]
        given.append((tuple(overrides), preds))
        if "baselines=[]" not in overrides:
            preds["north"] = "the local-only predictions"
        summary = {"overall": {}, "regions": {}, "run": {"best_round": 1}}
        return summary, [0.5], 1.0

    monkeypatch.setattr(bench, "run_one", run_one)
    argv = ["--scenarios", "demo", "--options", "s5", "s5-fedavgm", "--seeds", "0", "--work", str(tmp_path)]
    assert bench.main(argv) == 0
    (first, filled), (second, borrowed) = given
    assert "baselines=[]" not in first and "baselines=[]" in second
    assert borrowed is filled and borrowed == {"north": "the local-only predictions"}


def test_a_split_the_pool_cannot_give_fails_before_any_run(
    two_regions: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every scenario's split is drawn before the first run, so an impossible one (here: ten regions of at least
    20 train records from 144) ends the benchmark at once, not after the runs before it."""
    import benchmarks.bench_quality as bench

    started: list[object] = []
    monkeypatch.setattr(bench, "run_one", lambda *args: started.append(args))
    argv = ["--scenarios", "demo", "a1.0", "--options", "s5", "--seeds", "0", "--pool", str(two_regions)]
    assert bench.run([*argv, "--work", str(tmp_path), "--regions", "10"]) == 2
    assert "impossible for this pool" in capsys.readouterr().err and started == []
