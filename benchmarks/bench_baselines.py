"""Benchmark of the baselines' processes: the same baselines trained one after another and side by side.

    python -m benchmarks.bench_baselines [CONFIG] [--processes 1 2] [--repeats N] [--set KEY=VALUE ...]
                                          [--json FILE]

On CONFIG (default: the demo) with its data loaded once, ``simulations.baselines.run_baselines`` runs with
``simulation.baseline_processes`` set to each of ``--processes`` in turn, the order alternated over ``--repeats``
so that a machine slowing down during the run does not favour one setting. Printed and written: per setting the
wall-clock seconds of the whole call (process start-up included), as a ratio to the first setting's, the sum of
its jobs' own seconds, the pooled test macro-F1 of each baseline, and how far each region's test macro-F1 is from
the first setting's (the settings differ only in the number of torch threads per model, i.e. in the order of
floating-point sums).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.output import write_result
from deploy.env import apply_env

DEFAULT_JSON = Path("benchmarks/results/bench_baselines-demo.json")


def measure(config: Path, overrides: list[str], processes: list[int], repeats: int) -> dict[str, Any]:
    """The runs, alternated, and their comparison with the first setting of ``processes``."""
    from common.config import load_config
    from common.metrics import pooled_macro_f1
    from common.runfiles import CONFUSION
    from simulations.baselines import run_baselines
    from simulations.runner import load_all

    data = load_all(load_config(config, overrides), lambda _: None)
    runs: list[dict[str, Any]] = []
    for repeat in range(repeats):
        order = processes if repeat % 2 == 0 else processes[::-1]
        for count in order:
            cfg = load_config(config, [*overrides, f"simulation.baseline_processes={count}"])
            started = time.perf_counter()
            out = run_baselines(cfg, data, lambda line: print(f"  {line}", file=sys.stderr))
            wall = time.perf_counter() - started
            run = {
                "processes": count,
                "repeat": repeat,
                "wall_s": wall,
                "jobs_s": {baseline: seconds for baseline, (_, seconds) in out.items()},
                "pooled_macro_f1": {
                    baseline: pooled_macro_f1([np.array(s[CONFUSION]) for s in scores.values()])
                    for baseline, (scores, _) in out.items()
                },
                "macro_f1": {
                    baseline: {region: s["macro_f1"] for region, s in scores.items()}
                    for baseline, (scores, _) in out.items()
                },
            }
            print(f"processes {count}, repeat {repeat}: {wall:.0f} s", file=sys.stderr)
            runs.append(run)
    first = processes[0]
    per_setting: dict[str, Any] = {}
    for count in processes:
        mine = [r for r in runs if r["processes"] == count]
        reference = [r for r in runs if r["processes"] == first]
        per_setting[str(count)] = {
            "wall_s_median": statistics.median(r["wall_s"] for r in mine),
            # paired by repeat: the two settings of one repeat ran back to back
            "wall_over_first": [m["wall_s"] / f["wall_s"] for m, f in zip(mine, reference, strict=True)],
            "pooled_macro_f1": mine[0]["pooled_macro_f1"],
            "max_abs_region_f1_diff_from_first": max(
                abs(m["macro_f1"][b][region] - f["macro_f1"][b][region])
                for m, f in zip(mine, reference, strict=True)
                for b in m["macro_f1"]
                for region in m["macro_f1"][b]
            ),
        }
    return {"config": str(config), "overrides": overrides, "repeats": repeats, "runs": runs, "settings": per_setting}


def print_table(result: dict[str, Any]) -> None:
    """One row per setting of ``--processes``."""
    settings = result["settings"]
    baselines = list(next(iter(settings.values()))["pooled_macro_f1"])
    head = f"{'processes':>10}{'wall s':>9}{'× first':>9}" + "".join(f"{b + ' F1':>16}" for b in baselines)
    print(head + f"{'max |Δ F1|':>12}")
    for count, row in settings.items():
        ratio = statistics.median(row["wall_over_first"])
        f1 = "".join(f"{row['pooled_macro_f1'][b]:>16.3f}" for b in baselines)
        print(
            f"{count:>10}{row['wall_s_median']:>9.0f}{ratio:>9.2f}{f1}{row['max_abs_region_f1_diff_from_first']:>12.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table and write the JSON."""
    apply_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, nargs="?", default=Path("configs/demo.yaml"))
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    result = measure(args.config, args.overrides, args.processes, args.repeats)
    print_table(result)
    return write_result(args.json, result)


if __name__ == "__main__":
    sys.exit(main())
