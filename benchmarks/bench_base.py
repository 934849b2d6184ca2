"""Benchmark of the base model on a config (default: the demo): the same runs on each base, side by side.

    python -m benchmarks.bench_base [CONFIG] [--bases minilm me5-small] [--seeds 0 1 2] [--set KEY=VALUE ...]
                                     [--out DIR] [--json FILE]
    python -m benchmarks.bench_base --speed [--repeats N] [--json FILE]
    python -m benchmarks.bench_base --grouping [REGION ...] [--seeds 0 1 2] [--json FILE]
    python -m benchmarks.bench_base --layers 6 4 [--repeats N] [--examples N] [--threads N] [--json FILE]

Per base and seed: one simulation with both baselines and ``dual`` personalization (``benchmarks.bench_personalize``
does the runs; its per-base results go next to ``--json``). Printed and written: per region and overall, the mean
test macro-F1 over the seeds of federated (global), centralized, local-only and the model each region serves;
the whole run's time and its phases (federation, each baseline, personalization), as a ratio to the first base.

``--grouping [REGION ...]`` runs no simulation: per seed, the centralized baseline (and local-only in the regions
named) trained with ``train.length_window`` 1 and 8 on the same data, their test macro-F1 paired.

``--speed`` runs no simulation: on the demo's pooled training data and the multilingual base, the paired cost of
what the speed-ups changed, as ratios within one run: one training pass with ``train.length_window`` 1 (plain
shuffled batches) and 8 (the default), interleaved over ``--repeats``; and the model + tokenizer build that every
message pays.

``--layers N ...`` runs no simulation: the paired cost of ``lora.layers`` (LoRA in the last N layers only) against
LoRA in every layer, on the demo's pooled data and the multilingual base: a training pass over the first
``--examples`` training examples and a validation pass over every validation text, per setting, the order rotated
per repeat, at ``--threads`` torch threads (1: as the demo's nodes and baselines train).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.output import write_result
from deploy.env import apply_env

DEFAULT_JSON = Path("benchmarks/results/bench_base-demo.json")
MODES = ("federated", "centralized", "local_only", "personalized")
# federated_s is the whole simulation (Ray start, rounds, final test); federation_loop_s its rounds alone
PHASES = ("federated_s", "federation_loop_s", "centralized_s", "local_only_s", "personalize_s", "total_s")
_SUMMED = ("federated_s", "centralized_s", "local_only_s", "personalize_s")


def _served(region: dict[str, Any]) -> float:
    return float(region["personalized"]["macro_f1"])


def compare(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per base: mean macro-F1 per region and mode, and mean phase seconds; from bench_personalize results."""
    out: dict[str, Any] = {}
    for base, result in results.items():
        seeds = result["dual"]["per_seed"]
        f1 = result["dual"]["mean"]["macro_f1"]
        overall = result["dual"]["mean"]["overall_macro_f1"]
        timing = {phase: statistics.fmean(s["timing"].get(phase, 0.0) for s in seeds) for phase in PHASES[:-1]}
        timing["total_s"] = sum(timing[phase] for phase in _SUMMED)
        out[base] = {"seeds": result["seeds"], "macro_f1": f1, "overall_macro_f1": overall, "timing_s": timing}
    first = next(iter(out.values()))["timing_s"]
    for entry in out.values():
        entry["time_over_first_base"] = {
            phase: (entry["timing_s"][phase] / first[phase]) if first[phase] else None for phase in PHASES
        }
    return out


def print_comparison(table: dict[str, Any]) -> None:
    """One block per base: regions × modes, then the phase times."""
    for base, entry in table.items():
        print(f"\n== base {base}: mean test macro-F1 over seeds {entry['seeds']} ==")
        print(f"{'region':<16}" + "".join(f"{m:>14}" for m in MODES))
        rows = [*entry["macro_f1"].items(), ("OVERALL", entry["overall_macro_f1"])]
        for name, row in rows:
            print(f"{name:<16}" + "".join(f"{row[m]:>14.3f}" if m in row else f"{'-':>14}" for m in MODES))
    print(f"\n{'mean seconds per run':<22}" + "".join(f"{base:>22}" for base in table))
    for phase in PHASES:
        cells = []
        for entry in table.values():
            ratio = entry["time_over_first_base"][phase]
            cells.append(f"{entry['timing_s'][phase]:>12.0f}" + (f" (×{ratio:.2f})" if ratio else " " * 8).rjust(10))
        print(f"{phase:<22}" + "".join(cells))


