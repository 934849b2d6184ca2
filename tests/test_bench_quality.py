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
        "regions": {"a": {"federated": 0.1, "centralized": 0.7, "local_only": 0.5}, "b": {"centralized": 0.8}},
    }
    merged = merge_baselines(run, shared)
    assert merged["overall"] == {"federated": 0.8, "centralized": 0.75, "local_only": 0.6}
    assert merged["regions"]["a"] == {"federated": 0.7, "centralized": 0.7, "local_only": 0.5}
    assert merged["regions"]["b"] == {"federated": 0.9, "centralized": 0.8}
    assert merged["best_round"] == 3


def test_row_of_reads_every_mode() -> None:
    summary = {
        "overall": {"federated": {"macro_f1": 0.8}, "centralized": {"macro_f1": 0.7}},
        "regions": {"a": {"federated": {"macro_f1": 0.6}, "num_train": 10}},
        "run": {"best_round": 2},
    }
    assert row_of(summary) == {
        "overall": {"federated": 0.8, "centralized": 0.7},
        "regions": {"a": {"federated": 0.6}},
        "best_round": 2,
    }
