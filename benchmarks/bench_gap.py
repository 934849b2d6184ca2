"""Is the global model below the regions' local-only models beyond chance? Finished simulations' global model
against each region's local-only model, paired on the same test records, per run and over several runs.

    python -m benchmarks.bench_gap RUN_DIR [RUN_DIR ...] [--resamples N] [--seed N] [--json FILE]

Issue 16 asks the global model to reach local-only ("≥ local-only everywhere"); a run's summary gives the two
overall macro-F1 (the mean of the regions' test macro-F1 weighted by their test records) but no interval for their
difference when personalization ran (the served model is compared with local-only, not the global one). On the
demo's 200 test records per region a point of macro-F1 is within chance, so a gap measured on one run says little.

For each RUN_DIR (a finished ``fedlocale simulate`` with its ``config.yaml`` and ``adapter/``): the global model
of the kept round predicts every region's test split once (``simulations.personalize.global_pass``), and each
region's local-only model is trained again exactly as the run's baseline trained it
(``simulations.baselines.run_baselines`` with ``baselines: [local_only]``: the same seed, data, budget,
checkpoints and processes); both models' test macro-F1 are checked against the run's ``summary.json``. The
difference global − local-only of the overall macro-F1 then gets a paired bootstrap stratified by region (each
region's test records resampled within the region, both models scored on the same resample), per run and over all
runs together (every region of every run, weighted by its test records). Prints a table and writes JSON (default
``benchmarks/results/bench_gap.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.output import write_result
from deploy.env import apply_env

if TYPE_CHECKING:
    from common.config import RunConfig

DEFAULT_JSON = Path("benchmarks/results/bench_gap.json")


@dataclasses.dataclass(frozen=True)
class RegionPredictions:
    """One region of one run: its test labels and both models' predicted labels."""

    run: str
    region: str
    truth: np.ndarray
    global_pred: np.ndarray
    local_pred: np.ndarray


def overall_gap(regions: list[RegionPredictions], num_labels: int, resamples: int, seed: int) -> dict[str, float]:
    """Global − local-only of the test-weighted mean of the regions' macro-F1, and its 95 % percentile interval
    from ``resamples`` paired resamples stratified by region."""
    from common.metrics import macro_f1

    weights = np.array([len(r.truth) for r in regions], dtype=float)
    weights /= weights.sum()

    def gap(picks: list[np.ndarray]) -> float:
        diffs = [
            macro_f1(r.truth[i], r.global_pred[i], num_labels) - macro_f1(r.truth[i], r.local_pred[i], num_labels)
            for r, i in zip(regions, picks, strict=True)
        ]
        return float(np.dot(weights, diffs))

    rng = np.random.default_rng(seed)
    draws = [gap([rng.integers(0, len(r.truth), len(r.truth)) for r in regions]) for _ in range(resamples)]
    return {
        "diff": gap([np.arange(len(r.truth)) for r in regions]),
        "low": float(np.quantile(draws, 0.025)),
        "high": float(np.quantile(draws, 0.975)),
        "resamples": resamples,
    }


def run_predictions(
    run: Path, cfg: RunConfig, say: Callable[[str], None]
) -> tuple[list[RegionPredictions], dict[str, Any], int]:
    """One run's regions (``cfg``: its config) with both models' test predictions, the reproduction check against
    its summary, and its number of labels."""
    from common.metrics import macro_f1
    from common.runfiles import SUMMARY_FILE
    from simulations.baselines import run_baselines
    from simulations.personalize import global_pass
    from simulations.runner import load_all

    summary = json.loads((run / SUMMARY_FILE).read_text())
    data = load_all(cfg, lambda _: None)
    made = global_pass(cfg, run, data)
    say(f"{run}: training the {len(data)} local-only models again")
    local: dict[str, np.ndarray] = {}
    scores = run_baselines(dataclasses.replace(cfg, baselines=("local_only",)), data, lambda _: None, local)
    regions, check = [], {}
    for name, region in data.items():
        if not region.test:
            continue
        truth = np.array([ex.label for ex in region.test], dtype=int)
        global_pred = made.probs[name].argmax(axis=1)
        regions.append(RegionPredictions(str(run), name, truth, global_pred, local[name]))
        recorded = summary.get("regions", {}).get(name, {})
        # [this benchmark's, the run's (null when the run had no such score)]: the models are the run's if these agree
        check[name] = {
            "local_only": [
                scores["local_only"][0][name]["macro_f1"],
                recorded.get("local_only", {}).get("macro_f1"),
            ],
            "global": [macro_f1(truth, global_pred, len(cfg.labels)), recorded.get("federated", {}).get("macro_f1")],
        }
    return regions, check, len(cfg.labels)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, predict and train, print the table and write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_gap", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished simulation folders (fedlocale simulate --out)")
    parser.add_argument("--resamples", type=int, default=2000, help="paired bootstrap resamples (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's seed (default 0)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    args = parser.parse_args(argv)
    if args.resamples < 1:
        parser.error(f"--resamples must be at least 1, got {args.resamples}")
    apply_env()
    from common.config import load_config
    from common.errors import FedlocaleError
    from common.runfiles import ADAPTER_DIR, CONFIG_FILE, SUMMARY_FILE

    # every run checked before the first one trains: a bad third folder must not cost the first two's half hour
    configs: dict[Path, RunConfig] = {}
    for run in args.runs:
        missing = [f for f in (CONFIG_FILE, SUMMARY_FILE) if not (run / f).is_file()]
        if not (run / ADAPTER_DIR).is_dir():
            missing.append(f"{ADAPTER_DIR}/")
        if missing:
            print(f"bench_gap: {run}: not a finished simulation (no {', '.join(missing)})", file=sys.stderr)
            return 2
        try:
            configs[run] = load_config(run / CONFIG_FILE)
        except FedlocaleError as exc:
            print(f"bench_gap: {exc}", file=sys.stderr)
            return exc.exit_code

    every: list[RegionPredictions] = []
    result: dict[str, Any] = {"runs": {}, "resamples": args.resamples, "seed": args.seed}
    labels = 0
    for run in args.runs:
        regions, check, labels = run_predictions(run, configs[run], print)
        every += regions
        result["runs"][str(run)] = {
            "gap": overall_gap(regions, labels, args.resamples, args.seed),
            "regions": {r.region: overall_gap([r], labels, args.resamples, args.seed) for r in regions},
            "reproduced": check,
        }
    result["all"] = overall_gap(every, labels, args.resamples, args.seed)

    def line(name: str, gap: dict[str, float]) -> str:
        interval = f"[{gap['low']:+.3f}, {gap['high']:+.3f}]"
        return f"{name:<52} {gap['diff']:>+20.3f} {interval:>20}"

    print(f"{'run / region':<52} {'global − local-only':>20} {'95 % interval':>20}")
    for run, entry in result["runs"].items():
        for name, gap in entry["regions"].items():
            print(line(f"  {name}", gap))
        print(line(run, entry["gap"]))
        pairs = [(a, b) for kinds in entry["reproduced"].values() for a, b in kinds.values() if b is not None]
        if pairs:
            print(f"  reproduced the run's test macro-F1 to within {max(abs(a - b) for a, b in pairs):.4f}")
        else:
            print("  the run's summary has no scores to check the reproduction against")
    print(line("all runs", result["all"]))
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