def run_bases(args: argparse.Namespace) -> dict[str, Any]:
    """bench_personalize per base (dual personalization, both baselines); the per-base results beside --json."""
    from benchmarks import bench_personalize

    results: dict[str, dict[str, Any]] = {}
    for base in args.bases:
        path = args.json.with_name(f"{args.json.stem}-{base}.json")
        argv = [str(args.config), "--modes", "dual", "--seeds", *map(str, args.seeds), "--json", str(path)]
        argv += ["--out", str(args.out / base), "--set", f"model.base={base}"]
        for override in args.overrides:
            argv += ["--set", override]
        bench_personalize.main(argv)
        results[base] = json.loads(path.read_text())
    return {"config": str(args.config), "overrides": args.overrides, "bases": compare(results)}


def speed(repeats: int) -> dict[str, Any]:
    """Paired costs on the multilingual base: a training pass with and without length grouping, and a build."""
    import torch

    from client.tokens import encode_examples
    from client.train import train_encoded
    from common.config import LoraSettings, ModelSettings, TrainSettings, load_config
    from common.model import build_model
    from simulations.runner import load_all

    cfg = load_config(Path("configs/demo.yaml"), ["model.base=me5-small"])
    data = load_all(cfg, lambda _: None)
    examples = [ex for region in data.values() for ex in region.train]
    settings = ModelSettings(base="me5-small", max_length=cfg.model.max_length)
    builds: list[float] = []
    passes: dict[int, list[float]] = {1: [], 8: []}
    for repeat in range(repeats):
        for window in (1, 8) if repeat % 2 == 0 else (8, 1):  # alternate the order so drift in load cancels
            started = time.perf_counter()
            loaded = build_model(settings, LoraSettings(r=cfg.lora.r, alpha=cfg.lora.alpha), cfg.labels, seed=0)
            builds.append(time.perf_counter() - started)
            encoded = encode_examples(loaded.tokenizer, examples, cfg.model.max_length)
            train = TrainSettings(lr=cfg.train.lr, batch_size=cfg.train.batch_size, length_window=window)
            started = time.perf_counter()
            pad_id = loaded.tokenizer.pad_token_id
            train_encoded(loaded.model, encoded.ids, encoded.labels, train, pad_id=pad_id, seed=0)
            passes[window].append(time.perf_counter() - started)
            print(f"repeat {repeat}: length_window {window}: pass {passes[window][-1]:.1f} s", file=sys.stderr)
    ratios = [g / p for g, p in zip(passes[8], passes[1], strict=True)]
    pass_s = {f"length_window={w}": statistics.median(v) for w, v in passes.items()}
    result = {
        "examples": len(examples),
        "threads": torch.get_num_threads(),
        "pass_s": pass_s,
        "grouped_over_plain": statistics.median(ratios),
        "build_s": statistics.median(builds),
        "repeats": repeats,
    }
    print(f"one pass over {len(examples)} training examples (median of {repeats}):")
    for key, value in pass_s.items():
        print(f"  {key:<18}{value:>8.1f} s")
    print(f"  grouped / plain   {result['grouped_over_plain']:>8.2f}  (paired per repeat)")
    print(f"model + tokenizer build, per message: {result['build_s']:.2f} s")
    return result


def grouping(config: Path, seeds: list[int], overrides: list[str], regions: list[str]) -> dict[str, Any]:
    """Quality with plain (1) and length-grouped (8) batches, paired per seed: the centralized baseline, where
    grouping makes batches more often one region's, and local-only in ``regions``, where it makes them more
    often one label's. Test macro-F1 (centralized: test-size weighted over the regions) and seconds."""
    from common.config import load_config
    from simulations.baselines import run_centralized, run_local_only
    from simulations.runner import load_all

    rows: list[dict[str, Any]] = []
    for seed in seeds:
        cfg = load_config(config, [f"seed={seed}", *overrides])
        data = load_all(cfg, lambda _: None)
        sizes = {name: len(region.test) for name, region in data.items()}
        for window in (1, 8):
            run = load_config(config, [f"seed={seed}", *overrides, f"train.length_window={window}"])
            scores, seconds = run_centralized(run, data)
            overall = sum(scores[r]["macro_f1"] * n for r, n in sizes.items()) / sum(sizes.values())
            row = {"seed": seed, "length_window": window, "centralized": overall, "centralized_s": seconds}
            local, _ = run_local_only(run, {r: data[r] for r in regions}, lambda _: None)
            row.update({f"local_only/{r}": local[r]["macro_f1"] for r in regions})
            rows.append(row)
            print(
                f"seed {seed} length_window {window}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k not in ("seed", "length_window")),
                file=sys.stderr,
            )
    keys = [k for k in rows[0] if k not in ("seed", "length_window")]
    diffs = {k: [b[k] - a[k] for a, b in zip(rows[::2], rows[1::2], strict=True)] for k in keys}
    print(f"{'grouped - plain, per seed ' + str(seeds):<40}{'mean':>8}")
    for key, values in diffs.items():
        print(f"{key:<24}" + "".join(f"{v:>+8.3f}" for v in values) + f"{statistics.fmean(values):>+8.3f}")
    return {"seeds": seeds, "overrides": overrides, "runs": rows, "grouped_minus_plain": diffs}


