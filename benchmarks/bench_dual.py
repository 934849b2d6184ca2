"""What the personal LoRA of ``personalize.mode: dual`` costs a node per round: one train message with the
global adapter alone (``client.task.train_round``) against one with the personal LoRA alongside
(``client.task.train_dual``), same region, task and seed, in one process.

    python -m benchmarks.bench_dual [CONFIG] [--regions cn-hotel en-movies] [--repeats 2] [--json FILE]

Runs alternate (plain, dual, then dual, plain on the next repeat) so that a change in the machine's load
cancels out of the paired ratio. Prints a table and writes JSON (default
``benchmarks/results/bench_dual-demo.json``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.output import write_result
from deploy.env import apply_env

DEFAULT_JSON = Path("benchmarks/results/bench_dual-demo.json")


def time_round(region: Any, task: Any, state: Any, node: Any, dual: bool) -> tuple[float, int]:
    """Seconds of one train message of ``region`` and the number of values it sends."""
    from client.task import train_dual, train_round

    started = time.perf_counter()
    sent, _ = (train_dual if dual else train_round)(region, task, state, node)
    return time.perf_counter() - started, sum(int(v.numel()) for v in sent.values())


def main(argv: list[str] | None = None) -> int:
    """Time plain and dual train messages per region; print the table and write the JSON."""
    apply_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, nargs="?", default=Path("configs/demo.yaml"))
    parser.add_argument("--regions", nargs="+", default=["cn-hotel", "en-movies"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)

    from client.task import NodeSettings
    from common.config import client_task, load_config
    from common.model import adapter_state, build_model

    cfg = load_config(args.config, ["personalize.mode=dual"])
    task = client_task(cfg, server_round=1)
    state = adapter_state(build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed).model)
    regions = {r.name: r for r in cfg.regions}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        node = NodeSettings(personal_dir=Path(folder), personal_rank=cfg.personalize.local_r)
        for name in args.regions:
            times: dict[bool, list[float]] = {False: [], True: []}
            sent: dict[bool, int] = {}
            for repeat in range(args.repeats):
                for dual in (False, True) if repeat % 2 == 0 else (True, False):
                    seconds, sent[dual] = time_round(regions[name], task, state, node, dual)
                    times[dual].append(seconds)
                    print(f"{name} repeat {repeat} {'dual' if dual else 'plain'}: {seconds:.1f} s", file=sys.stderr)
            ratios = [d / p for p, d in zip(times[False], times[True], strict=True)]
            rows.append(
                {
                    "region": name,
                    "plain_s": statistics.median(times[False]),
                    "dual_s": statistics.median(times[True]),
                    "ratio_dual_to_plain": statistics.median(ratios),
                    "ratios": ratios,
                    "values_sent": {"plain": sent[False], "dual": sent[True]},
                }
            )
    print(f"{'region':<14}{'plain s':>10}{'dual s':>10}{'dual/plain':>12}{'values sent (plain, dual)':>28}")
    for row in rows:
        values = f"{row['values_sent']['plain']:,}, {row['values_sent']['dual']:,}"
        print(
            f"{row['region']:<14}{row['plain_s']:>10.1f}{row['dual_s']:>10.1f}"
            f"{row['ratio_dual_to_plain']:>12.3f}{values:>28}"
        )
    result = {
        "config": str(args.config),
        "local_r": cfg.personalize.local_r,
        "lora_r": cfg.lora.r,
        "repeats": args.repeats,
        "rows": rows,
    }
    return write_result(args.json, result)


if __name__ == "__main__":
    raise SystemExit(main())
