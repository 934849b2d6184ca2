"""Benchmark of secure aggregation: per-round wall time and bytes with and without it, paired in one run.

    python -m benchmarks.bench_secagg [--regions 3 10] [--rounds 2] [--json FILE]     # the tiny model
    python -m benchmarks.bench_secagg --config configs/demo.yaml [--rounds 2]           # a real config

For each case the same federation runs twice in this process, plain then secure (aggregation.secure.enabled),
through ``simulations.inprocess.InProcessGrid`` (every node's real ClientApp, guard and ledger, one after the
other; no Ray, so the protocol's own cost is not hidden in scheduling). Per round: wall time of train + validation,
bytes up and down (tensors, and the protocol's keys and shares; medians over rounds and ``--repeats`` runs of
each mode in alternating order), and after round 1 — both runs start from the
same adapter and train identically — the largest |secure − plain| over every adapter value. Prints a table,
writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.output import write_result

DEFAULT_JSON = Path("benchmarks/results/bench_secagg.json")
TINY_TRAIN = {"lr": 3e-2, "epochs": 1, "batch_size": 8, "max_steps": 6, "threads": 1}


def _tiny_config(work: Path, regions: int, rounds: int) -> Any:
    import yaml

    from assets.tiny import make_tiny_model, write_region
    from common.config import load_config

    model = work / "tiny-bert"
    if not model.exists():
        make_tiny_model(model, "bert")
    root = work / f"regions-{regions}"
    sizes = [48 + 16 * (i % 4) for i in range(regions)]  # unequal, so that the weighting matters
    entries = [
        {"name": f"r{i:02d}", "data": str(write_region(root / f"r{i:02d}", n, 16, seed=i))} for i, n in enumerate(sizes)
    ]
    raw = {
        "name": f"secagg-{regions}",
        "rounds": rounds,
        "labels": ["neg", "pos"],
        "regions": entries,
        "model": {"base": str(model), "max_length": 32},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": TINY_TRAIN,
        "aggregation": {"min_clients": 2},
    }
    path = work / f"secagg-{regions}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(path)


def _run(cfg: Any, out: Path) -> tuple[list[dict[str, Any]], float, dict[str, np.ndarray], int]:
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.numpy import load_file

    from common.runfiles import AUDIT_DIR, NODES_DIR
    from server.federation import checkpoint_dir, federate
    from simulations.inprocess import InProcessGrid

    grid = InProcessGrid(cfg, out / AUDIT_DIR / NODES_DIR)
    started = time.perf_counter()
    result = federate(grid, cfg, out)  # type: ignore[arg-type]
    total = time.perf_counter() - started
    first = load_file(str(checkpoint_dir(out, 1) / SAFETENSORS_WEIGHTS_NAME))
    return result.rounds, total, first, result.adapter_bytes


def measure_case(name: str, cfg: Any, work: Path, say: Any, repeats: int = 1) -> dict[str, Any]:
    """The plain and the secure run of one config, ``repeats`` times each in alternating order (plain first, then
    secure first, …) so that a drift in the machine's load hits both; medians of the per-round numbers."""
    secure_cfg = dataclasses.replace(
        cfg,
        aggregation=dataclasses.replace(
            cfg.aggregation, secure=dataclasses.replace(cfg.aggregation.secure, enabled=True)
        ),
    )
    configs = {"plain": cfg, "secure": secure_cfg}
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "secure": []}
    firsts: dict[str, dict[str, np.ndarray]] = {}
    adapter = 0
    for repeat in range(repeats):
        for mode in ("plain", "secure") if repeat % 2 == 0 else ("secure", "plain"):
            say(f"{name}: {mode} run {repeat + 1}/{repeats} ({len(cfg.regions)} regions, {cfg.rounds} rounds)")
            rounds, total, first, adapter = _run(configs[mode], work / f"{name}-{mode}-{repeat}")
            firsts.setdefault(mode, first)
            runs[mode].append(
                {
                    "rounds": [
                        {k: r[k] for k in ("round", "seconds", "bytes_up", "bytes_down", "participants")}
                        for r in rounds
                    ],
                    "total_s": total,
                }
            )
    summary = {mode: _per_round(found) for mode, found in runs.items()}
    plain, secure = summary["plain"], summary["secure"]
    first_plain, first_secure = firsts["plain"], firsts["secure"]
    diff = max(float(np.max(np.abs(first_secure[k].astype(np.float64) - first_plain[k]))) for k in first_plain)
    regions = len(cfg.regions)
    return {
        "case": name,
        "regions": regions,
        "adapter_bytes": adapter,
        "plain": plain,
        "secure": secure,
        "runs": runs,
        "time_ratio": secure["seconds_per_round"] / plain["seconds_per_round"],
        "bytes_up_ratio": secure["bytes_up_per_round"] / plain["bytes_up_per_round"],
        "bytes_down_ratio": secure["bytes_down_per_round"] / plain["bytes_down_per_round"],
        "secure_bytes_up_per_region_over_adapter": secure["bytes_up_per_round"] / regions / adapter,
        "max_abs_diff_round1": diff,
    }


