"""What the personal LoRA of ``personalize.mode: dual`` costs a node per round: one train message with the
global adapter alone (``client.task.train_round``) against one with the personal LoRA (``client.task.train_dual``)
trained alongside in the same pass (``dual_train: joint``) or in a pass of its own after it (``apart``), same
region, task and seed, in one process.

    python -m benchmarks.bench_dual [CONFIG] [--regions cn-hotel en-movies] [--repeats 2] [--json FILE]

The order of the three runs rotates from one repeat to the next, so that a change in the machine's load cancels
out of the paired ratios. Prints a table and writes JSON (default ``benchmarks/results/bench_dual-demo.json``).
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


KINDS = ("plain", "joint", "apart")  # train_round; train_dual with dual_train joint; with apart


def time_round(region: Any, task: Any, state: Any, node: Any | None) -> tuple[float, int]:
    """Seconds of one train message of ``region`` (``node`` None: plain ``train_round``) and the number of
    values it sends."""
    from client.task import NodeSettings, train_dual, train_round

    started = time.perf_counter()
    if node is None:
        sent, _ = train_round(region, task, state, NodeSettings())
    else:
        sent, _ = train_dual(region, task, state, node)
    return time.perf_counter() - started, sum(int(v.numel()) for v in sent.values())


def main(argv: list[str] | None = None) -> int:
    """Time plain, joint and apart train messages per region; print the table and write the JSON."""
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
        rank = cfg.personalize.local_r
        nodes = {
            "plain": None,
            "joint": NodeSettings(personal_dir=Path(folder) / "joint", personal_rank=rank),
            "apart": NodeSettings(personal_dir=Path(folder) / "apart", personal_rank=rank, personal_apart=True),
        }
        for name in args.regions:
            times: dict[str, list[float]] = {kind: [] for kind in KINDS}
            sent: dict[str, int] = {}
            for repeat in range(args.repeats):
                shift = repeat % len(KINDS)
                for kind in KINDS[shift:] + KINDS[:shift]:
                    seconds, sent[kind] = time_round(regions[name], task, state, nodes[kind])
                    times[kind].append(seconds)
                    print(f"{name} repeat {repeat} {kind}: {seconds:.1f} s", file=sys.stderr)
            row: dict[str, Any] = {"region": name}
            row.update({f"{kind}_s": statistics.median(times[kind]) for kind in KINDS})
            for kind in KINDS[1:]:
                ratios = [d / p for p, d in zip(times["plain"], times[kind], strict=True)]
                row[f"ratio_{kind}_to_plain"] = statistics.median(ratios)
                row[f"ratios_{kind}"] = ratios
            row["values_sent"] = sent
            rows.append(row)
    print(f"{'region':<14}{'plain s':>10}{'joint s':>10}{'apart s':>10}{'joint/plain':>13}{'apart/plain':>13}")
    for row in rows:
        print(
            f"{row['region']:<14}{row['plain_s']:>10.1f}{row['joint_s']:>10.1f}{row['apart_s']:>10.1f}"
            f"{row['ratio_joint_to_plain']:>13.3f}{row['ratio_apart_to_plain']:>13.3f}"
        )
    if any(len(set(row["values_sent"].values())) != 1 for row in rows):
        print("error: the three kinds of message sent different numbers of values", file=sys.stderr)
        return 1
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
