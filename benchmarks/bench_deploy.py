"""Benchmark: per-round wall time of a real deployment (SuperLink + one SuperNode per region, TLS, node auth)
against the in-process simulation of the same run config, measured in one go on this machine.

    python -m benchmarks.bench_deploy [CONFIG] [--set KEY=VALUE ...] [--out DIR] [--json FILE]

Default: the demo config with 2 rounds and no baselines. Prints a table and writes JSON: seconds per round in
each, their ratio, the whole run's wall time, and whether the two runs' global adapters agree (max |diff|).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from benchmarks.output import write_result
from common.runfiles import ADAPTER_DIR, FEDERATION_FILE
from deploy.env import apply_env

DEFAULT_OVERRIDES = ("rounds=2", "baselines=[]")


def _max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x = load_file(str(a / ADAPTER_DIR / "adapter_model.safetensors"))
    y = load_file(str(b / ADAPTER_DIR / "adapter_model.safetensors"))
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def run_simulation(cfg: Any, out: Path) -> float:
    """The in-process simulation (Ray) of ``cfg``; returns its wall time."""
    from simulations.runner import simulate

    started = time.perf_counter()
    simulate(cfg, out, say=lambda _: None, overwrite=True)
    return time.perf_counter() - started


def run_deployment(cfg_file: Path, cfg: Any, work: Path) -> float:
    """The same run on real Flower processes on 127.0.0.1; returns the wall time of ``flwr run``."""
    from deploy.config import DeployConfig, NodeEntry
    from deploy.launch import Cluster
    from deploy.plan import create_credentials, layout

    threads = cfg.train.threads or 1
    deploy = DeployConfig(
        run=cfg_file,
        workdir=work,
        nodes=tuple(NodeEntry(region=r.name, threads=threads) for r in cfg.regions),
        connection="bench",
    )
    lay = layout(deploy, cfg)
    create_credentials(lay, now=datetime.now(UTC), force=True)
    with Cluster(lay, bin_dir=Path(sys.executable).parent) as cluster:
        cluster.start_all()
        outcome = cluster.run(timeout=7200)
    if outcome.returncode != 0:
        raise RuntimeError(f"flwr run failed; see {outcome.log}")
    return outcome.seconds


def main(argv: list[str] | None = None) -> int:
    """Run both, print the table, write the JSON."""
    apply_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, nargs="?", default=Path("configs/demo.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_deploy"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/bench_deploy.json"))
    args = parser.parse_args(argv)

    from common.config import load_config
    from simulations.runner import config_dict

    cfg = load_config(args.config, [*DEFAULT_OVERRIDES, *args.overrides])
    args.out.mkdir(parents=True, exist_ok=True)
    cfg_file = (args.out / "run.yaml").resolve()  # the resolved config, so the ServerApp runs exactly this
    cfg_file.write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))
    cfg = load_config(cfg_file)

    sim_s = run_simulation(cfg, args.out / "simulation")
    dep_s = run_deployment(cfg_file, cfg, (args.out / "deployment").resolve())
    sim_rounds = json.loads((args.out / "simulation" / FEDERATION_FILE).read_text())["rounds"]
    dep_rounds = json.loads((args.out / "deployment" / "out" / FEDERATION_FILE).read_text())["rounds"]
    rows = [
        {"round": s["round"], "simulation_s": s["seconds"], "deployment_s": d["seconds"]}
        for s, d in zip(sim_rounds, dep_rounds, strict=True)
    ]
    result = {
        "config": str(args.config),
        "overrides": [*DEFAULT_OVERRIDES, *args.overrides],
        "regions": list(cfg.region_names),
        "rounds": rows,
        "mean_round_ratio": sum(r["deployment_s"] for r in rows) / sum(r["simulation_s"] for r in rows),
        "simulation_total_s": sim_s,
        "deployment_total_s": dep_s,
        "adapter_max_abs_diff": _max_diff(args.out / "simulation", args.out / "deployment" / "out"),
    }
    print(f"{'round':>5}{'simulation s':>15}{'deployment s':>15}{'ratio':>8}")
    for r in rows:
        ratio = r["deployment_s"] / r["simulation_s"]
        print(f"{r['round']:>5}{r['simulation_s']:>15.1f}{r['deployment_s']:>15.1f}{ratio:>8.2f}")
    print(f"{'all':>5}{sim_s:>15.1f}{dep_s:>15.1f}{dep_s / sim_s:>8.2f}   (whole run incl. start-up and test)")
    print(f"global adapter max |deployment - simulation| = {result['adapter_max_abs_diff']:.2e}")
    return write_result(args.json, result)


if __name__ == "__main__":
    sys.exit(main())
