"""Benchmark of the core loop on a config (default: the demo): quality, time, bytes and memory in one run.

    python -m benchmarks.bench_core [CONFIG] [--out DIR] [--set KEY=VALUE ...] [--json FILE]

Prints a table and writes JSON: accuracy and macro-F1 of federated / local-only / centralized per region and
overall, federated ÷ centralized wall time per training example, adapter ÷ full-model bytes, bytes up per round
per client ÷ adapter bytes, and peak RSS of this process tree (Ray actors included).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.output import write_result
from deploy.env import apply_env

MODES = ("federated", "local_only", "centralized")


class PeakRss:
    """Samples the resident memory of this process and all its descendants; keeps the peak of the sum."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil  # comes with ray

        root = psutil.Process(os.getpid())
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue  # a process that ended between listing and reading
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(summary: dict[str, Any], epochs: float, rounds_planned: int, peak_rss: int) -> dict[str, Any]:
    """Derived numbers of a finished run: ratios against the targets of the core issue."""
    regions = summary["regions"]
    n_train = sum(r["num_train"] for r in regions.values())
    comm, timing = summary["communication"], summary["timing"]
    fed_examples = n_train * epochs * summary["run"]["rounds_done"]
    cen_examples = n_train * epochs * rounds_planned
    out: dict[str, Any] = {
        "regions": {name: {m: r[m] for m in MODES if m in r} for name, r in regions.items()},
        "overall": summary["overall"],
        "adapter_bytes": comm["adapter_bytes"],
        "full_model_bytes": comm["full_model_bytes"],
        "adapter_over_full_model": comm["adapter_bytes"] / comm["full_model_bytes"],
        "max_bytes_up_per_client_round_over_adapter": max(
            r["bytes_up"] / len(r["participants"]) for r in comm["per_round"]
        )
        / comm["adapter_bytes"],
        "federated_s": timing["federated_s"],
        "peak_rss_mb": peak_rss / 2**20,
    }
    if "centralized_s" in timing:
        out["centralized_s"] = timing["centralized_s"]
        out["fed_over_central_time_per_example"] = (timing["federated_s"] / fed_examples) / (
            timing["centralized_s"] / cen_examples
        )
    if "local_only_s" in timing:
        out["local_only_s"] = timing["local_only_s"]
    return out


def print_table(result: dict[str, Any]) -> None:
    """The human-readable view of ``measure``'s output."""
    header = f"{'region':<18}" + "".join(f"{m + ' acc':>18}{m + ' F1':>17}" for m in MODES)
    print(header)
    rows = [*result["regions"].items(), ("OVERALL", result["overall"])]
    for name, row in rows:
        cells = "".join(
            f"{row[m]['accuracy']:>18.3f}{row[m]['macro_f1']:>17.3f}" if m in row else f"{'-':>18}{'-':>17}"
            for m in MODES
        )
        print(f"{name:<18}{cells}")
    print()
    for key in (
        "fed_over_central_time_per_example",
        "adapter_over_full_model",
        "max_bytes_up_per_client_round_over_adapter",
        "federated_s",
        "centralized_s",
        "local_only_s",
        "peak_rss_mb",
    ):
        if key in result:
            print(f"{key:<46}{result[key]:>14.4f}")


def say(message: str) -> None:
    """Progress to stderr, so the table on stdout stays clean."""
    print(message, file=sys.stderr, flush=True)


def report_round(record: dict[str, Any]) -> None:
    """One progress line per finished round."""
    overall = record.get("val_overall", {}).get("macro_f1")
    val = "not validated" if overall is None else f"val macro-F1 {overall:.3f}"  # early_stopping.every
    say(f"round {record['round']}: {len(record['participants'])} regions, {val}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark."""
    apply_env()
    from common.config import load_config
    from simulations.runner import simulate

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_core", description=__doc__.split("\n")[0])
    parser.add_argument("config", type=Path, nargs="?", default=Path("configs/demo.yaml"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_core"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path, default=None, help="default: OUT/bench_core.json")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    started = time.perf_counter()
    with PeakRss() as rss:
        # a benchmark owns its --out: a rerun replaces the previous one
        summary = simulate(cfg, args.out, config_path=str(args.config), say=say, on_round=report_round, overwrite=True)
    result = measure(summary.to_json(), cfg.train.epochs, cfg.rounds, rss.peak)
    result["total_s"] = time.perf_counter() - started
    result["config"] = str(args.config)
    result["overrides"] = args.overrides
    print_table(result)
    path = args.json or args.out / "bench_core.json"
    return write_result(path, result)


if __name__ == "__main__":
    sys.exit(main())