def layers_speed(counts: list[int], repeats: int, limit: int, threads: int) -> dict[str, Any]:
    """Paired seconds of a training pass and a validation pass with LoRA in every layer and in the last N."""
    import dataclasses

    import torch

    from client.tokens import encode_examples
    from client.train import predict_proba_encoded, train_encoded
    from common.config import ModelSettings, TrainSettings, load_config
    from common.model import build_model
    from simulations.runner import load_all

    torch.set_num_threads(threads)
    cfg = load_config(Path("configs/demo.yaml"), ["model.base=me5-small"])
    data = load_all(cfg, lambda _: None)
    examples = [ex for region in data.values() for ex in region.train][:limit]
    val = [ex for region in data.values() for ex in region.val]
    settings = ModelSettings(base="me5-small", max_length=cfg.model.max_length)
    train = TrainSettings(lr=cfg.train.lr, batch_size=cfg.train.batch_size)
    names: list[int | None] = [None, *counts]
    label = {n: "every layer" if n is None else f"last {n}" for n in names}
    seconds: dict[int | None, dict[str, list[float]]] = {n: {"train": [], "val": []} for n in names}
    for repeat in range(repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]  # rotate: drift in load cancels
        for n in order:
            loaded = build_model(settings, dataclasses.replace(cfg.lora, layers=n), cfg.labels, seed=0)
            pad_id = loaded.pad_id
            encoded = encode_examples(loaded.tokenizer, examples, cfg.model.max_length)
            started = time.perf_counter()
            train_encoded(loaded.model, encoded.ids, encoded.labels, train, pad_id=pad_id, seed=0)
            seconds[n]["train"].append(time.perf_counter() - started)
            ids = encode_examples(loaded.tokenizer, val, cfg.model.max_length).ids
            started = time.perf_counter()
            predict_proba_encoded(loaded.model, ids, pad_id=pad_id, batch_size=train.eval_batch_size)
            seconds[n]["val"].append(time.perf_counter() - started)
            took = {phase: f"{values[-1]:.1f} s" for phase, values in seconds[n].items()}
            print(f"repeat {repeat}: {label[n]}: train {took['train']}, val {took['val']}", file=sys.stderr)
    rows = []
    for n in names:
        row: dict[str, Any] = {"layers": n}
        for phase in ("train", "val"):
            ratios = [a / b for a, b in zip(seconds[n][phase], seconds[None][phase], strict=True)]
            row[f"{phase}_s"] = statistics.median(seconds[n][phase])
            row[f"{phase}_over_every_layer"] = statistics.median(ratios)
        rows.append(row)
    print(f"{len(examples)} training and {len(val)} validation examples, {threads} thread(s), median of {repeats}:")
    print(f"  {'LoRA in':<14}{'train s':>9}{'× every':>9}{'val s':>8}{'× every':>9}")
    for row in rows:
        print(
            f"  {label[row['layers']]:<14}{row['train_s']:>9.1f}{row['train_over_every_layer']:>9.2f}"
            f"{row['val_s']:>8.1f}{row['val_over_every_layer']:>9.2f}"
        )
    return {"examples": len(examples), "val_examples": len(val), "threads": threads, "repeats": repeats, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print tables and write the JSON."""
    apply_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, nargs="?", default=Path("configs/demo.yaml"))
    parser.add_argument("--bases", nargs="+", default=["minilm", "me5-small"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_base"))
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--speed", action="store_true", help="no simulation: the paired cost of the speed-ups")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--grouping",
        nargs="*",
        metavar="REGION",
        help="no simulation: centralized and local-only (in REGION ...) with plain and length-grouped batches",
    )
    parser.add_argument(
        "--layers", type=int, nargs="+", metavar="N", help="no simulation: the cost of LoRA in the last N layers only"
    )
    parser.add_argument("--examples", type=int, default=480, help="--layers: training examples per pass")
    parser.add_argument("--threads", type=int, default=1, help="--layers: torch threads")
    args = parser.parse_args(argv)
    if args.layers:
        result = layers_speed(args.layers, args.repeats, args.examples, args.threads)
    elif args.speed:
        result = speed(args.repeats)
    elif args.grouping is not None:
        result = grouping(args.config, args.seeds, args.overrides, args.grouping)
    else:
        result = run_bases(args)
        print_comparison(result["bases"])
    return write_result(args.json, result)


if __name__ == "__main__":
    sys.exit(main())