def _per_round(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over every round of every repeat."""
    rounds = [r for run in runs for r in run["rounds"]]
    return {
        "seconds_per_round": float(np.median([r["seconds"] for r in rounds])),
        "bytes_up_per_round": float(np.median([r["bytes_up"] for r in rounds])),
        "bytes_down_per_round": float(np.median([r["bytes_down"] for r in rounds])),
    }


def print_table(cases: list[dict[str, Any]]) -> None:
    """One line per case: plain and secure seconds and bytes per round, the ratios, the round-1 difference."""
    head = (
        f"{'case':<14}{'regions':>8}{'plain s':>9}{'secure s':>10}{'×time':>7}"
        f"{'plain up':>12}{'secure up':>12}{'×up':>6}{'up/region÷adapter':>19}{'×down':>7}{'max|Δ| r1':>11}"
    )
    print(head)
    print("-" * len(head))
    for c in cases:
        p, s = c["plain"], c["secure"]
        print(
            f"{c['case']:<14}{c['regions']:>8}{p['seconds_per_round']:>9.2f}{s['seconds_per_round']:>10.2f}"
            f"{c['time_ratio']:>7.2f}{p['bytes_up_per_round']:>12,.0f}{s['bytes_up_per_round']:>12,.0f}"
            f"{c['bytes_up_ratio']:>6.2f}{c['secure_bytes_up_per_region_over_adapter']:>19.2f}"
            f"{c['bytes_down_ratio']:>7.2f}{c['max_abs_diff_round1']:>11.2e}"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_secagg", description=__doc__.split("\n")[0])
    parser.add_argument("--regions", type=int, nargs="+", default=[3, 10], help="tiny-model cases (default: 3 10)")
    parser.add_argument("--config", type=Path, help="measure this run config instead of the tiny-model cases")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each mode, in alternating order")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    from deploy.env import apply_env

    apply_env()
    logging.getLogger("fedlocale").setLevel(logging.WARNING)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    from flwr.supercore.task_identity import TaskIdentity

    # who this process is, as Flower's runtime tells a ServerApp process before it builds any message
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-secagg-") as tmp:
        work = Path(tmp)
        if args.config is not None:
            from common.config import load_config

            cfg = load_config(args.config)
            cfg = dataclasses.replace(cfg, rounds=args.rounds, baselines=())
            cases = [measure_case(args.config.stem, cfg, work, say, args.repeats)]
        else:
            cases = [
                measure_case(f"tiny-{n}", _tiny_config(work, n, args.rounds), work, say, args.repeats)
                for n in args.regions
            ]
    print_table(cases)
    out = {
        "command": "python -m benchmarks.bench_secagg " + " ".join(argv if argv is not None else sys.argv[1:]),
        "grid": "simulations.inprocess.InProcessGrid (nodes one after another in one process)",
        "rounds": args.rounds,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "load_average_before_after": [load_before, os.getloadavg()],
        "cases": cases,
    }
    return write_result(args.json, json.loads(json.dumps(out)))


if __name__ == "__main__":
    raise SystemExit(main())
