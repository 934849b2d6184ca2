"""Benchmark of the membership-inference audit, in one of two ways.

On a finished run folder (default: runs/demo): per region and model, AUC and TPR at 1 % FPR of both attacks, and
the audit's wall and CPU time (target: ≤ 3 minutes on 2 cores).

    python -m benchmarks.bench_privacy [RUN_DIR] [--region R ...] [--references 1 2] [--bootstrap N]
                                       [--json FILE]

Reads the run folder only (nothing is written there): the same ``runfolder.privacy.audit_privacy`` as
``fedlocale audit privacy``. ``--references`` picks the earlier rounds used as reference models, to compare
reference sets by strength and cost.

As a scenario over epsilon (``--simulate CONFIG``): one ``fedlocale simulate`` of CONFIG per epsilon, every
region's policy given ``require_dp`` as ``benchmarks.bench_dp`` does (``inf``: none; with a personalization mode,
``personalize.dp`` is set under DP so that the served model is covered too), then the audit of each run; prints
per region, epsilon and model the AUC with its 95 % interval, the TPR at 1 % and 0.1 % FPR and the canaries'
exposure, and the wall time of each run.

    python -m benchmarks.bench_privacy --simulate CONFIG [--epsilons inf 8 1] [--delta 1e-5] [--runs-dir DIR]
                                       [--set KEY=VALUE ...] [--region R ...] [--bootstrap N] [--json FILE]

``benchmarks/configs/privacy-leak.yaml`` is such a scenario: a set-up that memorises on purpose, so that there
is a leak for DP to remove (docs/privacy.md, "Membership inference against epsilon").
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.bench_dp import dp_policies, eps_tag, runs_dir_problem, simulate_with_policies
from benchmarks.output import write_result
from deploy.env import apply_env

RESULTS = Path(__file__).parent / "results"
DEFAULT_RUN = Path("runs/demo")
DEFAULT_EPSILONS = (math.inf, 8.0, 1.0)
DEFAULT_DELTA = 1e-5
MODELS = ("global", "served", "update")  # runfolder.privacy's audited models, in the table's order
LOW_FPR, LOWEST_FPR = "0.01", "0.001"  # the audit's tpr_at_fpr keys


def main(argv: list[str] | None = None) -> int:
    """Run the audit (of a run folder, or of a scenario's runs per epsilon), print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, nargs="?", default=None, help=f"a finished run (default {DEFAULT_RUN})")
    parser.add_argument("--region", dest="regions", action="append", default=[])
    parser.add_argument("--references", type=int, nargs="+", default=None, metavar="ROUND")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=None, metavar="FILE")
    scenario = parser.add_argument_group("scenario over epsilon")
    scenario.add_argument("--simulate", type=Path, default=None, metavar="CONFIG", help="simulate CONFIG per epsilon")
    scenario.add_argument("--epsilons", nargs="+", type=float, default=None, help="default: inf 8 1")
    scenario.add_argument("--delta", type=float, default=None, help=f"default: {DEFAULT_DELTA:g}")
    scenario.add_argument("--runs-dir", type=Path, default=None, help="keep the run folders here (default: temporary)")
    scenario.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    problem = scenario_problem(args)
    if problem:
        parser.error(problem)
    apply_env()
    if args.simulate is not None:
        return run_scenario(args)
    return audit_run(args, args.run_dir or DEFAULT_RUN)


