"""Benchmark of personalization on a config (default: the demo): per region, the federated (global) model, the
model each region serves after personalization, local-only and centralized, with the A/B intervals, checked
against the localization targets — on several seeds, because one draw of these small regions decides nothing.

    python -m benchmarks.bench_personalize [CONFIG] [--seeds 0 1 2] [--modes dual probe] [--set KEY=VALUE ...]
                                            [--out DIR] [--json FILE] [--reuse]
    python -m benchmarks.bench_personalize --combine RESULTS.json ... --json FILE

Per seed: one simulation (federated rounds, baselines, personalization with the first mode), then every other
mode personalizes the same global adapter. The targets are checked per seed and on the mean over seeds.

``--reuse`` runs no simulation: every mode personalizes the runs an earlier benchmark left in ``--out`` again
(with the config and ``--set`` given now, e.g. another ``personalize.start``) and is compared with the
federated, local-only and centralized scores those runs recorded. The A/B against local-only needs the
local-only predictions, which are not kept, so it is missing from such results.

``--combine`` runs nothing: it prints the mean tables over all seeds of earlier results files and writes them
as one.

Targets: personalized >= local-only and >= federated macro-F1 in every region; personalized overall >=
centralized overall; personalization costs <= 1 local epoch per region and sends nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from statistics import fmean as mean
from typing import TYPE_CHECKING, Any

from benchmarks.output import write_result
from deploy.env import apply_env

if TYPE_CHECKING:
    import numpy as np

    from common.config import RunConfig
    from common.data import RegionData

FEDERATED = "federated"
MODES = (FEDERATED, "personalized", "local_only", "centralized")
# personalize.lr (used by the local mode) chosen on the demo by mean validation macro-F1
DEFAULTS = (
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


def compare_choices(summaries: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per region, the mean test macro-F1 it would serve under each ``personalize.choice`` rule, read from the
    validation evidence each seed recorded (``val_ab``), and on how many seeds the rules chose differently."""
    from client.personalize import Difference, keeps_global
    from common.config import CHOICE_RULES

    out: dict[str, dict[str, float]] = {}
    for name in summaries[0]["regions"]:
        rows = [s["regions"][name] for s in summaries]
        served: dict[str, list[float]] = {rule: [] for rule in CHOICE_RULES}
        differ = 0
        for row in rows:
            entry = row["personalized"]
            if "val_ab" not in entry and entry.get("val_macro_f1"):
                # a summary from before personalize.choice: its choice cannot be replayed
                raise ValueError(f"region {name}: its personalized entry has val_macro_f1 but no val_ab evidence")
            evidence = Difference(**entry["val_ab"]) if "val_ab" in entry else None  # None: no validation split
            kept = {rule: evidence is not None and keeps_global(evidence, rule) for rule in CHOICE_RULES}
            differ += len(set(kept.values())) > 1
            for rule in CHOICE_RULES:
                served[rule].append(
                    row[FEDERATED]["macro_f1"] if kept[rule] else entry["personalized_test"]["macro_f1"]
                )
        out[name] = {**{rule: mean(v) for rule, v in served.items()}, "seeds_differing": differ}
    return out


