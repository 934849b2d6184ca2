"""Would a federation of DP-trained heads on frozen features be useful at epsilon 8? Measured with the product's own
pieces before the product offered it (``dp.train: head`` and ``model.pooling: mean``, docs/privacy.md).

    python -m benchmarks.bench_dp_head [CONFIG] [--features pooler mean] [--epsilons inf 8 3 1] [--seeds 0 1 2]
                                       [--lr 1.0] [--set KEY=VALUE ...] [--json FILE]

Why: under DP-SGD every noised value costs signal. The node today noises all 148,226 adapter values (LoRA + head);
its global model at epsilon 8 predicts one class (``bench_dp-demo.json``). Here only the classification head
trains (770 values on ``me5-small``), on features of the frozen base model computed once, with the whole split in
every step (sampling rate 1: the least noise per step for a given budget) and SGD with momentum (AdamW divides
each coordinate by its noise-dominated second moment, ``bench_dp_region``).

What runs, per feature kind, epsilon and seed: ``rounds`` rounds of the config; in each, every region trains the
received head for ``train.local_steps`` steps on its train split, through the node's own DP wrapper
(``client.dp.DpSgd``: Opacus per-example gradients, clipping to ``dp.clip``, Gaussian noise; sigma from
``client.dp.calibrate`` for all the run's steps at (epsilon, ``--delta``)), and the server averages the heads with
``server.aggregate`` (example-weighted). The head starts from the product's initial head (``build_model``, the
config's seed). Scored after the last round on every region's test split; "overall" is the test-size weighted
mean of the regions' macro-F1, as ``summary.json``'s is. ``inf``: the same clipping without noise, so that the
difference to a finite epsilon is what the noise costs.

Feature kinds: ``pooler``, what the head reads under ``model.pooling: cls``, the default (BERT's pooler: dense +
tanh on the first token);
``mean``, the attention-masked mean of the last hidden states, L2-normalised (how multilingual-e5 was trained to
be used; the product's ``model.pooling: mean``, ``common.model.MeanPooler``). Prints a table, writes JSON (default
``benchmarks/results/bench_dp_head.json``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.output import write_result
from deploy.env import apply_env

DEFAULT_JSON = Path("benchmarks/results/bench_dp_head.json")
FEATURES = ("pooler", "mean")


def encoder_features(loaded: Any, examples: Any, max_length: int, batch_size: int = 64) -> dict[str, Any]:
    """Per feature kind, a (examples, hidden) tensor of the frozen base model's features of ``examples``.

    The adapter is the initial one (LoRA's B is zero), so these are the base model's own features."""
    import torch

    from client.tokens import encode_examples
    from client.train import pad_batch
    from common.model import MeanPooler

    classifier = loaded.model.base_model.model
    encoder = getattr(classifier, classifier.base_model_prefix)
    if getattr(encoder, "pooler", None) is None:
        raise SystemExit(f"{type(classifier).__name__} has no pooler: this benchmark needs a BERT-like head")
    encoded = encode_examples(loaded.tokenizer, examples, max_length)
    pooled, means = [], []
    encoder.eval()
    with torch.no_grad():
        for start in range(0, len(encoded.ids), batch_size):
            batch = pad_batch(encoded.ids[start : start + batch_size], loaded.pad_id)
            out = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            pooled.append(out.pooler_output)
            mean = MeanPooler()
            mean.mask = batch["attention_mask"]
            means.append(mean(out.last_hidden_state))
    labels = torch.tensor(encoded.labels, dtype=torch.long)
    return {"pooler": torch.cat(pooled), "mean": torch.cat(means), "labels": labels}


def initial_head(loaded: Any) -> dict[str, Any]:
    """The product's initial head (the trainable copy peft keeps of the classifier): weight and bias."""
    head = {
        name.rsplit(".", 1)[1]: p.detach().clone()
        for name, p in loaded.model.named_parameters()
        if p.requires_grad and "lora_" not in name
    }
    if set(head) != {"weight", "bias"}:
        raise SystemExit(f"expected a one-layer head (weight, bias), found {sorted(head)}")
    return head


def local_round(
    head: dict[str, Any], x: Any, y: Any, *, steps: int, lr: float, sigma: float, clip: float, seed: int
) -> dict[str, Any]:
    """``steps`` full-batch steps of SGD (momentum 0.9) on the head from ``head`` through the node's DP wrapper
    ``DpSgd`` (noise multiplier ``sigma``; 0: clipping only). Returns the new head."""
    import torch

    from client.dp import DpSgd
    from common.config import DpSettings

    linear = torch.nn.Linear(x.shape[1], head["weight"].shape[0])
    with torch.no_grad():
        linear.weight.copy_(head["weight"])
        linear.bias.copy_(head["bias"])
    private = DpSgd(sigma, clip, 1.0, len(y), sampling_seed=seed, noise_seed=seed + 1, settings=DpSettings())
    sgd = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9)
    model, optimizer, order = private(linear, sgd, [list(range(len(y)))] * steps)
    for batch in order:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        optimizer.step()
    private.close()
    return {"weight": linear.weight.detach().clone(), "bias": linear.bias.detach().clone()}


