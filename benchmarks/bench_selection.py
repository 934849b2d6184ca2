"""Which validation score picks the best round of the global model (or the best checkpoint of the centralized
baseline)? Every round's saved global adapter of one finished simulation, scored on every region's validation and
test split.

    python -m benchmarks.bench_selection RUN_DIR [--average K] [--json FILE]
    python -m benchmarks.bench_selection RUN_DIR --centralized [--json FILE]

The federation keeps the round with the best ``early_stopping.metric`` on validation, a mean over regions
weighted by their validation examples. The weighted mean of the regions' macro-F1 is degenerate under label skew:
a region whose validation split is one class scores 1.0 for a constant predictor of it. The weighted means of
accuracy and loss are pooled scores (the same as scoring all regions' validation records as one set), and the
pooled macro-F1 would be one too but needs each region's confusion matrix at the server. For each criterion the
table gives the round it picks and the pooled test macro-F1 of that round (the summary's ``pooled_macro_f1``),
next to the best any round reaches on test (which no criterion can know).

``--average K`` scores, in place of each round's adapter, the element-wise mean of the adapters (LoRA factors and
head) of that round and the K − 1 before it: whether averaging recent rounds would steady a global model that
swings from round to round. The training is the run's; only what is scored changes.

``--centralized`` trains the run's centralized baseline again (``simulations.baselines.train_baseline``: the same
seed, data and steps) and scores each of its validation checkpoints in place of the rounds: the baseline keeps its
best checkpoint by a validation score too, and compared with the federation's best round it should be chosen by
the best score the baseline can know (it holds every region's data, so it can pool). The checkpoint the run's
summary recorded for it (``kept_checkpoint``) and that checkpoint's pooled test macro-F1 are checked against the
retrained one's under the run's own criterion.

Reads RUN_DIR/config.yaml (the regions as the run read them) and RUN_DIR/checkpoints/round-NNN/; without
``--average`` checks that its own weighted mean of validation macro-F1 equals the one the run recorded in
federation.json for every round. Prints a table and writes JSON (default ``RUN_DIR/bench_selection.json``, with
``--average K`` ``RUN_DIR/bench_selection-avgK.json``, with ``--centralized``
``RUN_DIR/bench_selection-centralized.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.output import write_result
from deploy.env import apply_env

if TYPE_CHECKING:  # the heavy imports wait until after argument parsing (--help stays fast)
    from common.config import RunConfig
    from common.data import RegionData
    from common.model import LoadedModel

# the validation scores a round could be kept by; the loss is lower-is-better, the others higher
CRITERIA = ("mean_macro_f1", "pooled_accuracy", "pooled_loss", "pooled_macro_f1")
# validating every K-th round (and the last) only: the choices the table adds for the federation's criterion
EVERY = (1, 2, 3, 4, 6)


def round_scores(labels: dict[str, np.ndarray], probs: dict[str, np.ndarray], num_labels: int) -> dict[str, float]:
    """One round's scores on one split over all regions: the example-weighted mean of the regions' macro-F1 (what
    the federation records) and the pooled accuracy, cross-entropy and macro-F1."""
    from common.metrics import confusion, macro_f1, pooled_macro_f1

    regions = [name for name in labels if len(labels[name])]
    if not regions:
        raise SystemExit("no region has examples in this split: nothing to score")
    counts = np.array([len(labels[name]) for name in regions], dtype=float)
    per_region = np.array([macro_f1(labels[name], probs[name].argmax(axis=1), num_labels) for name in regions])
    truth = np.concatenate([labels[name] for name in regions])
    stacked = np.concatenate([probs[name] for name in regions])
    return {
        "mean_macro_f1": float((per_region * counts).sum() / counts.sum()),
        "pooled_accuracy": float((stacked.argmax(axis=1) == truth).mean()),
        "pooled_loss": float(-np.log(np.clip(stacked[np.arange(len(truth)), truth], 1e-12, None)).mean()),
        "pooled_macro_f1": pooled_macro_f1(
            [confusion(labels[name], probs[name].argmax(axis=1), num_labels) for name in regions]
        ),
    }


def picked(curve: list[dict[str, float]], criterion: str, min_delta: float = 0.0, every: int = 1) -> int:
    """The 1-based round ``criterion`` keeps on validation, as the federation keeps its best round: a later round
    replaces the best only when it beats it by more than ``min_delta`` (``common.stopping.EarlyStopper``). With
    ``every`` K only every K-th round and the last are looked at, as if only they had been validated."""
    from common.stopping import EarlyStopper

    stopper = EarlyStopper(None, higher_is_better=criterion != "pooled_loss", min_delta=min_delta)
    for server_round, row in enumerate(curve, start=1):
        if server_round % every == 0 or server_round == len(curve):
            stopper.update(server_round, row[criterion])
    return stopper.best_round


def _table(curves: dict[str, list[dict[str, float]]], min_delta: float, what: str) -> tuple[dict[str, Any], int]:
    """Print and return, for each criterion, the round (or checkpoint) it keeps and that one's pooled test
    macro-F1, with the best any reaches on test."""
    test_pooled = [row["pooled_macro_f1"] for row in curves["test"]]
    choices: dict[str, dict[str, Any]] = {
        criterion: {
            "round": (r := picked(curves["val"], criterion, min_delta)),
            "test_pooled_macro_f1": test_pooled[r - 1],
        }
        for criterion in CRITERIA
    }
    best_test = int(np.argmax(test_pooled)) + 1
    print(f"{'criterion (validation)':24} {what:>10} {'test pooled macro-F1':>21}")
    for criterion, choice in choices.items():
        print(f"{criterion:24} {choice['round']:>10} {choice['test_pooled_macro_f1']:>21.3f}")
    print(f"{'(best on test)':24} {best_test:>10} {test_pooled[best_test - 1]:>21.3f}")
    # fewer validations (early_stopping.every): the same training, a coarser choice among its rounds
    criterion = "mean_macro_f1"
    print(f"\nvalidated only every K-th {what} and the last, by {criterion}:")
    print(f"{'K':>3} {what:>10} {'test pooled macro-F1':>21}")
    for every in EVERY:
        r = picked(curves["val"], criterion, min_delta, every)
        choices[criterion][f"every_{every}"] = {"round": r, "test_pooled_macro_f1": test_pooled[r - 1]}
        print(f"{every:>3} {r:>10} {test_pooled[r - 1]:>21.3f}")
    return choices, best_test


def main(argv: list[str] | None = None) -> int:
    """Score every round's checkpoint (or the centralized baseline's); print the table and write the JSON."""
    apply_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--average", type=int, default=1, metavar="K", help="score the mean of the last K rounds")
    parser.add_argument(
        "--centralized", action="store_true", help="retrain the centralized baseline, score its checkpoints"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.average < 1:
        parser.error(f"--average must be at least 1, got {args.average}")
    if args.centralized and args.average > 1:
        parser.error("--average scores the federation's rounds; it does not go with --centralized")

    from client.tokens import encode_examples
    from client.train import predict_proba_encoded
    from common.config import load_config
    from common.runfiles import CONFIG_FILE, FEDERATION_FILE
    from simulations.runner import load_all

    run: Path = args.run_dir
    if not (run / FEDERATION_FILE).is_file():
        raise SystemExit(f"{run}: no {FEDERATION_FILE}; give the folder of a finished simulation")
    federation = json.loads((run / FEDERATION_FILE).read_text())
    cfg = load_config(run / CONFIG_FILE)
    data = load_all(cfg, lambda _: None)
    labels = {
        split: {name: np.array([ex.label for ex in getattr(region, split)], dtype=int) for name, region in data.items()}
        for split in ("val", "test")
    }
    curves: dict[str, list[dict[str, float]]] = {"val": [], "test": []}
    encoded: dict[str, dict[str, list[list[int]]]] = {}

    def score(loaded: LoadedModel) -> dict[str, float]:
        """Append ``loaded``'s scores on both splits to the curves; its validation scores."""
        for split in ("val", "test"):
            if split not in encoded:  # tokenised once: every round (checkpoint) only swaps the adapter
                encoded[split] = {
                    name: encode_examples(loaded.tokenizer, getattr(region, split), cfg.model.max_length).ids
                    for name, region in data.items()
                }
            ids = encoded[split]
            probs = {
                name: predict_proba_encoded(
                    loaded.model, rows, pad_id=loaded.pad_id, batch_size=cfg.train.eval_batch_size
                )
                for name, rows in ids.items()
            }
            curves[split].append(round_scores(labels[split], probs, len(cfg.labels)))
        return curves["val"][-1]

    if args.centralized:
        result, name = _centralized(run, cfg, data, score, curves), "bench_selection-centralized.json"
    else:
        result = _rounds(run, cfg, federation, args.average, score, curves)
        name = "bench_selection.json" if args.average == 1 else f"bench_selection-avg{args.average}.json"
    return write_result(args.json or run / name, result)