def scenario_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the combination of options, before anything runs (None: nothing)."""
    scenario_only = {
        "--epsilons": args.epsilons is not None,
        "--delta": args.delta is not None,
        "--runs-dir": args.runs_dir is not None,
        "--set": bool(args.overrides),
    }
    if args.simulate is None:
        given = [name for name, on in scenario_only.items() if on]
        return f"{', '.join(given)} only with --simulate CONFIG" if given else None
    if args.run_dir is not None:
        return "give a RUN_DIR to audit or --simulate CONFIG to make the runs, not both"
    if not args.simulate.is_file():
        return f"--simulate {args.simulate}: no such file"
    # `not eps > 0` also refuses NaN
    bad = [eps for eps in args.epsilons or () if not eps > 0]
    if bad:
        return f"--epsilons must be > 0 (inf: no DP), got {', '.join(map(str, bad))}"
    repeated = sorted({eps for eps in args.epsilons or () if list(args.epsilons).count(eps) > 1})
    if repeated:  # a second run of one epsilon would overwrite the first's run folder
        return f"--epsilons names {', '.join(map(str, repeated))} more than once"
    if args.delta is not None and not 0 < args.delta < 1:
        return f"--delta must be in (0, 1), got {args.delta}"
    problem = runs_dir_problem(args.runs_dir)
    if problem:
        return problem
    return None


def audit_run(args: argparse.Namespace, run_dir: Path) -> int:
    """The audit of one finished run folder: the table of both attacks and the reference sets' strength."""
    from runfolder.privacy import audit_privacy, region_table

    wall, cpu = time.perf_counter(), time.process_time()
    audit = audit_privacy(run_dir, args.regions, bootstrap=args.bootstrap, reference_rounds=args.references, say=print)
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
    out = args.json or RESULTS / f"bench_privacy-{run_dir.name}-refs-{refs}.json"
    return write_result(
        out,
        {
            "run_dir": str(run_dir),
            "wall_seconds": round(wall, 1),
            "cpu_seconds": round(cpu, 1),
            "privacy": section,
            "reference_strength": strength,
        },
    )


def scenario_overrides(overrides: Sequence[str], eps: float, personalize_mode: str) -> list[str]:
    """The ``--set`` overrides of the run at ``eps``: the user's, plus ``personalize.dp=true`` under DP when the
    run personalizes. Without it the served model of a DP region is the personalization's, trained again on the
    region's records without DP (docs/privacy.md): the audit would measure that, not epsilon."""
    if math.isinf(eps) or personalize_mode == "none":
        return list(overrides)
    return [*overrides, "personalize.dp=true"]


def run_scenario(args: argparse.Namespace) -> int:
    """One simulation and one audit per epsilon; the table; the JSON."""
    from common.config import load_config
    from common.runfiles import read_summary
    from runfolder.privacy import audit_privacy

    cfg = load_config(args.simulate, args.overrides)
    epsilons = args.epsilons or list(DEFAULT_EPSILONS)
    delta = args.delta if args.delta is not None else DEFAULT_DELTA
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        # absolute: the simulation reads a relative `policies` path from the config file's folder
        root = (args.runs_dir or Path(tmp)).resolve()
        for eps in epsilons:
            tag = eps_tag(eps)
            sets = scenario_overrides(args.overrides, eps, cfg.personalize.mode)
            policies = dp_policies(cfg, root / f"policies-{tag}", eps, delta)
            run_dir = root / f"run-{tag}"
            started = time.perf_counter()
            summary = simulate_with_policies(args.simulate, run_dir, policies, sets, list(cfg.regions))
            simulated = time.perf_counter() - started
            audit = audit_privacy(
                run_dir, args.regions, bootstrap=args.bootstrap, reference_rounds=args.references, say=print
            )
            audited = time.perf_counter() - started - simulated
            print(f"epsilon {tag}: simulate {simulated:.0f} s, audit {audited:.0f} s")
            runs.append(
                {
                    "epsilon": None if math.isinf(eps) else eps,
                    "overrides": sets,
                    "simulate_seconds": round(simulated, 1),
                    "audit_seconds": round(audited, 1),
                    # the global adapter audited is the best round's (by validation), not necessarily the last
                    "delivered_round": read_summary(run_dir).run.get("best_round"),
                    "quality": run_quality(summary),
                    "privacy": audit.to_json(),
                }
            )
    rows = scenario_rows(runs)
    print()
    for line in scenario_table(rows):
        print(line)
    print("\ntest macro-F1 of the global / personalized model and epsilon spent, per run and region")
    for line in quality_lines(runs):
        print(line)
    total = sum(r["simulate_seconds"] + r["audit_seconds"] for r in runs)
    print(f"\n{len(runs)} run(s): {total:.0f} s wall in all ({', '.join(run_times(runs))})")
    out = args.json or RESULTS / f"bench_privacy-{cfg.name}.json"
    result = {"config": str(args.simulate), "seed": cfg.seed, "delta": delta, "overrides": args.overrides}
    return write_result(out, {**result, "wall_seconds": round(total, 1), "runs": runs, "rows": rows})


