"""Tests for runfolder.report.write_report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.runfiles import Summary
from runfolder.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("val_by_round.png", "modes_by_region.png", "bytes_by_round.png", "train_loss_by_round.png")
REGIONS = {"Germany": (4000, 500), "France": (3000, 400), "Brazil": (1500, 200)}
ADAPTER_BYTES = 3_145_728
FULL_MODEL_BYTES = 537_919_488


def scores(accuracy: float, macro_f1: float) -> dict[str, float]:
    """Return one mode's score block."""
    return {"accuracy": accuracy, "macro_f1": macro_f1}


def make_summary() -> dict[str, Any]:
    """Return a summary.json for 3 regions x 3 rounds where Brazil misses round 2."""
    per_round = []
    for rnd in (1, 2, 3):
        participants = ["Germany", "France"] if rnd == 2 else list(REGIONS)
        n = len(participants)
        per_round.append(
            {"round": rnd, "bytes_up": n * ADAPTER_BYTES, "bytes_down": n * ADAPTER_BYTES, "participants": participants}
        )
    return {
        "run": {
            "name": "eu-br-smoke",
            "seed": 7,
            "config": "configs/smoke.yaml",
            "rounds_planned": 5,
            "rounds_done": 3,
            "best_round": 3,
            "stopped_early": True,
            "model": "distilbert-base-multilingual-cased",
            "aggregation": "fedavg",
        },
        "regions": {
            "Germany": {
                "num_train": 4000,
                "num_test": 500,
                "federated": scores(0.81, 0.78),
                "local_only": scores(0.79, 0.75),
                "centralized": scores(0.83, 0.80),
            },
            "France": {
                "num_train": 3000,
                "num_test": 400,
                "federated": scores(0.77, 0.74),
                "local_only": scores(0.78, 0.79),
                "centralized": scores(0.80, 0.77),
            },
            "Brazil": {
                "num_train": 1500,
                "num_test": 200,
                "federated": scores(0.70, 0.66),
                "local_only": scores(0.61, 0.55),
                "centralized": scores(0.72, 0.68),
            },
        },
        "overall": {
            "federated": scores(0.7752, 0.7412),
            "local_only": scores(0.7557, 0.7157),
            "centralized": scores(0.8057, 0.7743),
        },
        "communication": {
            "adapter_bytes": ADAPTER_BYTES,
            "full_model_bytes": FULL_MODEL_BYTES,
            "bytes_up_total": sum(e["bytes_up"] for e in per_round),
            "bytes_down_total": sum(e["bytes_down"] for e in per_round),
            "per_round": per_round,
        },
        "timing": {"federated_s": 734.2, "centralized_s": 411.9, "local_only_s": 38.5},
    }


def make_metrics() -> list[dict[str, Any]]:
    """Return metrics.jsonl lines: train loss and val scores per round, then the final test lines."""
    lines: list[dict[str, Any]] = []
    for offset, (region, (num_train, num_test)) in enumerate(REGIONS.items()):
        for rnd in (1, 2, 3):
            if region == "Brazil" and rnd == 2:
                continue  # it did not take part, so there is no training line
            lines.append(
                {
                    "round": rnd,
                    "region": region,
                    "split": "train",
                    "loss": 1.2 / rnd + 0.05 * offset,
                    "num_examples": num_train,
                }
            )
            lines.append(
                {
                    "round": rnd,
                    "region": region,
                    "split": "val",
                    "accuracy": 0.55 + 0.08 * rnd,
                    "macro_f1": 0.5 + 0.09 * rnd - 0.04 * offset,
                    "loss": 1.0 / rnd,
                    "num_examples": num_test,
                }
            )
        lines.append(
            {
                "round": 3,
                "region": region,
                "split": "test",
                "accuracy": 0.8,
                "macro_f1": 0.75,
                "loss": 0.5,
                "num_examples": num_test,
            }
        )
    return lines


def check_png(path: Path) -> None:
    """Fail unless path is a real, non-trivial PNG that matplotlib can read back."""
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3
    height, width, channels = image.shape
    assert height > 300
    assert width > 500
    assert channels in (3, 4)


