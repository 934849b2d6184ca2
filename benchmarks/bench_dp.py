"""Utility and cost of record-level DP-SGD (client/dp.py): macro-F1 of the global (federated) and the served
(personalized, else global) model for each per-region budget epsilon, and the time per training example of one
train message with and without DP-SGD, paired in one run.

    python -m benchmarks.bench_dp [CONFIG] [--epsilons [1 3 8 inf]] [--delta 1e-5] [--region NAME]
                                  [--repeats 2] [--json FILE] [--runs-dir DIR] [--set KEY=VALUE ...]

Each epsilon is a full ``fedlocale simulate`` of CONFIG whose every region's policy (its own, else an empty
one) gets ``require_dp: {epsilon, delta}`` (``inf``: none); ``--epsilons`` with no value runs the timing alone.
The timing alternates plain and DP train messages of ``--region`` (plain, DP, then DP, plain) so that a change
in the machine's load cancels out of the ratio; it reports seconds per example seen and per message.
``--runs-dir`` keeps the run folders (``run-1``, ..., ``run-inf``), e.g. for ``benchmarks.bench_privacy``.
Prints a table and writes JSON (default ``benchmarks/results/bench_dp.json``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.output import write_result
from common.runfiles import read_summary
from deploy.env import apply_env

DEFAULT_JSON = Path("benchmarks/results/bench_dp.json")


def eps_tag(eps: float) -> str:
    """An epsilon as the run folders and the tables name it (``inf``, ``8``, ``0.5``)."""
    return "inf" if math.isinf(eps) else f"{eps:g}"


def runs_dir_problem(runs_dir: Path | None) -> str | None:
    """Why ``--runs-dir`` cannot be used (it exists: the benchmark writes new run folders there), or None."""
    if runs_dir is not None and runs_dir.exists():
        return f"--runs-dir {runs_dir} exists; the benchmark writes new run folders there"
    return None


def dp_policies(cfg: Any, folder: Path, eps: float, delta: float) -> Path:
    """A policy per region (its own with require_dp set, else a minimal one) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for region in cfg.regions:
        raw = yaml.safe_load(region.policy.read_text()) if region.policy else {"region": region.name}
        raw["require_dp"] = None if math.isinf(eps) else {"epsilon": eps, "delta": delta}
        (folder / f"{region.name}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder


def simulate_with_policies(
    config: Path, out: Path, policies: Path, overrides: list[str], regions: list[Any]
) -> dict[str, Any]:
    """One simulation with every region's policy from ``policies``; its summary.json."""
    # a region's own `policy:` in the config's `regions:` list wins over `policies:`, so each is pointed at the
    # benchmark's copy (regions found through `regions_dir` take theirs from `policies:`)
    listed = yaml.safe_load(config.read_text()).get("regions") or []
    sets = [*overrides, f"policies={policies}"]
    sets += [
        f"regions[{i}].policy={policies / (r.name + '.yaml')}"
        for i, r in enumerate(regions)
        if i < len(listed) and isinstance(listed[i], dict) and listed[i].get("policy")
    ]
    cmd = [sys.executable, "-m", "fedlocale", "simulate", str(config), "--out", str(out), "--overwrite"]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True)
    summary = read_summary(out)
    return {"overall": summary.overall, "regions": summary.regions}