def run_times(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each run's simulate + audit seconds, for the closing line."""
    return [
        f"eps {eps_tag(math.inf if r['epsilon'] is None else r['epsilon'])}: "
        f"{r['simulate_seconds']:.0f} + {r['audit_seconds']:.0f} s"
        for r in runs
    ]


def quality_lines(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each run's ``run_quality``, a line per region."""

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    return [
        f"  eps {eps_tag(math.inf if run['epsilon'] is None else run['epsilon']):>4}  {region:<15}"
        f"{number(q['global_macro_f1'])} / {number(q['personalized_macro_f1'])}  spent {number(q['epsilon_spent'])}"
        for run in runs
        for region, q in run["quality"].items()
    ]


def run_quality(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per region the test macro-F1 of the global and the personalized model and the epsilon spent: a model that
    learned nothing also leaks nothing, so the audit's numbers are read beside these."""
    out: dict[str, dict[str, Any]] = {}
    for region, block in summary["regions"].items():
        out[region] = {
            "global_macro_f1": (block.get("federated") or {}).get("macro_f1"),
            "personalized_macro_f1": (block.get("personalized") or {}).get("macro_f1"),
            "epsilon_spent": (block.get("dp") or {}).get("epsilon_spent"),
        }
    return out


def scenario_rows(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per region, epsilon, model and attack, from each run's ``privacy`` section (``PrivacyAudit.
    to_json``): AUC and interval, TPR at 1 % and 0.1 % FPR (None when the non-members cannot resolve it) and the
    model's canary exposure when the run had canaries."""
    rows = []
    for run in runs:
        for region, block in run["privacy"]["regions"].items():
            for model in [m for m in MODELS if m in block["models"]] + sorted(set(block["models"]) - set(MODELS)):
                canaries = (block.get("canaries") or {}).get(model) or {}
                for attack, result in block["models"][model].items():
                    rows.append(
                        {
                            "region": region,
                            "epsilon": run["epsilon"],
                            "model": model,
                            "served": block.get("served"),
                            "attack": attack,
                            "members": block["members"],
                            "nonmembers": block["nonmembers"],
                            "auc": result["auc"],
                            "auc_ci95": result["auc_ci95"],
                            "tpr_at_1pct_fpr": result["tpr_at_fpr"].get(LOW_FPR),
                            "tpr_at_0.1pct_fpr": result["tpr_at_fpr"].get(LOWEST_FPR),
                            "canary_mean_exposure": canaries.get("mean_exposure"),
                            "canary_max_exposure": canaries.get("max_exposure"),
                            "canaries_ranked_first": canaries.get("ranked_first"),
                            "canaries": canaries.get("canaries"),
                        }
                    )
    return sorted(
        rows,
        key=lambda r: (
            r["region"],
            -(r["epsilon"] or math.inf),
            MODELS.index(r["model"]) if r["model"] in MODELS else len(MODELS),
            r["attack"],
        ),
    )


def rate_text(rate: float | None, nonmembers: int, fpr: float) -> str:
    """A TPR for the table; a rate the non-members cannot resolve says why (``client.membership.resolvable``)."""
    if rate is not None:
        return f"{rate:.3f}"
    need = math.ceil(1 / fpr)
    return f"n/a ({nonmembers}<{need})" if nonmembers < need else "n/a"


def scenario_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The printed table: one line per row of ``scenario_rows``."""
    lines = [
        f"{'region':<15}{'eps':>4} {'model':<8}{'attack':<10}{'AUC [95 %]':<22}{'TPR@1%':>7}{'TPR@0.1%':>16}"
        f"  canary exposure mean/max (first)"
    ]
    for r in rows:
        eps = eps_tag(math.inf if r["epsilon"] is None else r["epsilon"])
        low, high = r["auc_ci95"] or (None, None)
        bounds = "[n/a]" if low is None or high is None else f"[{low:.2f}, {high:.2f}]"  # a bootstrap NaN
        interval = f"{r['auc']:.3f} {bounds}" if r["auc"] is not None else "n/a"
        exposure = (
            f"{r['canary_mean_exposure']:.2f}/{r['canary_max_exposure']:.2f} "
            f"({r['canaries_ranked_first']}/{r['canaries']})"
            if r["canaries"]
            else "-"
        )
        lines.append(
            f"{r['region']:<15}{eps:>4} {r['model']:<8}{r['attack']:<10}{interval:<22}"
            f"{rate_text(r['tpr_at_1pct_fpr'], r['nonmembers'], 0.01):>7}"
            f"  {rate_text(r['tpr_at_0.1pct_fpr'], r['nonmembers'], 0.001):>14}  {exposure}"
        )
    return lines


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
