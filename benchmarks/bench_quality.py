"""Does the global model reach the joint objective? Federated vs centralized vs local-only, per scenario and option.

    python -m benchmarks.bench_quality [--scenarios demo a0.1 a0.5 a1.0] [--options NAME ...] [--seeds 0 1 2]
        [--regions 10] [--min-train 20] [--min-test 10] [--config configs/demo.yaml] [--set KEY=VALUE ...]
        [--work DIR] [--json FILE]

A scenario is a set of regions: ``demo`` (the bundled regions) or ``aA`` (the demo's pooled rows split into
``--regions`` regions with Dirichlet(A) label skew by ``fedlocale data split``, drawn afresh for every seed, so
that no option is tuned to one draw). An option is a named list of config overrides (``OPTIONS`` below; add your
own with ``--option NAME=KEY=VALUE,KEY=VALUE``). Every run is a real ``fedlocale simulate`` with the baselines:
centralized and local-only get the same number of example passes as the federated run and, like it, keep their
best round (epoch chunk) on validation. Options that leave the nodes' training as it is (aggregation settings
only) reuse the baselines of the first option run on the same scenario and seed.

Prints one table row per scenario × option (mean over seeds, with the per-seed values) and writes JSON with every
run's overall and per-region macro-F1, its pooled macro-F1 (all regions' test examples as one set, which unlike
the mean of the regions' is not degenerate on one-class regions) and its validation curve per round. Each row
also counts the region runs whose served model is below local-only beyond chance (the paired-bootstrap interval
of served − local-only entirely below 0; ``served<local``, of those compared).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.output import write_result
from deploy.env import apply_env

MODES = ("federated", "centralized", "local_only", "personalized")


@dataclass(frozen=True)
class Option:
    """A named set of config overrides; ``nodes`` is False when they touch only the server's aggregation (the
    baselines of another option on the same data and seed then stand for them too)."""

    name: str
    overrides: tuple[str, ...]
    nodes: bool = True


def parse_option(text: str) -> Option:
    """``NAME=KEY=VALUE,KEY=VALUE`` as an Option (run with its own baselines)."""
    name, _, rest = text.partition("=")
    if not name or not rest:
        raise SystemExit(f"--option {text!r}: expected NAME=KEY=VALUE[,KEY=VALUE...]")
    return Option(name, tuple(part for part in rest.split(",") if part))


def scenario_regions(
    name: str, seed: int, regions: int, pool: Path, work: Path, minimums: tuple[int, int] = (20, 10)
) -> Path | None:
    """The regions folder of scenario ``name`` for ``seed`` (None: the config's own regions); ``minimums``: the
    fewest train and test examples of every region (``fedlocale data split --min-train --min-test``)."""
    if name == "demo":
        return None
    if not name.startswith("a"):
        raise SystemExit(f"unknown scenario {name!r}: demo or aALPHA (e.g. a0.5)")
    from simulations.datasplit import SplitSettings, run_split

    alpha = float(name[1:])
    # a split with other minimums is another split: never reuse one for the other
    tag = "" if minimums == (20, 10) else f"-m{minimums[0]}-{minimums[1]}"
    out = work / f"split-{name}-k{regions}-s{seed}{tag}"
    if not (out / "split.json").is_file():
        settings = SplitSettings(regions=regions, alpha=alpha, seed=seed, min_train=minimums[0], min_test=minimums[1])
        run_split(pool, out, settings, say=say)
    return out


def run_one(
    config: Path,
    overrides: Sequence[str],
    regions_dir: Path | None,
    seed: int,
    out: Path,
    local_predictions: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[float | None], float]:
    """One ``fedlocale simulate``; its summary, the validation macro-F1 per round (None where the round was not
    validated), and its wall time.

    ``local_predictions``: the local-only baseline's test predictions per region, filled by a run with that
    baseline, or given to a run without it (the same data and seed) for its served − local-only intervals."""
    import json

    from common.config import load_config
    from common.runfiles import FEDERATION_FILE
    from simulations.runner import simulate

    cfg = load_config(config, [*overrides, f"seed={seed}"], regions_dir)
    started = time.perf_counter()
    summary = simulate(
        cfg,
        out,
        config_path=str(config),
        say=say,
        overwrite=True,
        on_round=report_round,
        local_predictions=local_predictions,
    )
    seconds = time.perf_counter() - started
    federation = json.loads((out / FEDERATION_FILE).read_text())
    # null (not NaN, which is not JSON) for a round not validated (early_stopping.every) or without val data
    curve = [r.get("val_overall", {}).get("macro_f1") for r in federation["rounds"]]
    return summary.to_json(), curve, seconds


def row_of(summary: dict[str, Any]) -> dict[str, Any]:
    """Overall and per-region macro-F1 of every mode a run has; when the run compared the served model with
    local-only (``served_vs_local_only``), how many regions it compared (``vs_local_only_regions``) and which
    of them have the interval of served − local-only entirely below 0 (``below_local_only``); when the
    centralized baseline ran, which of its validation checkpoints it kept (``centralized_kept``)."""
    from common.keys import CENTRALIZED, SERVED_VS_LOCAL_ONLY
    from common.runfiles import KEPT_CHECKPOINT, POOLED

    overall = {m: summary["overall"][m]["macro_f1"] for m in MODES if m in summary["overall"]}
    # macro-F1 of all regions' test examples pooled: the per-region mean above is degenerate on one-class
    # regions (common.metrics.macro_f1), which strong label skew makes
    pooled = {m: summary["overall"][m][POOLED] for m in MODES if POOLED in summary["overall"].get(m, {})}
    regions = {
        name: {m: r[m]["macro_f1"] for m in MODES if isinstance(r.get(m), dict) and "macro_f1" in r[m]}
        for name, r in summary["regions"].items()
    }
    row = {"overall": overall, "pooled": pooled, "regions": regions, "best_round": summary["run"].get("best_round")}
    # one centralized model serves every region: any region's block says which checkpoint it kept
    kept = [
        r[CENTRALIZED][KEPT_CHECKPOINT]
        for r in summary["regions"].values()
        if KEPT_CHECKPOINT in r.get(CENTRALIZED, {})
    ]
    if kept:
        row["centralized_kept"] = kept[0]
    compared = {
        name: r[SERVED_VS_LOCAL_ONLY]
        for name, r in summary["regions"].items()
        if isinstance(r.get(SERVED_VS_LOCAL_ONLY), dict)
    }
    if compared:
        row["vs_local_only_regions"] = len(compared)
        row["below_local_only"] = sorted(name for name, entry in compared.items() if not entry["reaches_zero"])
    return row


def merge_baselines(row: dict[str, Any], shared: dict[str, Any]) -> dict[str, Any]:
    """``row`` with the centralized and local-only scores of ``shared`` (a run on the same data and seed whose
    nodes trained alike)."""
    borrowed = ("centralized", "local_only")
    overall = {**row["overall"], **{m: shared["overall"][m] for m in borrowed if m in shared["overall"]}}
    pooled = {**row.get("pooled", {}), **{m: shared["pooled"][m] for m in borrowed if m in shared.get("pooled", {})}}
    regions = {
        name: {**scores, **{m: shared["regions"][name][m] for m in borrowed if m in shared["regions"][name]}}
        for name, scores in row["regions"].items()
    }
    kept = {"centralized_kept": shared["centralized_kept"]} if "centralized_kept" in shared else {}
    return {**row, "overall": overall, "pooled": pooled, "regions": regions, **kept}


def mean(values: Sequence[float]) -> float:
    """The mean, NaN for none."""
    return statistics.fmean(values) if values else math.nan


def below_local_only(runs: Sequence[dict[str, Any]]) -> tuple[int, int] | None:
    """Over ``runs`` (seeds), how many region runs have served − local-only entirely below 0, of how many
    compared; None when no run compared."""
    compared = [r for r in runs if "vs_local_only_regions" in r]
    if not compared:
        return None
    return sum(len(r["below_local_only"]) for r in compared), sum(r["vs_local_only_regions"] for r in compared)


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per scenario × option: mean macro-F1 per mode over seeds (the test-size weighted mean of the
    regions'), federated − centralized, over the seeds the regions whose served − local-only interval is
    entirely below 0, of those compared, then the same means of the pooled macro-F1 (``p·``) and its gap."""
    short = {"federated": "fed", "centralized": "cen", "local_only": "loc", "personalized": "pers"}
    print(
        f"{'scenario':<9}{'option':<22}{'seeds':>6}"
        + "".join(f"{m:>14}" for m in MODES)
        + f"{'fed−cen':>9}{'served<local':>14}"
        + "".join(f"{'p·' + short[m]:>8}" for m in MODES)
        + f"{'p·fed−cen':>11}"
    )
    for row in rows:
        means, pooled = row["mean"], row.get("mean_pooled", {})
        gap = means.get("federated", math.nan) - means.get("centralized", math.nan)
        pooled_gap = pooled.get("federated", math.nan) - pooled.get("centralized", math.nan)
        cells = "".join(f"{means.get(m, math.nan):>14.3f}" for m in MODES)
        pooled_cells = "".join(f"{pooled.get(m, math.nan):>8.3f}" for m in MODES)
        below = below_local_only(row["runs"])
        count = "-" if below is None else f"{below[0]}/{below[1]}"
        print(
            f"{row['scenario']:<9}{row['option']:<22}{len(row['runs']):>6}{cells}{gap:>+9.3f}{count:>14}"
            f"{pooled_cells}{pooled_gap:>+11.3f}"
        )


def say(message: str) -> None:
    """Progress to stderr, so the table on stdout stays clean."""
    print(message, file=sys.stderr, flush=True)


def report_round(record: dict[str, Any]) -> None:
    """One progress line per finished round."""
    overall = record.get("val_overall", {}).get("macro_f1")
    val = "not validated" if overall is None else f"val macro-F1 {overall:.3f}"  # early_stopping.every
    say(f"  round {record['round']}: {val} ({record.get('seconds', 0):.0f} s)")


# The candidates the defaults were chosen from (docs/benchmarks.md says how). Each is a complete set of the
# settings that differ from the base config, so that a row means the same whatever the base's defaults are.
_STEPS = ("rounds=12", "train.local_steps=5")  # 12 rounds × 5 local steps: the demo's ~3 passes in small rounds
OPTIONS: dict[str, Option] = {
    option.name: option
    for option in (
        # before issue 16: 3 rounds of one local epoch, plain FedAvg
        Option("e1", ("rounds=3", "train.epochs=1", "train.local_steps=null", "train.logit_adjust=0.0")),
        # the options below train alike on the nodes, so they share the baselines of the first of them that runs
        Option("s5", (*_STEPS, "train.logit_adjust=0.0", "aggregation.optimizer=fedavg"), nodes=False),
        Option(
            "s5-fedavgm",
            (*_STEPS, "train.logit_adjust=0.0", "aggregation.optimizer=fedavgm", "aggregation.server_lr=1.0"),
            nodes=False,
        ),
        Option(
            "s5-fedadam",
            (*_STEPS, "train.logit_adjust=0.0", "aggregation.optimizer=fedadam", "aggregation.server_lr=0.01"),
            nodes=False,
        ),
        # logit adjustment (balanced softmax) by each region's own label prior
        Option("s5-la", (*_STEPS, "train.logit_adjust=1.0", "aggregation.optimizer=fedavg")),
    )
}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark."""
    apply_env()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_quality", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"), help="the demo scenario's config")
    parser.add_argument(
        "--skew-config",
        type=Path,
        default=Path("configs/skew.yaml"),
        help="the Dirichlet scenarios' config (the demo's settings without per-region policies)",
    )
    parser.add_argument("--scenarios", nargs="+", default=["demo", "a0.1", "a0.5", "a1.0"])
    parser.add_argument("--options", nargs="*", default=list(OPTIONS), help=f"of {', '.join(OPTIONS)}")
    parser.add_argument("--option", dest="extra", action="append", default=[], help="NAME=KEY=VALUE,KEY=VALUE")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--regions", type=int, default=10, help="regions of a Dirichlet scenario")
    parser.add_argument("--pool", type=Path, default=Path("data/demo"), help="pooled rows of the Dirichlet splits")
    parser.add_argument("--min-train", type=int, default=20, help="fewest train examples of a Dirichlet region")
    parser.add_argument("--min-test", type=int, default=10, help="fewest test examples of a Dirichlet region")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="for every run")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_quality"))
    parser.add_argument("--json", type=Path, default=None, help="default: WORK/bench_quality.json")
    args = parser.parse_args(argv)
    extra = [parse_option(text) for text in args.extra]
    unknown = [name for name in args.options if name not in OPTIONS]
    if unknown:
        raise SystemExit(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    options = [OPTIONS[name] for name in args.options] + extra
    rows: list[dict[str, Any]] = []
    # the baselines of the first node-neutral option per scenario and seed, for the others, with its local-only
    # test predictions (the borrowing runs compare their served models with them)
    baselines: dict[tuple[str, int], dict[str, Any]] = {}
    local_predictions: dict[tuple[str, int], dict[str, Any]] = {}
    minimums = (args.min_train, args.min_test)
    # every split before any run: a split the pool cannot give fails in seconds, not after hours of other runs
    splits = {
        (scenario, seed): scenario_regions(scenario, seed, args.regions, args.pool, args.work, minimums)
        for scenario in args.scenarios
        for seed in args.seeds
    }
    for scenario in args.scenarios:
        for option in options:
            runs = []
            for seed in args.seeds:
                regions_dir = splits[(scenario, seed)]
                out = args.work / f"{scenario}-{option.name}-s{seed}"
                shared = None if option.nodes else baselines.get((scenario, seed))
                say(f"{scenario} · {option.name} · seed {seed}" + (" (baselines of an earlier run)" if shared else ""))
                overrides = [*args.overrides, *option.overrides, *(["baselines=[]"] if shared else [])]
                config = args.config if regions_dir is None else args.skew_config
                predictions = local_predictions.get((scenario, seed), {}) if shared else {}
                summary, curve, seconds = run_one(config, overrides, regions_dir, seed, out, predictions)
                row = row_of(summary)
                if shared is None and not option.nodes:
                    baselines[(scenario, seed)] = row
                    local_predictions[(scenario, seed)] = predictions
                elif shared is not None:
                    row = merge_baselines(row, shared)
                runs.append({"seed": seed, **row, "val_curve": curve, "seconds": seconds})
            mean_row = {m: mean([r["overall"][m] for r in runs if m in r["overall"]]) for m in MODES}
            mean_pooled = {m: mean([r["pooled"][m] for r in runs if m in r.get("pooled", {})]) for m in MODES}
            below = below_local_only(runs)
            rows.append(
                {
                    "scenario": scenario,
                    "option": option.name,
                    "mean": mean_row,
                    "mean_pooled": mean_pooled,
                    # region runs (over the seeds) whose served − local-only interval is entirely below 0
                    **({"below_local_only": below[0], "vs_local_only_regions": below[1]} if below else {}),
                    "runs": runs,
                }
            )
            print_table(rows[-1:])
    print()
    print_table(rows)
    # the Dirichlet scenarios run on --skew-config, the demo on --config: name both
    result = {
        "config": str(args.config),
        "skew_config": str(args.skew_config),
        "overrides": args.overrides,
        "seeds": args.seeds,
        "rows": rows,
    }
    return write_result(args.json or args.work / "bench_quality.json", result)


def run(argv: list[str] | None = None) -> int:
    """``main``, with fedlocale's errors (a bad config or split) printed as the CLI prints them, not raised."""
    from common.errors import FedlocaleError

    try:
        return main(argv)
    except FedlocaleError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    raise SystemExit(run())