def _centralized(
    run: Path,
    cfg: RunConfig,
    data: Mapping[str, RegionData],
    score: Callable[[LoadedModel], dict[str, float]],
    curves: dict[str, list[dict[str, float]]],
) -> dict[str, Any]:
    """Train the centralized baseline as the run did, scoring each validation checkpoint; the result."""
    from common.runfiles import SUMMARY_FILE
    from simulations.baselines import train_baseline

    summary_path = run / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    recorded = summary.get("overall", {}).get("centralized", {})
    recorded_kept = _recorded_kept(summary)
    metric = {"macro_f1": "mean_macro_f1", "accuracy": "pooled_accuracy", "loss": "pooled_loss"}[
        cfg.early_stopping.metric
    ]

    def validate(loaded: LoadedModel) -> float:
        value = float(score(loaded)[metric])
        print(
            f"checkpoint {len(curves['val'])}: val {metric} {value:.4f}, "
            f"val pooled macro-F1 {curves['val'][-1]['pooled_macro_f1']:.4f}, "
            f"test pooled macro-F1 {curves['test'][-1]['pooled_macro_f1']:.4f}",
            file=sys.stderr,
            flush=True,
        )
        return value

    union = [ex for region in data.values() for ex in region.train]
    _, kept = train_baseline(cfg, union, "centralized", len(data), validate)
    choices, best_test = _table(curves, cfg.early_stopping.min_delta, "checkpoint")
    mine = curves["test"][kept.number - 1]["pooled_macro_f1"] if kept.number else None
    print(
        f"retrained: kept checkpoint {kept.number} of {kept.of} by the run's criterion ({metric}), test pooled "
        f"macro-F1 {mine if mine is None else f'{mine:.4f}'}; the run recorded checkpoint "
        f"{(recorded_kept or {}).get('number')}, {recorded.get('pooled_macro_f1')}"
    )
    return {
        "command": f"python -m benchmarks.bench_selection {run} --centralized",
        "run_dir": str(run),
        "early_stopping_metric": cfg.early_stopping.metric,
        "kept": kept.to_json(),
        "kept_test_pooled_macro_f1": mine,
        "recorded_kept": recorded_kept,
        "recorded_test_pooled_macro_f1": recorded.get("pooled_macro_f1"),
        "choices": choices,
        "best_test_checkpoint": best_test,
        "curves": curves,
    }