def test_full_report(tmp_path: Path) -> None:
    report = write_report(tmp_path / "run", Summary.from_json(make_summary()), make_metrics())

    assert report == tmp_path / "run" / "report.md"
    text = report.read_text(encoding="utf-8")
    for region in REGIONS:
        assert region in text
    # overall row exactly as the table prints it; centralized is the best mode so it is bold
    assert "| **overall** | 8,500 | 1,100 | 0.775 | 0.741 | 0.756 | 0.716 | **0.806** | **0.774** |" in text
    assert "Federated: 0.741 macro-F1 overall, local-only 0.716, centralized 0.774." in text
    assert "3 of 5 planned rounds" in text
    assert "round 3" in text
    assert "stopped early" in text
    # France is best local-only by macro-F1, so both its local-only cells are bold
    assert "| France | 3,000 | 400 | 0.770 | 0.740 | **0.780** | **0.790** | 0.800 | 0.770 |" in text
    assert "**Brazil** missed 1 of 3 rounds (round 2)" in text
    assert "0.58%" in text  # adapter / full model
    assert "12 min 14 s" in text
    assert "Skipped" not in text
    for name in PLOTS:
        assert f"]({name})" in text
        check_png(tmp_path / "run" / name)


def test_the_report_says_which_server_optimizer_was_used(tmp_path: Path) -> None:
    summary = make_summary()
    text = write_report(tmp_path / "plain", Summary.from_json(summary), make_metrics()).read_text(encoding="utf-8")
    assert "server optimizer" not in text  # a summary written before optimizers existed says nothing of one
    summary["run"]["optimizer"] = {"name": "fedadam", "server_lr": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 0.001}
    text = write_report(tmp_path / "adam", Summary.from_json(summary), make_metrics()).read_text(encoding="utf-8")
    assert "server optimizer: `fedadam` (server_lr 0.01, beta_1 0.9, beta_2 0.99, tau 0.001), seed 7." in text


def test_the_report_says_which_rounds_were_validated_when_not_all_were(tmp_path: Path) -> None:
    summary = make_summary()
    summary["run"]["validated_rounds"] = [1, 2, 3]
    text = write_report(tmp_path / "all", Summary.from_json(summary), make_metrics()).read_text(encoding="utf-8")
    assert "was validated after rounds" not in text
    summary["run"]["validated_rounds"] = [2, 3]
    text = write_report(tmp_path / "some", Summary.from_json(summary), make_metrics()).read_text(encoding="utf-8")
    assert "The global model was validated after rounds 2 and 3 only (`early_stopping.every`)" in text


def test_the_report_says_which_checkpoint_each_baseline_kept(tmp_path: Path) -> None:
    summary = make_summary()
    text = write_report(tmp_path / "old", Summary.from_json(summary), make_metrics()).read_text(encoding="utf-8")
    assert "kept its best validation checkpoint" not in text  # a summary from before it was recorded
    for number, region in zip((1, 3, 2), summary["regions"].values(), strict=True):
        region["local_only"]["kept_checkpoint"] = {"number": number, "of": 3, "step": 10 * number, "steps": 30}
        region["centralized"]["kept_checkpoint"] = {"number": 2, "of": 3, "step": 60, "steps": 90}
    text = write_report(tmp_path / "new", Summary.from_json(summary), make_metrics()).read_text(encoding="utf-8")
    # a hand-edited record without its total, or not a record, is left out of the sentence, not a traceback
    broken = {**summary, "regions": {name: dict(region) for name, region in summary["regions"].items()}}
    first, second = list(broken["regions"].values())[:2]
    first["local_only"] = {**first["local_only"], "kept_checkpoint": {"number": 1}}
    second["centralized"] = "n/a"
    odd = write_report(tmp_path / "odd", Summary.from_json(broken), make_metrics()).read_text(encoding="utf-8")
    assert "the regions' local-only models kept checkpoints 2 to 3 of 3." in odd
    assert (
        "Each baseline kept its best validation checkpoint as the federation kept its best round: the centralized "
        "model kept its checkpoint 2 of 3; the regions' local-only models kept checkpoints 1 to 3 of 3."
    ) in text


