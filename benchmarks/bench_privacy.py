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
    refs = "-".join(str(r) for r in args.references) if args.references else "earlier"
    out = args.json or RESULTS / f"bench_privacy-{args.run_dir.name}-refs-{refs}.json"
    return write_result(
        out,
        {
            "run_dir": str(args.run_dir),
            "wall_seconds": round(wall, 1),
            "cpu_seconds": round(cpu, 1),
            "privacy": section,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