def federate(
    regions: dict[str, dict[str, Any]],
    head: dict[str, Any],
    feature: str,
    *,
    rounds: int,
    steps: int,
    lr: float,
    sigmas: dict[str, float],
    clip: float,
    seed: int,
) -> dict[str, Any]:
    """``rounds`` rounds of FedAvg over the regions' locally trained heads; the final head."""
    import numpy as np
    import torch

    from common.seeds import derive_seed
    from server.aggregate import aggregation_weights, weighted_average

    names = sorted(regions)
    weights = aggregation_weights([len(regions[r]["train"]["labels"]) for r in names], "weighted")
    for rnd in range(1, rounds + 1):
        updates = []
        for name in names:
            train = regions[name]["train"]
            new = local_round(
                head,
                train[feature],
                train["labels"],
                steps=steps,
                lr=lr,
                sigma=sigmas[name],
                clip=clip,
                seed=derive_seed("bench_dp_head", seed, rnd, name) % 2**31,
            )
            updates.append({k: v.numpy() for k, v in new.items()})
        head = {k: torch.from_numpy(np.asarray(v)) for k, v in weighted_average(updates, weights).items()}
    return head


def score(regions: dict[str, dict[str, Any]], head: dict[str, Any], feature: str, labels: int) -> dict[str, Any]:
    """Per region test macro-F1 of ``head`` and the test-size weighted overall."""
    import numpy as np

    from common.metrics import macro_f1, weighted_mean

    per_region = {}
    for name, splits in regions.items():
        test = splits["test"]
        logits = test[feature] @ head["weight"].T + head["bias"]
        per_region[name] = macro_f1(np.asarray(test["labels"]), logits.argmax(1).numpy(), labels)
    sizes = {name: float(len(splits["test"]["labels"])) for name, splits in regions.items()}
    return {"overall": weighted_mean(per_region, sizes), "regions": per_region}


def main(argv: list[str] | None = None) -> int:
    """Extract the features, run every feature kind × epsilon × seed, print the table, write the JSON."""
    apply_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, nargs="?", default=Path("configs/demo.yaml"))
    parser.add_argument("--features", nargs="+", default=list(FEATURES), choices=FEATURES)
    parser.add_argument("--epsilons", nargs="+", type=float, default=[math.inf, 8.0, 3.0, 1.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the DP noise")
    parser.add_argument("--lr", type=float, default=1.0, help="SGD learning rate of the head (momentum 0.9)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    if len(set(args.epsilons)) != len(args.epsilons):
        raise SystemExit(f"--epsilons repeats a value: {args.epsilons}")

    from client.dp import calibrate
    from common.config import load_config
    from common.data import load_region
    from common.model import build_model
    from common.policy import DpRequirement

    cfg = load_config(args.config, args.overrides)
    steps = cfg.train.local_steps
    if not steps:
        raise SystemExit("set train.local_steps: this benchmark trains a fixed number of steps per round")
    started = time.perf_counter()
    loaded = build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed)
    head0 = initial_head(loaded)
    regions = {}
    for region in cfg.regions:
        data = load_region(region.name, region.data, cfg.labels)
        regions[region.name] = {
            split: encoder_features(loaded, getattr(data, split), cfg.model.max_length) for split in ("train", "test")
        }
        print(f"features: {region.name} ({len(data.train)} train, {len(data.test)} test)", flush=True)
    features_s = time.perf_counter() - started

    rows = []
    print(f"{'features':<8} {'epsilon':>7}  overall macro-F1 (mean [per seed])   sigma (min–max over regions)")
    for feature in args.features:
        for eps in args.epsilons:
            sigmas = {name: 0.0 for name in regions}  # clipping only
            if math.isfinite(eps):
                budget = DpRequirement(eps, args.delta)
                sigmas = {name: calibrate(budget, 1.0, cfg.rounds * steps, cfg.dp) for name in regions}
            runs = []
            for seed in args.seeds:
                head = federate(
                    regions,
                    head0,
                    feature,
                    rounds=cfg.rounds,
                    steps=steps,
                    lr=args.lr,
                    sigmas=sigmas,
                    clip=cfg.dp.clip,
                    seed=seed,
                )
                runs.append({"seed": seed, **score(regions, head, feature, len(cfg.labels))})
            overall = [r["overall"] for r in runs]
            row = {
                "features": feature,
                "epsilon": eps if math.isfinite(eps) else None,
                "mean": statistics.fmean(overall),
                "runs": runs,
                "noise_multiplier": sigmas if math.isfinite(eps) else None,
            }
            rows.append(row)
            sig = f"{min(sigmas.values()):.3f}–{max(sigmas.values()):.3f}"
            print(
                f"{feature:<8} {eps:>7}  {row['mean']:.3f} [{', '.join(f'{v:.3f}' for v in overall)}]   {sig}",
                flush=True,
            )
    result = {
        "config": str(args.config),
        "overrides": args.overrides,
        "command": "python -m benchmarks.bench_dp_head " + " ".join(sys.argv[1:] if argv is None else argv),
        "delta": args.delta,
        "rounds": cfg.rounds,
        "local_steps": steps,
        "sample_rate": 1.0,
        "lr": args.lr,
        "clip": cfg.dp.clip,
        "trainable": sum(int(v.numel()) for v in head0.values()),
        "features_s": features_s,
        "total_s": time.perf_counter() - started,
        "rows": rows,
    }
    return write_result(args.json, result)


if __name__ == "__main__":
    raise SystemExit(main())
