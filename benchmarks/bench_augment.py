"""Benchmark of train-split augmentation on one demo region (default: cn-books, the smallest).

    python -m benchmarks.bench_augment [CONFIG] [--region NAME] [--seeds 0 1 2] [--copies 1 2] [--threads N]

A fresh model (the config's model and LoRA settings, the head seeded per seed) is trained locally with
``train_local`` on the region's train split, as the local-only baseline trains it (``rounds x train.epochs``
passes), then tested. Variants, each over every seed:

* ``none``: the train split alone, E passes (E = rounds x epochs);
* ``aug cN, same epochs``: train + N augmented copies of each example, E passes over that set, so each original
  text is seen (in some form) (1+N) x E times, and (1+N) x the optimizer steps;
* ``aug cN, same steps``: the same set, capped at the steps of ``none`` (fewer passes over each version);
* ``none, steps x(1+N)``: the train split alone for (1+N) x E passes: the compute of ``same epochs`` without
  augmentation, which tells augmentation apart from merely training longer.

Augmentation: delete + swap + mask, p = 0.1, mask spans <= 2 of the tokenizer's mask token; Chinese text is
edited per character (client/augment.py). Reports test macro-F1 mean ± sample std over the seeds, prints a table
and writes JSON (default benchmarks/results/bench_augment-demo.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.output import write_result
from deploy.env import apply_env

AUGMENT_OPS = ("delete", "swap", "mask")
AUGMENT_P = 0.1
AUGMENT_SPAN = 2


@dataclass(frozen=True)
class Variant:
    """One way of training: how many augmented copies, and how long."""

    name: str
    copies: int
    epochs: float  # passes over the training set (originals + copies)
    max_steps: int | None = None


def variants(passes: float, base_steps: int, copies: Sequence[int]) -> list[Variant]:
    """The un-augmented run, then per copy count: same epochs, same steps, and the same-compute control."""
    out = [Variant("none", 0, passes)]
    for n in copies:
        out += [
            Variant(f"aug c{n}, same epochs", n, passes),
            Variant(f"aug c{n}, same steps", n, passes, max_steps=base_steps),
            Variant(f"none, steps x{1 + n}", 0, passes * (1 + n)),
        ]
    return out


def run_one(cfg: Any, region: Any, variant: Variant, seed: int, threads: int) -> dict[str, Any]:
    """Train a fresh model on the variant's training set and score it on the region's val and test splits."""
    from client.augment import augment_examples
    from client.train import evaluate, train_local
    from common.augment_settings import AugmentSettings
    from common.model import build_model

    loaded = build_model(cfg.model, cfg.lora, cfg.labels, seed)
    mask = loaded.tokenizer.mask_token or "[MASK]"
    settings = AugmentSettings(ops=AUGMENT_OPS, copies=variant.copies, p=AUGMENT_P, span=AUGMENT_SPAN, mask_token=mask)
    examples = augment_examples(region.train, settings, seed)
    train = dataclasses.replace(cfg.train, epochs=variant.epochs, max_steps=variant.max_steps, threads=threads)
    start = time.perf_counter()
    result = train_local(loaded.model, loaded.tokenizer, examples, train, max_length=cfg.model.max_length, seed=seed)
    seconds = time.perf_counter() - start
    scores = {
        split: evaluate(
            loaded.model, loaded.tokenizer, getattr(region, split), len(cfg.labels), max_length=cfg.model.max_length
        )
        for split in ("val", "test")
    }
    return {
        "variant": variant.name,
        "seed": seed,
        "train_examples": len(examples),
        "steps": result.steps,
        "train_loss": round(result.loss, 4),
        "train_seconds": round(seconds, 1),
        **{f"{split}_macro_f1": round(s.macro_f1, 4) for split, s in scores.items()},
        **{f"{split}_accuracy": round(s.accuracy, 4) for split, s in scores.items()},
    }


def summarise(runs: list[dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """Per variant: mean and sample standard deviation over the seeds of the test (and val) scores."""
    rows = []
    for name in names:
        mine = [r for r in runs if r["variant"] == name]
        row: dict[str, Any] = {"variant": name, "seeds": len(mine)}
        for key in ("test_macro_f1", "test_accuracy", "val_macro_f1", "steps", "train_examples"):
            values = [float(r[key]) for r in mine]
            row[key] = round(statistics.fmean(values), 4)
            row[f"{key}_std"] = round(statistics.stdev(values), 4) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """The summary as a Markdown table."""
    print("| variant | train examples | steps | test macro-F1 (mean ± std) | test accuracy | val macro-F1 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['train_examples']:.0f} | {r['steps']:.0f} | "
            f"{r['test_macro_f1']:.3f} ± {r['test_macro_f1_std']:.3f} | "
            f"{r['test_accuracy']:.3f} ± {r['test_accuracy_std']:.3f} | "
            f"{r['val_macro_f1']:.3f} ± {r['val_macro_f1_std']:.3f} |"
        )


def main(argv: list[str] | None = None) -> int:
    """Run every variant for every seed; print the table and write the JSON."""
    apply_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, nargs="?", default=Path("configs/demo.yaml"))
    parser.add_argument("--region", default="cn-books")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine may be shared)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/bench_augment-demo.json"))
    args = parser.parse_args(argv)

    from client.pipeline import node_data
    from client.train import plan_steps
    from common.config import load_config

    cfg = load_config(args.config)
    folder = next((r.data for r in cfg.regions if r.name == args.region), None)
    if folder is None:
        parser.error(f"no region {args.region!r} in {args.config} (regions: {', '.join(cfg.region_names)})")
    # the node's pipeline (no policy, no augmentation): a region without val validates on what a node carves
    region = node_data(
        args.region, folder, cfg.labels, seed=cfg.seed, settings=cfg.data, say=lambda m: print(m, file=sys.stderr)
    ).data
    passes = cfg.rounds * cfg.train.epochs  # what the local-only baseline trains for
    base_steps = plan_steps(len(region.train), dataclasses.replace(cfg.train, epochs=passes))
    plan = variants(passes, base_steps, args.copies)
    load_before = os.getloadavg()
    start = time.perf_counter()
    runs = []
    for seed in args.seeds:
        for variant in plan:
            runs.append(run_one(cfg, region, variant, seed, args.threads))
            print(json.dumps(runs[-1]), file=sys.stderr)
    rows = summarise(runs, [v.name for v in plan])
    print_table(rows)
    result = {
        "config": str(args.config),
        "region": args.region,
        "sizes": {"train": len(region.train), "val": len(region.val), "test": len(region.test)},
        "passes": passes,
        "augment": {"ops": AUGMENT_OPS, "p": AUGMENT_P, "span": AUGMENT_SPAN, "mask_token": "the tokenizer's"},
        "seeds": args.seeds,
        "threads": args.threads,
        "std": "sample standard deviation (n-1) over the seeds",
        "summary": rows,
        "runs": runs,
        "seconds": round(time.perf_counter() - start, 1),
        "load_average_1_5_15": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },
    }
    return write_result(args.json, result)


if __name__ == "__main__":
    sys.exit(main())