def mean_summary(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """A summary-shaped mean over seeds: each mode's macro-F1 per region and overall (what ``check_targets``
    reads), the personalization cost taken as the worst seed's."""
    first = summaries[0]
    regions: dict[str, Any] = {}
    for name in first["regions"]:
        rows = [s["regions"][name] for s in summaries]
        regions[name] = {m: {"macro_f1": mean([r[m]["macro_f1"] for r in rows])} for m in MODES if m in rows[0]}
        per = [r["personalized"] for r in rows]
        regions[name]["personalized"].update(
            chosen=f"{sum(p['chosen'] == 'personalized' for p in per)}/{len(per)} P",
            epochs=max(p["epochs"] for p in per),
            bytes_sent=sum(p["bytes_sent"] for p in per),
            ab={},
        )
    overall = {m: {"macro_f1": mean([s["overall"][m]["macro_f1"] for s in summaries])} for m in first["overall"]}
    return {"regions": regions, "overall": overall}


def with_mode(summary: dict[str, Any], entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``summary`` with another mode's personalization entries in place of its own."""
    from common.runfiles import Summary
    from runfolder.summary import with_personalized

    return with_personalized(Summary.from_json(summary), entries).to_json()


def personalize_again(
    cfg: RunConfig,
    run_dir: Path,
    data: Mapping[str, RegionData],
    local_only: Mapping[str, np.ndarray] | None,
) -> dict[str, Any]:
    """Personalize ``run_dir``'s global adapter as ``cfg.personalize`` says, writing into RUN_DIR/modes/MODE/ so
    that the run's own personalized adapters stay as the simulation wrote them."""
    from common.runfiles import ADAPTER_DIR, CHECKPOINTS_DIR, FEDERATION_FILE, SIMULATED_PERSONAL_DIR, STATE_FILE
    from simulations.personalize import personalize_run

    target = run_dir / "modes" / cfg.personalize.mode
    target.mkdir(parents=True, exist_ok=True)
    # the global adapter, the rounds' records and checkpoints, and a dual run's state and personal LoRAs
    for name in (ADAPTER_DIR, FEDERATION_FILE, CHECKPOINTS_DIR, STATE_FILE, SIMULATED_PERSONAL_DIR):
        link, source = target / name, (run_dir / name).resolve()
        if link.is_symlink() and link.resolve() != source:
            link.unlink()  # a link left by an earlier benchmark's run folder of the same name
        if not link.is_symlink() and source.exists():
            link.symlink_to(source)
    return personalize_run(cfg, target, data, local_only, say)


def summarize(per_mode: Mapping[str, list[dict[str, Any]]], seeds: list[int]) -> dict[str, Any]:
    """Print each mode's mean table and choice-rule comparison over ``seeds``; return them for the JSON."""
    result: dict[str, Any] = {}
    for mode, summaries in per_mode.items():
        averaged = mean_summary(summaries)
        targets = check_targets(averaged)
        print(f"\n== mean over seeds {seeds}, personalize.mode={mode} ==")
        print_table(averaged, targets)
        print("\nmean test macro-F1 served under each personalize.choice (from the recorded validation evidence):")
        for name, row in compare_choices(summaries).items():
            print(
                f"{name:<16}"
                + "".join(f"{k} {v:.3f}  " for k, v in row.items() if k != "seeds_differing")
                + f"(differ on {row['seeds_differing']:.0f} seeds)"
            )
        result[mode] = {
            "mean": targets,
            "per_seed": [
                {
                    "seed": seed,
                    "targets": check_targets(s),
                    "personalized": {n: r["personalized"] for n, r in s["regions"].items()},
                    "timing": s["timing"],
                }
                for seed, s in zip(seeds, summaries, strict=True)
            ],
            # what each region would serve under each choice rule (the run used cfg.personalize.choice)
            "choice_rules": compare_choices(summaries),
            "seeds_meeting": {
                key: sum(bool(check_targets(s)[key]) for s in summaries)
                for key in (
                    "personalized_ge_local_only_every_region",
                    "personalized_ge_federated_every_region",
                    "personalized_overall_ge_centralized",
                )
            },
        }
    return result


def combined(paths: list[Path]) -> tuple[list[int], dict[str, list[dict[str, Any]]]]:
    """The seeds and per-seed summaries (the part of them the tables read) of earlier results files, joined: the
    modes all of them have; a seed in two files is an error."""
    results = [json.loads(path.read_text()) for path in paths]
    first = results[0]
    for path, r in zip(paths[1:], results[1:], strict=True):
        # files written before "personalize" was recorded say it in their name only: compare what both have
        for key in (k for k in ("config", "overrides", "personalize") if k in r and k in first):
            if r[key] != first[key]:
                raise SystemExit(f"--combine: {path} differs from {paths[0]} in {key}: {r[key]} vs {first[key]}")
    modes = [m for m, v in first.items() if isinstance(v, dict) and "per_seed" in v and all(m in r for r in results)]
    seeds = [seed for r in results for seed in r["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--combine: a seed is in more than one file: {seeds}")
    per_mode: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for mode in modes:
        for row in (row for r in results for row in r[mode]["per_seed"]):
            f1, overall = row["targets"]["macro_f1"], row["targets"]["overall_macro_f1"]
            regions = {
                name: {
                    **{m: {"macro_f1": v} for m, v in scores.items() if m != "personalized"},
                    "personalized": row["personalized"][name],
                }
                for name, scores in f1.items()
            }
            overall_modes = {m: {"macro_f1": v} for m, v in overall.items()}
            per_mode[mode].append({"regions": regions, "overall": overall_modes, "timing": row["timing"]})
    return seeds, per_mode


def saved_summary(run_dir: Path, seed: int) -> dict[str, Any]:
    """The summary an earlier benchmark's simulation wrote in ``run_dir`` for ``seed``."""
    from common.runfiles import SUMMARY_FILE, read_summary

    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        raise SystemExit(f"--reuse: {path} does not exist (run the benchmark without --reuse first)")
    summary = read_summary(run_dir).to_json()
    if summary["run"]["seed"] != seed:
        raise SystemExit(f"--reuse: {path} is a run of seed {summary['run']['seed']}, not {seed}")
    return summary


def say(message: str) -> None:
    """Progress goes to stderr; the tables to stdout."""
    print(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the simulation on each seed with personalization and baselines; print and write the results."""
    apply_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, nargs="?", default=Path("configs/demo.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["dual", "probe"], help="personalize.mode values to compare")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_personalize"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/bench_personalize-demo.json"))
    parser.add_argument("--reuse", action="store_true", help="personalize the runs in --out again; no simulation")
    parser.add_argument(
        "--combine", type=Path, nargs="+", help="no runs: the tables over the seeds of earlier results files"
    )
    args = parser.parse_args(argv)
    if args.combine:
        seeds, joined = combined(args.combine)
        out = {"combined": [str(p) for p in args.combine], "seeds": seeds, **summarize(joined, seeds)}
        return write_result(args.json, out)
    if "dual" in args.modes[1:] and not args.reuse:
        # dual trains during the rounds: only the first mode's simulation can have it
        parser.error(f"--modes: dual must come first (it trains in the rounds), got {' '.join(args.modes)}")

    from common.config import load_config
    from simulations.runner import load_all, simulate

    per_mode: dict[str, list[dict[str, Any]]] = {mode: [] for mode in args.modes}
    for seed in args.seeds:
        overrides = [*DEFAULTS, f"seed={seed}", f"personalize.mode={args.modes[0]}", *args.overrides]
        cfg = load_config(args.config, overrides)
        run_dir = args.out / f"seed-{seed}"
        local_only: dict[str, Any] = {}
        if args.reuse:
            summary = saved_summary(run_dir, seed)
        else:
            summary = simulate(
                cfg, run_dir, config_path=str(args.config), say=say, local_predictions=local_only, overwrite=True
            ).to_json()
            per_mode[args.modes[0]].append(summary)
        data = load_all(cfg, say)
        for mode in args.modes if args.reuse else args.modes[1:]:
            other = dataclasses.replace(cfg, personalize=dataclasses.replace(cfg.personalize, mode=mode))
            entries = personalize_again(other, run_dir, data, local_only or None)
            per_mode[mode].append(with_mode(summary, entries))
        for mode, summaries in per_mode.items():
            print(f"\n== seed {seed}, personalize.mode={mode} ==")
            print_table(summaries[-1], check_targets(summaries[-1]))
    result: dict[str, Any] = {
        "config": str(args.config),
        "seeds": args.seeds,
        "overrides": [*DEFAULTS, *args.overrides],
        "reused_runs": args.reuse,
        "personalize": dataclasses.asdict(cfg.personalize),  # --seeds takes one or more, so cfg is set
        **summarize(per_mode, args.seeds),
    }
    return write_result(args.json, result)


if __name__ == "__main__":
    sys.exit(main())