def _time_pair(cfg: Any, region_name: str, delta: float, repeats: int, folder: Path) -> dict[str, float]:
    """Seconds per training example of one train message, plain and with DP-SGD (epsilon 8), paired. Round 2
    is timed: a DP node calibrates its noise once per run, before round 1, which is not a per-example cost."""
    from client.task import NodeSettings, train_round
    from common.config import client_task
    from common.model import adapter_state, build_model
    from common.policy import DpRequirement, RegionPolicy

    region = next(r for r in cfg.regions if r.name == region_name)
    state = adapter_state(build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed).model)
    dp_policy = RegionPolicy(region_name, require_dp=DpRequirement(8.0, delta))
    times: dict[bool, list[float]] = {False: [], True: []}
    messages: dict[bool, list[float]] = {False: [], True: []}
    for i in range(repeats):
        for dp in (False, True) if i % 2 == 0 else (True, False):
            node = NodeSettings(policy=dp_policy if dp else None, audit_dir=folder / f"{i}-{dp}" if dp else None)
            train_round(region, client_task(cfg, 1, run_key=f"bench-{i}"), state, node)
            started = time.perf_counter()
            _, result = train_round(region, client_task(cfg, 2, run_key=f"bench-{i}"), state, node)
            # per example *seen*: a DP step sees q * N examples on average (q from dp.batch_size when set, as
            # client.dp.plan has it), a plain one its batch
            batch = cfg.dp.sampled_batch(cfg.train.batch_size, result.num_examples) if dp else cfg.train.batch_size
            seen = result.steps * min(batch, result.num_examples)
            took = time.perf_counter() - started
            times[dp].append(took / seen)
            messages[dp].append(took)
    plain, private = statistics.median(times[False]), statistics.median(times[True])
    # per message too: with dp.batch_size beyond the plain batch a DP message sees more examples than a plain one
    plain_message, dp_message = statistics.median(messages[False]), statistics.median(messages[True])
    return {
        "plain_s_per_example": plain,
        "dp_s_per_example": private,
        "ratio": private / plain,
        "plain_s_per_message": plain_message,
        "dp_s_per_message": dp_message,
        "message_ratio": dp_message / plain_message,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the epsilons and the paired timing; print the table and write the JSON."""
    apply_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, nargs="?", default=Path("configs/demo.yaml"))
    parser.add_argument(
        "--epsilons", nargs="*", type=float, default=[1.0, 3.0, 8.0, math.inf], help="none: the timing alone"
    )
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--region", default=None, help="region timed (default: the config's first)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--runs-dir", type=Path, default=None, help="keep the run folders here (default: temporary)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from common.config import load_config

    cfg = load_config(args.config, args.overrides)
    problem = runs_dir_problem(args.runs_dir)
    if problem:
        parser.error(problem)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # absolute: the simulation reads a relative `policies` path from the config file's folder
        root = (args.runs_dir or Path(tmp)).resolve()
        for eps in args.epsilons:
            tag = eps_tag(eps)
            policies = dp_policies(cfg, root / f"policies-{tag}", eps, args.delta)
            summary = simulate_with_policies(
                args.config, root / f"run-{tag}", policies, args.overrides, list(cfg.regions)
            )
            overall = summary["overall"]
            served = overall.get("personalized", overall.get("federated", {}))
            spent = {r: b["dp"]["epsilon_spent"] for r, b in summary["regions"].items() if "dp" in b}
            rows.append(
                {
                    "epsilon": None if math.isinf(eps) else eps,
                    "global_macro_f1": overall.get("federated", {}).get("macro_f1"),
                    "served_macro_f1": served.get("macro_f1"),
                    "epsilon_spent_max": max(spent.values()) if spent else None,
                }
            )
        timing = _time_pair(cfg, args.region or cfg.regions[0].name, args.delta, args.repeats, root / "timing")

    print(f"{'epsilon':>8} {'global F1':>10} {'served F1':>10} {'max eps spent':>14}")
    for row in rows:
        eps = "inf" if row["epsilon"] is None else f"{row['epsilon']:g}"
        used = "-" if row["epsilon_spent_max"] is None else f"{row['epsilon_spent_max']:.3f}"
        print(f"{eps:>8} {row['global_macro_f1']:>10.4f} {row['served_macro_f1']:>10.4f} {used:>14}")
    print(
        f"time per training example: plain {timing['plain_s_per_example'] * 1e3:.2f} ms, "
        f"DP-SGD {timing['dp_s_per_example'] * 1e3:.2f} ms, ratio {timing['ratio']:.2f}x; per train message: "
        f"plain {timing['plain_s_per_message']:.1f} s, DP-SGD {timing['dp_s_per_message']:.1f} s, "
        f"ratio {timing['message_ratio']:.2f}x"
    )
    result = {"config": str(args.config), "delta": args.delta, "overrides": args.overrides}
    return write_result(args.json, {**result, "rows": rows, "timing": timing})


if __name__ == "__main__":
    raise SystemExit(main())
