"""Does a label-skew remedy stop the global model collapsing to the majority class? A quick toy check.

    python -m benchmarks.bench_label_skew [--seeds 0 1] [--rounds 30] [--out FILE]

The tiny test model (``assets.tiny``, built in a temporary folder) and its synthetic sentiment task (the label is
given by which word list a sentiment word comes from), four regions of 80 training examples with positive shares
95 %, 92 %, 90 % and 10 % (72 % pooled), and a balanced test set of 200 per region. FedAvg is computed in memory
(no Flower: ``client.train.train_encoded`` per region, the example-weighted mean of the adapters), with
``train.local_steps`` 15, lr 3e-2, batch 8, for each variant: plain, ``train.logit_adjust: 1`` and
``train.head: frozen``; and a centralized model with the same total steps. Prints the global macro-F1 by round
and writes JSON (default benchmarks/results/bench_label_skew-tiny.json). A toy: the real benchmark decides.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.output import write_result

FRACTIONS = (0.95, 0.92, 0.9, 0.1)
LABELS = ("neg", "pos")
STEPS, LR, BATCH = 15, 3e-2, 8


def rows(n: int, rng: random.Random, pos_fraction: float) -> list[tuple[str, int]]:
    """The synthetic task of the test suite: four filler words and one sentiment word, shuffled."""
    from assets.tiny import FILLER, NEG_WORDS, POS_WORDS

    out = []
    for _ in range(n):
        label = 1 if rng.random() < pos_fraction else 0
        words = [*rng.sample(FILLER, 4), rng.choice(POS_WORDS if label else NEG_WORDS)]
        rng.shuffle(words)
        out.append((" ".join(words), label))
    return out


def run(seed: int, rounds: int, model_dir: Path) -> dict[str, Any]:
    """Global macro-F1 by round for each variant, and the centralized model's, for one seed."""
    import numpy as np
    import torch

    from client.train import encode, evaluate_encoded, train_encoded
    from common.config import LoraSettings, ModelSettings, TrainSettings
    from common.model import adapter_state, build_model, load_adapter_state

    torch.set_num_threads(1)
    model, lora = ModelSettings(base=str(model_dir), max_length=32), LoraSettings(r=4, alpha=8, dropout=0.0)
    tokenizer = build_model(model, lora, LABELS, seed=seed).tokenizer
    regions = []
    for i, fraction in enumerate(FRACTIONS):
        rng = random.Random(1000 * seed + i)
        train, test = rows(80, rng, fraction), rows(200, rng, 0.5)
        regions.append((encode(tokenizer, [t for t, _ in train], 32), [y for _, y in train], test))
    test = [ex for r in regions for ex in r[2]]
    test_ids, test_y = encode(tokenizer, [t for t, _ in test], 32), [y for _, y in test]
    base = TrainSettings(lr=LR, local_steps=STEPS, batch_size=BATCH, threads=1)
    variants = {
        "plain": base,
        "logit_adjust=1": dataclasses.replace(base, logit_adjust=1.0),
        "head=frozen": dataclasses.replace(base, head="frozen"),
    }

    def score(state: dict[str, torch.Tensor]) -> float:
        loaded = build_model(model, lora, LABELS, seed=seed)
        load_adapter_state(loaded.model, state)
        return round(evaluate_encoded(loaded.model, test_ids, test_y, 2, pad_id=0).macro_f1, 3)

    result: dict[str, Any] = {}
    for name, settings in variants.items():
        state = adapter_state(build_model(model, lora, LABELS, seed=seed).model)
        curve = []
        for rnd in range(1, rounds + 1):
            updates = []
            for r, (ids, labels, _) in enumerate(regions):
                loaded = build_model(model, lora, LABELS, seed=seed)
                load_adapter_state(loaded.model, state)
                train_encoded(loaded.model, ids, labels, settings, pad_id=0, seed=seed * 1000 + rnd * 10 + r)
                updates.append(adapter_state(loaded.model))
            weights = np.array([len(r[1]) for r in regions], dtype=float)
            weights /= weights.sum()
            pairs = list(zip(weights, updates, strict=True))
            state = {k: sum((float(w) * u[k] for w, u in pairs), torch.zeros_like(state[k])) for k in state}
            curve.append(score(state))
        result[name] = curve
        print(f"seed {seed} {name:15} " + " ".join(f"{v:.2f}" for v in curve), flush=True)
    loaded = build_model(model, lora, LABELS, seed=seed)
    pooled_ids = [x for r in regions for x in r[0]]
    pooled_y = [y for r in regions for y in r[1]]
    central = dataclasses.replace(base, local_steps=STEPS * len(regions) * rounds)
    train_encoded(loaded.model, pooled_ids, pooled_y, central, pad_id=0, seed=seed)
    result["centralized"] = score(adapter_state(loaded.model))
    print(f"seed {seed} centralized     {result['centralized']:.3f}", flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run every seed, print the curves and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_label_skew-tiny.json"))
    args = parser.parse_args(argv)
    from assets.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(Path(tmp), "bert")
        by_seed = {str(seed): run(seed, args.rounds, model_dir) for seed in args.seeds}
    setting = {
        "model": "assets.tiny bert",
        "regions_positive_share": FRACTIONS,
        "train_per_region": 80,
        "test_per_region_balanced": 200,
        "local_steps": STEPS,
        "lr": LR,
        "batch_size": BATCH,
        "rounds": args.rounds,
    }
    return write_result(args.out, {"setting": setting, "global_macro_f1_by_round": by_seed})


if __name__ == "__main__":
    sys.exit(main())
