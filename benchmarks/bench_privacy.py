"""Benchmark of the membership-inference audit on a finished run folder (default: runs/demo): per region and model,
AUC and TPR at 1 % FPR of both attacks, and the audit's wall and CPU time (target: ≤ 3 minutes on 2 cores).

    python -m benchmarks.bench_privacy [RUN_DIR] [--region R ...] [--references 1 2] [--bootstrap N]
                                       [--json FILE]

Reads the run folder only (nothing is written there): the same ``runfolder.privacy.audit_privacy`` as
``fedlocale audit privacy``. ``--references`` picks the earlier rounds used as reference models, to compare
reference sets by strength and cost.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.output import write_result
from deploy.env import apply_env

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    """Run the audit, print the table, write the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, nargs="?", default=Path("runs/demo"))
    parser.add_argument("--region", dest="regions", action="append", default=[])
    parser.add_argument("--references", type=int, nargs="+", default=None, metavar="ROUND")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=None, metavar="FILE")
    args = parser.parse_args(argv)
    apply_env()
    from runfolder.privacy import audit_privacy, region_table

    wall, cpu = time.perf_counter(), time.process_time()
    audit = audit_privacy(
        args.run_dir, args.regions, bootstrap=args.bootstrap, reference_rounds=args.references, say=print
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    section = audit.to_json()
    rows = region_table(section)
    print(f"\n{'region':<16}{'model':<9}{'attack':<11}{'AUC':>7}{'TPR@1%FPR':>11}")
    for region, model, attack, auc, tpr in rows:
        tpr_text = "n/a" if tpr is None else f"{tpr:.3f}"
        print(f"{region:<16}{model:<9}{attack:<11}{auc:>7.3f}{tpr_text:>11}")
    print(f"\naudit of {len(audit.regions)} region(s): {wall:.0f} s wall, {cpu:.0f} s CPU (this process)")
    strength = reference_strength(audit)
    if strength:
        print("\nreference attack AUC by reference set (same scores; each reference costs one pass over the records)")
        for subset, by_region in strength.items():
            print(
                f"  rounds {subset:<8}"
                + "  ".join(f"{r} {m}: {a:.3f}" for r, row in by_region.items() for m, a in row.items())
            )
    refs = "-".join(str(r) for r in args.references) if args.references else "earlier"
    out = args.json or RESULTS / f"bench_privacy-{args.run_dir.name}-refs-{refs}.json"
    return write_result(
        out,
        {
            "run_dir": str(args.run_dir),
            "wall_seconds": round(wall, 1),
            "cpu_seconds": round(cpu, 1),
            "privacy": section,
            "reference_strength": strength,
        },
    )


def reference_strength(audit: Any) -> dict[str, dict[str, dict[str, float]]]:
    """The reference attack's AUC per region and model with each single reference and with all of them, from the
    scores the audit computed (no model runs again): how much each extra reference model buys."""
    from client.membership import REFERENCE, audit_scored

    out: dict[str, dict[str, dict[str, float]]] = {}
    rounds = [ref.rsplit("-", 1)[-1].lstrip("0") for ref in audit.references]
    for region, (targets, refs) in audit.scores.items():
        subsets = {str(r): [i] for i, r in enumerate(rounds)} | {"+".join(rounds): list(range(len(rounds)))}
        for label, picks in subsets.items():
            result = audit_scored(region, targets, [refs[i] for i in picks], bootstrap=0, seed=0)
            out.setdefault(label, {})[region] = {
                model: round(attacks[REFERENCE].auc, 4) for model, attacks in result.results.items()
            }
    return out


if __name__ == "__main__":
    sys.exit(main())
