"""Benchmark of how a simulation shares the cores: the baselines' processes and the federation's nodes.

    python -m benchmarks.bench_processes [CONFIG] [--processes 1 2] [--repeats N] [--set KEY=VALUE ...]
                                          [--json FILE]
    python -m benchmarks.bench_processes --federation [CONFIG] [--cpus 2 1] [--repeats N] [--set KEY=VALUE ...]
                                          [--json FILE]

Baselines (the default): on CONFIG (default: the demo) with its data loaded once,
``simulations.baselines.run_baselines`` runs with ``simulation.baseline_processes`` set to each of ``--processes``
in turn, the order alternated over ``--repeats`` so that a machine slowing down during the run does not favour one
setting. Printed and written: per setting the wall-clock seconds of the whole call (process start-up included), as
a ratio to the first setting's, the sum of its jobs' own seconds, the pooled test macro-F1 of each baseline, and
how far each region's test macro-F1 is from the first setting's (the settings differ only in the number of torch
threads per model, i.e. in the order of floating-point sums).

``--federation``: ``fedlocale simulate CONFIG`` without baselines or personalization, in a process of its own (as a
user runs it), with ``simulation.cpus_per_client`` set to each of ``--cpus`` in turn, alternated the same way.
Printed and written: the federation's seconds (``timing.federated_s``: Ray's start, the rounds, the final test) and
the whole command's, as ratios to the first setting's, and whether each region's test macro-F1 is the same.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.output import write_result
from common.runfiles import read_summary
from deploy.env import apply_env

DEFAULT_JSON = Path("benchmarks/results/bench_processes-baselines.json")
FEDERATION_JSON = Path("benchmarks/results/bench_processes-federation.json")


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


def federation(config: Path, overrides: list[str], cpus: list[int], repeats: int) -> dict[str, Any]:
    """``fedlocale simulate`` of the federation alone with each ``simulation.cpus_per_client`` of ``cpus``,
    alternated over ``repeats``; ratios to the first setting, paired by repeat."""
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_processes-") as tmp:
        for repeat in range(repeats):
            for count in cpus if repeat % 2 == 0 else cpus[::-1]:
                out = Path(tmp) / f"c{count}-r{repeat}"
                sets = [*overrides, "baselines=[]", "personalize.mode=none", f"simulation.cpus_per_client={count}"]
                command = [sys.executable, "-m", "fedlocale", "simulate", str(config), "--out", str(out)]
                command += [arg for key in sets for arg in ("--set", key)]
                started = time.perf_counter()
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                wall = time.perf_counter() - started
                summary = read_summary(out)
                runs.append(
                    {
                        "cpus_per_client": count,
                        "repeat": repeat,
                        "command_s": wall,
                        "federated_s": summary.timing["federated_s"],
                        "macro_f1": {name: r["federated"]["macro_f1"] for name, r in summary.regions.items()},
                    }
                )
                print(
                    f"cpus_per_client {count}, repeat {repeat}: federated {runs[-1]['federated_s']:.0f} s",
                    file=sys.stderr,
                )
    first = [r for r in runs if r["cpus_per_client"] == cpus[0]]
    settings = {}
    for count in cpus:
        mine = [r for r in runs if r["cpus_per_client"] == count]
        settings[str(count)] = {
            "federated_s_median": statistics.median(r["federated_s"] for r in mine),
            "federated_over_first": [m["federated_s"] / f["federated_s"] for m, f in zip(mine, first, strict=True)],
            "command_over_first": [m["command_s"] / f["command_s"] for m, f in zip(mine, first, strict=True)],
            "same_macro_f1_as_first": all(m["macro_f1"] == f["macro_f1"] for m, f in zip(mine, first, strict=True)),
        }
    return {"config": str(config), "overrides": overrides, "repeats": repeats, "runs": runs, "settings": settings}


def print_federation(result: dict[str, Any]) -> None:
    """One row per setting of ``--cpus``."""
    print(f"{'cpus_per_client':>16}{'federated s':>13}{'× first':>9}{'command × first':>17}{'same F1':>9}")
    for count, row in result["settings"].items():
        print(
            f"{count:>16}{row['federated_s_median']:>13.0f}{statistics.median(row['federated_over_first']):>9.2f}"
            f"{statistics.median(row['command_over_first']):>17.2f}{row['same_macro_f1_as_first']!s:>9}"
        )


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
    parser.add_argument("--federation", action="store_true", help="the federation's nodes, not the baselines")
    parser.add_argument("--cpus", type=int, nargs="+", default=[2, 1], help="with --federation: cpus_per_client")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.federation:
        result = federation(args.config, args.overrides, args.cpus, args.repeats)
        print_federation(result)
        return write_result(args.json or FEDERATION_JSON, result)
    result = measure(args.config, args.overrides, args.processes, args.repeats)
    print_table(result)
    return write_result(args.json or DEFAULT_JSON, result)


if __name__ == "__main__":
    sys.exit(main())
