"""Why DP-SGD does or does not learn, one region at a time: test macro-F1 of the region's own model trained plainly,
with per-example clipping only (no noise), and with DP-SGD at a per-region epsilon under named settings.

    python -m benchmarks.bench_dp_region [CONFIG] [--region NAME] [--epsilon 8] [--settings NAME ...]
                                         [--json FILE]

One region, no federation: the same ``client.train.train_encoded`` and ``client.dp.DpSgd`` a node uses, for
``rounds * train.local_steps`` steps (the federation's steps), from the run's initial adapter, then scored on the
region's test split. The noise multiplier is calibrated by ``client.dp.calibrate`` for the steps and sampling rate
of each setting (logit adjustment is off: DP refuses it). Prints a table and writes JSON (default
``benchmarks/results/bench_dp_region.json``). The sampling and noise seeds are fixed (a benchmark, not a node).

Levers tried here became the product's ``dp`` settings (``dp.train: head``: the LoRA factors frozen, 770 noised
parameters instead of 148,226; ``dp.optimizer: sgd``: SGD with momentum 0.9 in place of AdamW, which divides every
coordinate by its own noise-dominated second moment, so that under heavy noise each coordinate random-walks by
about ``lr`` per step). A setting with such levers but no noise trains through ``DpSgd`` with noise 0 and no
clipping, so that the same levers apply; its sampling is then Poisson too.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.output import write_result
from deploy.env import apply_env

DEFAULT_JSON = Path("benchmarks/results/bench_dp_region.json")
# name -> (noise: "plain" | "clip-only" | "dp", config overrides)
SETTINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "plain": ("plain", ()),
    "clip-only": ("clip-only", ()),
    "dp": ("dp", ()),
    "dp-r1-lr1e-2": ("dp", ("lora.r=1", "train.lr=1e-2")),
    "dp-r1-lr1e-2-b64": ("dp", ("lora.r=1", "train.lr=1e-2", "train.batch_size=64", "train.local_steps=2")),
    "head-plain-lr1e-2": ("plain", ("train.lr=1e-2", "dp.train=head")),
    "head-dp-lr1e-2": ("dp", ("train.lr=1e-2", "dp.train=head")),
    # the whole split in every batch (q = 1): fewer, less noisy steps; SGD so noise averages out over steps
    "head-plain-sgd-full": ("plain", ("dp.batch_size=256", "dp.train=head", "dp.optimizer=sgd", "dp.lr=0.9")),
    "head-dp-sgd-full": ("dp", ("dp.batch_size=256", "dp.train=head", "dp.optimizer=sgd", "dp.lr=0.9")),
}
# without noise, clipping at this norm clips nothing
NO_CLIP = 1e9


def run_setting(
    config: Path, region_name: str, epsilon: float, noise: str, overrides: tuple[str, ...]
) -> dict[str, Any]:
    """Train the region's model under one setting; its test macro-F1, loss, noise multiplier and size."""
    import numpy as np

    from client.dp import DpSgd, calibrate, sampling_rate
    from client.tokens import encode_examples
    from client.train import plan_steps, predict_proba_encoded, train_encoded
    from common.config import load_config
    from common.data import load_region
    from common.metrics import macro_f1
    from common.model import build_model
    from common.policy import DpRequirement

    cfg = load_config(config, ["train.logit_adjust=0", *overrides])
    levers = (cfg.dp.train, cfg.dp.optimizer, cfg.dp.lr) != ("all", "adamw", None)
    region = next(r for r in cfg.regions if r.name == region_name)
    data = load_region(region.name, region.data, cfg.labels)
    loaded = build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed)
    train = encode_examples(loaded.tokenizer, data.train, cfg.model.max_length)
    test = encode_examples(loaded.tokenizer, data.test, cfg.model.max_length)
    n = len(train.ids)
    steps = plan_steps(n, cfg.train) * cfg.rounds  # the federation's steps on this region
    batch = cfg.dp.sampled_batch(cfg.train.batch_size, n)
    sample_rate = sampling_rate(cfg.dp, cfg.train, n)  # as a node plans it (client.dp.plan)
    sigma = None
    private = None
    if noise != "plain":
        sigma = 0.0 if noise == "clip-only" else calibrate(DpRequirement(epsilon, 1e-5), sample_rate, steps, cfg.dp)
        private = DpSgd(sigma, cfg.dp.clip, sample_rate, n, sampling_seed=1, noise_seed=2, settings=cfg.dp)
    elif levers:
        private = DpSgd(0.0, NO_CLIP, sample_rate, n, sampling_seed=1, noise_seed=2, settings=cfg.dp)
    started = time.perf_counter()
    settings = replace(cfg.train, local_steps=steps)
    result = train_encoded(
        loaded.model, train.ids, train.labels, settings, pad_id=loaded.pad_id, seed=cfg.seed, private=private
    )
    trainable = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)  # before close unfreezes
    if private is not None:
        private.close()
    probs = predict_proba_encoded(loaded.model, test.ids, pad_id=loaded.pad_id, batch_size=cfg.train.eval_batch_size)
    return {
        "test_macro_f1": macro_f1(np.array(test.labels), probs.argmax(1), len(cfg.labels)),
        "train_loss": result.loss,
        "noise_multiplier": sigma,
        "steps": steps,
        "batch_size": batch,
        "trainable": trainable,
        "examples": n,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the settings, print the table, write the JSON."""
    apply_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, nargs="?", default=Path("configs/demo.yaml"))
    parser.add_argument("--region", default="cn-electronics")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    rows = []
    for name in args.settings:
        noise, overrides = SETTINGS[name]
        row = {
            "setting": name,
            "overrides": list(overrides),
            **run_setting(args.config, args.region, args.epsilon, noise, overrides),
        }
        rows.append(row)
        sigma = "-" if row["noise_multiplier"] is None else f"{row['noise_multiplier']:.3f}"
        print(
            f"{name:<20} trainable {row['trainable']:>8,}  sigma {sigma:>6}  steps {row['steps']:>3} of "
            f"{row['batch_size']:>3}  test macro-F1 {row['test_macro_f1']:.3f}  loss {row['train_loss']:.3f}  "
            f"{row['seconds']:.0f} s",
            flush=True,
        )
    result = {"config": str(args.config), "region": args.region, "epsilon": args.epsilon, "delta": 1e-5}
    return write_result(args.json, {**result, "rows": rows})


if __name__ == "__main__":
    raise SystemExit(main())
