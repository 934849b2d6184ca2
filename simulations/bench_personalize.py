"""Benchmark of personalization on a config (default: the demo): per region, the federated (global) model, the
model each region serves after personalization, local-only and centralized, with the A/B intervals, checked
against the localization targets.

    python -m simulations.bench_personalize [CONFIG] [--set KEY=VALUE ...] [--out DIR] [--json FILE]

Targets: personalized >= local-only and >= federated macro-F1 in every region; personalized overall >=
centralized overall; personalization costs <= 1 local epoch per region and sends nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from simulations.env import apply_env

MODES = ("federated", "personalized", "local_only", "centralized")
# chosen on the demo by mean validation macro-F1 of the personalized models (README, Personalization and A/B)
DEFAULTS = (
    "personalize.mode=local",
    "personalize.lr=5e-3",
    "personalize.epochs=1",
    "baselines=[centralized, local_only]",
)


def check_targets(summary: dict[str, Any]) -> dict[str, Any]:
    """Each target of the localization issue, with the numbers it was decided on."""
    regions = summary["regions"]
    f1 = {name: {m: r[m]["macro_f1"] for m in MODES if m in r} for name, r in regions.items()}
    overall = {m: summary["overall"][m]["macro_f1"] for m in MODES if m in summary["overall"]}
    per = [r["personalized"] for r in regions.values()]
    return {
        "personalized_ge_local_only_every_region": all(v["personalized"] >= v["local_only"] for v in f1.values()),
        "personalized_ge_federated_every_region": all(v["personalized"] >= v["federated"] for v in f1.values()),
        "personalized_overall_ge_centralized": overall["personalized"] >= overall["centralized"],
        "max_personalize_epochs": max(p["epochs"] for p in per),
        "bytes_sent_by_personalization": sum(p["bytes_sent"] for p in per),
        "macro_f1": f1,
        "overall_macro_f1": overall,
    }


def print_table(summary: dict[str, Any], targets: dict[str, Any]) -> None:
    """Per-region macro-F1 of every mode, what each region serves, and the A/B intervals."""
    print(
        f"{'region':<16}" + "".join(f"{m:>14}" for m in MODES) + f"{'serves':>14}   personalized - local-only [95% CI]"
    )
    for name, row in summary["regions"].items():
        p = row["personalized"]
        ab = p["ab"].get("vs_local_only")
        ci = f"{ab['diff']:+.3f} [{ab['low']:+.3f}, {ab['high']:+.3f}]" if ab else "n/a"
        cells = "".join(f"{row[m]['macro_f1']:>14.3f}" if m in row else f"{'-':>14}" for m in MODES)
        print(f"{name:<16}{cells}{p['chosen']:>14}   {ci}")
    overall = summary["overall"]
    print(
        f"{'OVERALL':<16}"
        + "".join(f"{overall[m]['macro_f1']:>14.3f}" if m in overall else f"{'-':>14}" for m in MODES)
    )
    print()
    for key, value in targets.items():
        if not isinstance(value, dict):
            print(f"{key:<46}{value}")


def main(argv: list[str] | None = None) -> int:
    """Run the simulation with personalization and baselines; print and write the results."""
    apply_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, nargs="?", default=Path("configs/demo.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_personalize"))
    parser.add_argument("--json", type=Path, default=Path("simulations/results/bench_personalize-demo.json"))
    args = parser.parse_args(argv)

    from common.config import load_config
    from simulations.runner import simulate

    overrides = [*DEFAULTS, *args.overrides]
    cfg = load_config(args.config, overrides)
    summary = simulate(cfg, args.out, config_path=str(args.config), say=lambda m: print(m, file=sys.stderr))
    targets = check_targets(summary)
    print_table(summary, targets)
    result = {
        "config": str(args.config),
        "overrides": overrides,
        "targets": targets,
        "personalized": {n: r["personalized"] for n, r in summary["regions"].items()},
        "timing": summary["timing"],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