def test_report_without_baselines_or_per_round(tmp_path: Path) -> None:
    summary = make_summary()
    for block in [*summary["regions"].values(), summary["overall"]]:
        del block["local_only"], block["centralized"]
    del summary["communication"]["per_round"]
    metrics = [line for line in make_metrics() if line["split"] != "train"]
    # a PNG from an earlier run must not survive next to a report that says it was skipped
    (tmp_path / "bytes_by_round.png").write_bytes(b"stale")

    text = write_report(tmp_path, Summary.from_json(summary), metrics).read_text(encoding="utf-8")

    assert "Skipped plot `bytes_by_round.png`" in text
    assert "Skipped plot `train_loss_by_round.png`" in text
    assert not (tmp_path / "bytes_by_round.png").exists()
    assert not (tmp_path / "train_loss_by_round.png").exists()
    check_png(tmp_path / "val_by_round.png")
    check_png(tmp_path / "modes_by_region.png")
    assert "Federated: 0.741 macro-F1 overall." in text
    assert "| **overall** | 8,500 | 1,100 | 0.775 | 0.741 |" in text
    assert "Local-only" not in text.split("## Results per region")[1].split("\n\n")[1]
    assert "was not recorded" in text
    for region in REGIONS:
        assert region in text


def test_overall_is_recomputed_only_when_every_region_has_the_mode(tmp_path: Path) -> None:
    summary = make_summary()
    del summary["overall"]
    del summary["regions"]["Brazil"]["local_only"]

    text = write_report(tmp_path, Summary.from_json(summary), make_metrics()).read_text(encoding="utf-8")

    # federated: (0.78*500 + 0.74*400 + 0.66*200) / 1100 = 0.7436; local-only is n/a overall
    assert "| **overall** | 8,500 | 1,100 | 0.775 | 0.744 | n/a | n/a |" in text


@pytest.mark.parametrize("summary", [Summary(regions={}), Summary(run={"name": "empty"}, regions={})])
def test_empty_inputs_still_write_a_report(tmp_path: Path, summary: Summary) -> None:
    text = write_report(tmp_path, summary, []).read_text(encoding="utf-8")

    assert text.count("Skipped plot") == 4
    assert "No overall test scores were recorded." in text
    assert not list(tmp_path.glob("*.png"))


def test_report_shows_privacy_spent_and_what_it_covers_only_with_dp(tmp_path: Path) -> None:
    raw = make_summary()
    raw["regions"]["France"]["dp"] = {
        "epsilon_spent": 7.94,
        "delta": 1e-5,
        "by_round": {"1": 4.1, "2": 6.2, "3": 7.94},
        "covers": {"federated": True, "personalized": False},
    }
    metrics = make_metrics()
    for line in metrics:
        if line["region"] == "France" and line["split"] == "train":
            line["dp_epsilon"] = {1: 4.1, 2: 6.2, 3: 7.94}[line["round"]]
    text = write_report(tmp_path / "run", Summary.from_json(raw), metrics).read_text(encoding="utf-8")
    assert "## Differential privacy" in text
    assert "| France | 7.94 | 1e-05 | yes | no | yes if it serves the global model (no personalization" in text
    assert "otherwise it trained on the region's data again without DP and is **not** covered" in text
    check_png(tmp_path / "run" / "dp_epsilon_by_round.png")
    # a personalized model served: covered under personalize.dp (the epsilon after it, and the rounds'), else not
    raw["regions"]["France"]["personalized"] = {"chosen": "personalized", "accuracy": 0.5, "macro_f1": 0.5}
    for covered, cell in (
        (False, "**no** (personalized without DP) |"),
        (True, "yes (personalized, under personalize"),
    ):
        dp = raw["regions"]["France"]["dp"]
        dp["covers"]["personalized"] = covered
        if covered:
            dp.update(epsilon_spent=7.99, epsilon_rounds=7.94)
        text = write_report(tmp_path / "run", Summary.from_json(raw), metrics).read_text(encoding="utf-8")
        spent = "7.99 (7.94 after the rounds)" if covered else "7.94"
        assert f"| France | {spent} | 1e-05 | yes | {'yes' if covered else 'no'} | {cell}" in text
    # a local-only model served (consider_local_only) trained on the region's data without DP: never covered
    raw["regions"]["France"]["personalized"]["chosen"] = "local_only"
    text = write_report(tmp_path / "run", Summary.from_json(raw), metrics).read_text(encoding="utf-8")
    assert "| **no** (local-only model, trained without DP) |" in text
    plain = write_report(tmp_path / "run", Summary.from_json(make_summary()), make_metrics()).read_text()
    assert "Differential privacy" not in plain and not (tmp_path / "run" / "dp_epsilon_by_round.png").exists()


