"""The served model against the local-only baseline on each region's test split (issue 16's target: the paired-
bootstrap interval of served − local-only reaches 0 or above in every region)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common import keys
from common.runfiles import Summary
from runfolder.summary import served_vs_local_only, with_personalized, with_served_vs_local_only

SCORED = {"accuracy": 0.5, "macro_f1": 0.5, "seconds": 1.0}


def _difference(diff: float, low: float, high: float) -> dict[str, float]:
    return {"diff": diff, "low": low, "high": high, "resamples": 1000, "level": 0.95}


def _summary(**regions: dict[str, Any]) -> Summary:
    return Summary.from_json({"regions": {n: {"num_test": 10, **r} for n, r in regions.items()}, "overall": {}})


def test_the_entry_says_whether_the_interval_reaches_zero() -> None:
    assert served_vs_local_only("global", _difference(-0.2, -0.3, -0.1))["reaches_zero"] is False
    assert served_vs_local_only("global", _difference(-0.1, -0.3, 0.0))["reaches_zero"] is True
    entry = served_vs_local_only("personalized", _difference(0.1, 0.05, 0.2))
    assert entry == {"served": "personalized", **_difference(0.1, 0.05, 0.2), "reaches_zero": True}


def test_personalization_gives_the_served_model_its_interval_and_drops_a_stale_one() -> None:
    stale = served_vs_local_only("global", _difference(-0.5, -0.6, -0.4))
    summary = _summary(a={keys.SERVED_VS_LOCAL_ONLY: stale}, b={keys.SERVED_VS_LOCAL_ONLY: stale})
    a = {"chosen": "global", "ab": {"vs_local_only": _difference(-0.2, -0.3, -0.1)}, **SCORED}
    b = {"chosen": "personalized", "ab": {"vs_federated": _difference(0.1, 0.0, 0.2)}, **SCORED}
    regions = with_personalized(summary, {"a": a, "b": b}).regions
    assert regions["a"][keys.SERVED_VS_LOCAL_ONLY] == {
        "served": "global",
        **_difference(-0.2, -0.3, -0.1),
        "reaches_zero": False,
    }
    # b was re-personalized without local-only predictions: the old entry described another served model
    assert keys.SERVED_VS_LOCAL_ONLY not in regions["b"]
    assert summary.regions["a"][keys.SERVED_VS_LOCAL_ONLY] == stale  # the summary given is left as it was


def test_the_report_shows_each_interval_and_counts_the_regions_below_zero(tmp_path: Path) -> None:
    from runfolder.report import write_report

    summary = with_served_vs_local_only(
        _summary(a={}, b={}, c={}),
        {
            "a": served_vs_local_only("global", _difference(-0.52, -0.61, -0.44)),
            "b": served_vs_local_only("personalized", _difference(-0.011, -0.05, 0.03)),
        },
    )
    text = write_report(tmp_path, summary, []).read_text(encoding="utf-8")
    assert "## Served model vs local-only" in text
    assert "1 of 2 region(s) below 0: a" in text
    assert "| a | global | -0.520 [-0.610, -0.440] | **no** |" in text
    assert "| b | personalized | -0.011 [-0.050, +0.030] | yes |" in text
    plain = write_report(tmp_path / "plain", _summary(a={}), []).read_text(encoding="utf-8")
    assert "Served model vs local-only" not in plain


def test_without_personalization_the_global_model_is_compared_with_the_baselines_predictions(
    tmp_path: Path, tiny_bert: Path, two_regions: Path
) -> None:
    from client.personalize import bootstrap_seed, paired_bootstrap
    from client.train import predict_proba
    from common.config import load_config
    from common.data import load_region
    from common.metrics import macro_f1
    from common.model import build_model, save_adapter
    from simulations.personalize import global_pass, global_vs_local_only
    from tests.conftest import perturb, tiny_config

    cfg = load_config(tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions), ["personalize.bootstrap=200"])
    data = {r.name: load_region(r.name, r.data, cfg.labels) for r in cfg.regions}
    loaded = perturb(build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed), seed=3)
    save_adapter(loaded, tmp_path / "run" / "adapter")
    served = {
        name: predict_proba(
            loaded.model, loaded.tokenizer, [ex.text for ex in r.test], max_length=cfg.model.max_length, batch_size=8
        ).argmax(axis=1)
        for name, r in data.items()
    }
    truth = {name: np.array([ex.label for ex in r.test]) for name, r in data.items()}
    # north's local-only model predicted exactly what the global one does; south's was always right
    local = {"north": served["north"].copy(), "south": truth["south"].copy()}
    probs = global_pass(cfg, tmp_path / "run", data).probs
    assert all((probs[name].argmax(axis=1) == served[name]).all() for name in data)  # the saved adapter's
    entries = global_vs_local_only(cfg, data, local, probs)
    north, south = entries["north"], entries["south"]
    assert north["served"] == south["served"] == "global"
    assert north["diff"] == north["low"] == north["high"] == 0.0 and north["reaches_zero"]
    expected = macro_f1(truth["south"], served["south"], 2) - 1.0
    assert expected < 0  # the perturbed global model is not perfect: a known, negative difference
    assert south["diff"] == pytest.approx(expected)
    # the same resamples as personalization's test A/B against local-only
    again = paired_bootstrap(
        truth["south"], local["south"], served["south"], 2, resamples=200, seed=bootstrap_seed(0, "south", "local_only")
    )
    assert (south["low"], south["high"]) == (again.low, again.high)
    assert south["reaches_zero"] == (again.high >= 0)
    # a region without local-only predictions gets no entry
    assert set(global_vs_local_only(cfg, data, {"north": local["north"]}, probs)) == {"north"}