def _recorded_kept(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The centralized baseline's kept checkpoint as the run's summary recorded it (the same in every region)."""
    for scores in summary.get("regions", {}).values():
        kept = scores.get("centralized", {}).get("kept_checkpoint") if isinstance(scores, dict) else None
        if isinstance(kept, dict):
            return kept
    return None


def _rounds(
    run: Path,
    cfg: RunConfig,
    federation: dict[str, Any],
    average: int,
    score: Callable[[LoadedModel], dict[str, float]],
    curves: dict[str, list[dict[str, float]]],
) -> dict[str, Any]:
    """Score every round's saved global adapter (or the mean of the last ``average``); the result."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import load_file

    from common.model import build_model, load_adapter_state
    from server.federation import checkpoint_dir

    rounds = len(federation["rounds"])
    weights = [checkpoint_dir(run, r) / SAFETENSORS_WEIGHTS_NAME for r in range(1, rounds + 1)]
    missing = [str(path) for path in weights if not path.is_file()]
    if missing:
        raise SystemExit(f"{run}: no saved global adapter for {len(missing)} of {rounds} rounds: {', '.join(missing)}")
    # one base model for every round; each round only swaps in its adapter (and head)
    loaded = build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed)
    recent: list[dict[str, Any]] = []
    for server_round, path in enumerate(weights, start=1):
        recent = [*recent, load_file(str(path))][-average:]
        load_adapter_state(loaded.model, {k: sum(s[k] for s in recent) / len(recent) for k in recent[0]})
        score(loaded)
        recorded = federation["rounds"][server_round - 1].get("val_overall", {}).get("macro_f1")
        mine = curves["val"][-1]["mean_macro_f1"]
        print(
            f"round {server_round}: val mean macro-F1 {mine:.4f} (recorded "
            f"{'none' if recorded is None else f'{recorded:.4f}'}), "
            f"test pooled macro-F1 {curves['test'][-1]['pooled_macro_f1']:.4f}",
            file=sys.stderr,
            flush=True,
        )
    recorded_curve = [r.get("val_overall", {}).get("macro_f1") for r in federation["rounds"]]
    # a round no region evaluated has no recorded score to compare with; an averaged model was never recorded
    mismatch: float | None = max(
        (abs(a["mean_macro_f1"] - b) for a, b in zip(curves["val"], recorded_curve, strict=True) if b is not None),
        default=0.0,
    )
    if average > 1:
        mismatch = None
    choices, best_test = _table(curves, cfg.early_stopping.min_delta, "round")
    spread = f"{mismatch:.2g}" if mismatch is not None else "not compared (averaged models)"
    print(f"the run kept round {federation['best_round']}; largest |mine − recorded| val mean macro-F1 {spread}")
    suffix = f" --average {average}" if average > 1 else ""
    return {
        "command": f"python -m benchmarks.bench_selection {run}{suffix}",
        "average": average,
        "run_dir": str(run),
        "kept_round": federation["best_round"],
        "early_stopping_metric": cfg.early_stopping.metric,
        "recorded_val_mismatch": mismatch,
        "choices": choices,
        "best_test_round": best_test,
        "curves": curves,
    }


if __name__ == "__main__":
    sys.exit(main())