def test_label_mix_section_from_a_simulation_record(tmp_path: Path) -> None:
    """A simulation's label_mix.json becomes a table and a stacked-bar plot; without it (a deployment, whose server
    learns nothing of a region's data) the section says it was not recorded and no stale plot stays."""
    import json

    from common.runfiles import LABEL_MIX_FILE, LABEL_MIX_PLOT

    run = tmp_path / "run"
    run.mkdir()
    mix = {
        "regions": {
            "Germany": {"train": {"neg": 30, "pos": 10}, "val": {"neg": 0, "pos": 0}, "test": {"neg": 15, "pos": 5}},
            "France": {"train": {"neg": 2, "pos": 18}, "val": {"neg": 1, "pos": 4}, "test": {"neg": 1, "pos": 9}},
        },
        "split": {"manifest": "/x/split.json", "source": "/data/pool", "parameters": {"regions": 2, "alpha": 0.3}},
    }
    (run / LABEL_MIX_FILE).write_text(json.dumps(mix))
    text = write_report(run, Summary.from_json(make_summary()), make_metrics()).read_text(encoding="utf-8")
    assert "| Germany | 75% / 25% (40) | - (0) | 75% / 25% (20) |" in text
    assert "| France | 10% / 90% (20) | 20% / 80% (5) | 10% / 90% (10) |" in text
    assert "`fedlocale data split` of `/data/pool` (regions 2, alpha 0.3)" in text
    assert f"]({LABEL_MIX_PLOT})" in text
    check_png(run / LABEL_MIX_PLOT)
    (run / LABEL_MIX_FILE).unlink()
    text = write_report(run, Summary.from_json(make_summary()), make_metrics()).read_text(encoding="utf-8")
    assert "_Not recorded: only a simulation records it" in text
    assert not (run / LABEL_MIX_PLOT).exists()


def test_metrics_lines_of_the_wrong_shape_are_each_named_with_their_line(tmp_path: Path) -> None:
    from common.errors import InputError
    from runfolder.summary import read_metrics

    good = {"round": 1, "region": "north", "split": "val", "accuracy": 0.5, "macro_f1": 0.4, "num_examples": 3}
    bad = [
        {**good, "round": "two"},
        {**good, "macro_f1": 7},
        {**good, "loss": "low"},
        {k: v for k, v in good.items() if k != "region"},
        {**good, "num_examples": 2.5},
        {**good, "round": True},
        {**good, "split": "", "accuracy": -1},  # two problems, one damaged line
    ]
    lines = [good, *bad, {**good, "loss": float("nan")}]  # a diverged run writes NaN losses: kept
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.raises(InputError) as exc:
        read_metrics(tmp_path)
    text = str(exc.value)
    path = tmp_path / "metrics.jsonl"
    assert "7 damaged line(s)" in text
    for number, expected in [
        (2, "round: expected a whole number, got 'two'"),
        (3, "macro_f1: must be in [0, 1], got 7"),
        (4, "loss: expected a number, got 'low'"),
        (5, "region: expected a name, got None"),
        (6, "num_examples: expected a whole number >= 0, got 2.5"),
        (7, "round: expected a whole number, got True"),
        (8, "split: expected a name, got ''"),
        (8, "accuracy: must be in [0, 1], got -1"),
    ]:
        assert f"{path}:{number}: {expected}" in text
    (tmp_path / "metrics.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(lines[-1]) + "\n")
    assert [x["round"] for x in read_metrics(tmp_path)] == [1, 1]


def test_metrics_bytes_that_are_not_utf8_are_named_by_line(tmp_path: Path) -> None:
    from common.errors import InputError
    from runfolder.summary import read_metrics

    good = json.dumps({"round": 1, "region": "north", "split": "train", "loss": 0.5, "num_examples": 3})
    (tmp_path / "metrics.jsonl").write_bytes(f"{good}\n".encode() + b'{"region": "caf\xe9"}\n' + f"{good}\n".encode())
    with pytest.raises(InputError) as exc:
        read_metrics(tmp_path)
    assert f"{tmp_path / 'metrics.jsonl'}:2: not UTF-8: byte 0xE9 at column 16" in str(exc.value)
    assert "1 damaged line(s)" in str(exc.value)
