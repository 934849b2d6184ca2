"""Building a run's ``Summary`` (common.runfiles) from what the server recorded and what the baselines scored.

Deployment (``fedlocale deploy``) and simulation (``fedlocale simulate``) both fill the summary here, so the two
cannot write different shapes; ``fedlocale personalize`` adds its results with ``with_personalized``.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from common import keys
from common.config import RunConfig
from common.data import RegionData, json_lines
from common.errors import InputError
from common.metrics import pooled_macro_f1, weighted_mean
from common.runfiles import CONFUSION, KEPT_CHECKPOINT, METRICS_FILE, POOLED, Summary

SCORES = ("accuracy", "macro_f1")  # what the summary keeps of each mode's scores, beside CONFUSION


def _overall(per_region: dict[str, dict[str, Any]], sizes: dict[str, float]) -> dict[str, float]:
    """Test-size weighted means over the regions scored; none when none of them has a test example (a mean of
    nothing is no 0). ``sizes``: every region of the run's test size.

    ``POOLED`` too when the mode scored every region of the run that has test examples, each with its confusion
    matrix (a simulation's; a deployment's server never sees one): a pooled score over fewer regions than
    another mode's would not compare with it."""
    tested = {r: v for r, v in per_region.items() if sizes.get(r)}
    if not tested:
        return {}
    out = {metric: weighted_mean({r: v[metric] for r, v in tested.items()}, sizes) for metric in SCORES}
    everywhere = set(tested) == {r for r, n in sizes.items() if n}
    if everywhere and all(CONFUSION in v for v in tested.values()):
        out[POOLED] = pooled_macro_f1([v[CONFUSION] for v in tested.values()])
    return out


def _pick(scores: dict[str, Any] | None) -> dict[str, Any]:
    return {k: scores[k] for k in (*SCORES, CONFUSION, KEPT_CHECKPOINT) if k in scores} if scores else {}


def dp_by_region(rounds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per region whose node trains with DP-SGD (its policy's require_dp): the epsilon it reported spent after
    each round it sent, the last of them, its delta, and which served models the guarantee covers."""
    out: dict[str, dict[str, Any]] = {}
    for record in rounds:
        for region, train in record["train"].items():
            if "dp_epsilon" not in train:
                continue
            entry = out.setdefault(region, {"by_round": {}})
            entry["by_round"][str(record["round"])] = train["dp_epsilon"]
            entry["epsilon_spent"] = train["dp_epsilon"]
            entry["delta"] = train.get("dp_delta")
    for entry in out.values():
        # the federated model is post-processing of DP-SGD updates; a personalized model is covered only once
        # it was trained under personalize.dp (with_personalized says so), else it trained on the region's data
        # again without DP (docs/privacy.md)
        entry["covers"] = {keys.FEDERATED: True, keys.PERSONALIZED: False}
    return out


def build_summary(
    cfg: RunConfig,
    data: dict[str, RegionData] | None,
    federation: dict[str, Any],
    baselines: dict[str, tuple[dict[str, dict[str, Any]], float]],
    federated_s: float,
    config_path: str,
    audit: dict[str, Any] | None = None,
    federated_confusion: dict[str, list[list[int]]] | None = None,
    baselines_s: float | None = None,
) -> Summary:
    """The summary of a run: per region and overall scores of every mode, communication and timing.

    ``data`` is None for a deployment, whose server never sees the regions' data: region sizes then come from
    the replies' ``num-examples`` (train and test), and validation sizes stay unknown. A simulation gives
    each region's ``federated_confusion`` (the global model's test confusion matrix; the baselines' scores carry
    theirs), and the overall scores then include ``POOLED``.
    """
    confusions = federated_confusion or {}
    federated = {
        name: {**scores, **({CONFUSION: confusions[name]} if name in confusions else {})}
        for name, scores in federation["test"].items()
    }
    modes = {keys.FEDERATED: federated, **{name: scores for name, (scores, _) in baselines.items()}}
    counts: dict[str, dict[str, Any]]
    if data is None:
        # a secure round's train lines hold a DP region's privacy spent, never its example count
        trained = {
            r: v["num_examples"] for rnd in federation["rounds"] for r, v in rnd["train"].items() if "num_examples" in v
        }
        counts = {
            name: {"num_test": int(s["num_examples"]), **({"num_train": trained[name]} if name in trained else {})}
            for name, s in federation["test"].items()
        }
    else:
        counts = {
            name: {
                "num_train": len(region.train),
                "num_val": len(region.val),
                **({"val_carved_from_train": region.val_carved} if region.val_carved else {}),
                "num_test": len(region.test),
                "dropped": region.dropped,
            }
            for name, region in data.items()
        }
    sizes = {name: float(c["num_test"]) for name, c in counts.items()}
    # a region without test examples has no scores: the 0.0 an empty evaluation returns would read as a result
    regions = {
        name: {
            **c,
            **{mode: _pick(scores.get(name)) for mode, scores in modes.items() if name in scores and sizes[name]},
        }
        for name, c in counts.items()
    }
    for name, dp in dp_by_region(federation["rounds"]).items():
        if name in regions:
            regions[name]["dp"] = dp
    per_round = [
        {k: r[k] for k in ("round", "bytes_up", "bytes_down", "participants", "missing", "rejected")}
        for r in federation["rounds"]
    ]
    return Summary(
        run={
            "name": cfg.name,
            "seed": cfg.seed,
            "config": config_path,
            "model": cfg.model.base,
            "aggregation": cfg.aggregation.method,
            "server_lr": cfg.aggregation.optimizer_settings()["server_lr"],
            "optimizer": {"name": cfg.aggregation.optimizer, **cfg.aggregation.optimizer_settings()},
            "rounds_planned": cfg.rounds,
            "rounds_done": len(federation["rounds"]),
            "best_round": federation["best_round"],
            "stopped_early": federation["stopped_early"],
            # the rounds whose global model was validated (all of them unless early_stopping.every > 1)
            "validated_rounds": [r["round"] for r in federation["rounds"] if r.get("validated", True)],
        },
        regions=regions,
        overall={
            mode: overall
            for mode, scores in modes.items()
            if (overall := _overall({r: v for r, v in scores.items() if r in sizes}, sizes))
        },
        communication={
            "adapter_bytes": federation["adapter_bytes"],
            "full_model_bytes": federation["full_model_bytes"],
            "bytes_up_total": sum(r["bytes_up"] for r in per_round),
            "bytes_down_total": sum(r["bytes_down"] for r in per_round),
            "per_round": per_round,
        },
        timing={
            "federated_s": federated_s,
            "federation_loop_s": federation["seconds"],
            **{f"{name}_s": seconds for name, (_, seconds) in baselines.items()},
            # the baselines' phase as it passed: less than their sum when they trained side by side
            **({"baselines_s": baselines_s} if baselines_s is not None else {}),
        },
        audit=audit,
    )


def served_vs_local_only(served: str, difference: dict[str, Any]) -> dict[str, Any]:
    """A region's ``served_vs_local_only`` entry: which model it serves (``global``, ``personalized`` or
    ``local_only``), the paired-bootstrap difference served − local-only in test macro-F1 (``diff``, ``low``,
    ``high``, ``resamples``, ``level``: ``client.personalize.Difference.to_json``), and ``reaches_zero``: whether
    the interval reaches 0 or above (False: local-only is better with that confidence)."""
    return {"served": served, **difference, "reaches_zero": bool(difference["high"] >= 0.0)}


def with_served_vs_local_only(summary: Summary, entries: dict[str, dict[str, Any]]) -> Summary:
    """``summary`` with each region's ``served_vs_local_only`` entry (``served_vs_local_only``) put in (a new
    Summary)."""
    regions = copy.deepcopy(dict(summary.regions))
    for name, entry in entries.items():
        regions[name][keys.SERVED_VS_LOCAL_ONLY] = entry
    return dataclasses.replace(summary, regions=regions)


def with_personalized(summary: Summary, entries: dict[str, dict[str, Any]]) -> Summary:
    """``summary`` with each region's personalization result and the overall personalized scores put in (a new
    Summary; the one given is left as it was).

    A DP region's ``dp`` says whether its personalized model is covered (``covers.personalized``: trained under
    personalize.dp) and then holds the epsilon spent after the personalization (``epsilon_spent``) beside the
    rounds' (``epsilon_rounds``). A region's ``served_vs_local_only`` follows its new choice: its
    personalization's test A/B against local-only when that ran, else none (an entry of an earlier choice would
    describe a model no longer served)."""
    regions = copy.deepcopy(dict(summary.regions))
    for name, entry in entries.items():
        regions[name][keys.PERSONALIZED] = entry
        against = entry.get("ab", {}).get(f"vs_{keys.LOCAL_ONLY}")
        if isinstance(against, dict):
            regions[name][keys.SERVED_VS_LOCAL_ONLY] = served_vs_local_only(str(entry.get("chosen")), against)
        else:
            regions[name].pop(keys.SERVED_VS_LOCAL_ONLY, None)
        dp = regions[name].get("dp")
        if isinstance(dp, dict):
            # a DP region: its personalized model is covered only when trained under personalize.dp, and then
            # the epsilon spent is the run's total on its node, the rounds' and the personalization's
            personal = entry.get("dp")
            covered = isinstance(personal, dict) and bool(personal.get("covered"))
            dp["covers"] = {**dp.get("covers", {keys.FEDERATED: True}), keys.PERSONALIZED: covered}
            if covered and isinstance(personal, dict):
                dp["epsilon_rounds"] = personal["epsilon_rounds"]
                dp["epsilon_spent"] = personal["epsilon_spent"]
                dp["personalize_steps"] = personal["steps"]
    sizes = {name: float(region["num_test"]) for name, region in regions.items()}
    personalized = _overall(dict(entries), sizes)
    overall = {**copy.deepcopy(dict(summary.overall)), **({keys.PERSONALIZED: personalized} if personalized else {})}
    timing = {**summary.timing, "personalize_s": sum(e["seconds"] for e in entries.values())}
    return dataclasses.replace(summary, regions=regions, overall=overall, timing=timing)


# A metrics.jsonl line's values that have a fixed range: the share-valued scores, the DP record's delta
_UNIT_INTERVAL = ("accuracy", "macro_f1", "dp_delta")
_LINE_KEYS = {"round": int, "region": str, "split": str}


def metric_line_problems(record: dict[str, Any]) -> list[str]:
    """What is wrong with one metrics.jsonl line (server.federation.MetricsWriter's shape): ``round`` a whole
    number >= 0, ``region`` and ``split`` names, every other value a number (a loss may be NaN: a diverged run
    writes it), shares in [0, 1], ``num_examples`` a whole number >= 0."""
    problems = []
    for key, kind in _LINE_KEYS.items():
        value = record.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or value == "":
            problems.append(f"{key}: expected {'a whole number' if kind is int else 'a name'}, got {value!r}")
    if isinstance(record.get("round"), int) and record["round"] < 0:
        problems.append(f"round: must be >= 0, got {record['round']}")
    for key, value in record.items():
        if key in _LINE_KEYS:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool):
            problems.append(f"{key}: expected a number, got {value!r}")
        elif key in _UNIT_INTERVAL and not 0.0 <= value <= 1.0:
            problems.append(f"{key}: must be in [0, 1], got {value!r}")
        elif key == "num_examples" and (not isinstance(value, int) or value < 0):
            problems.append(f"num_examples: expected a whole number >= 0, got {value!r}")
    return problems


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The lines of RUN_DIR/metrics.jsonl (none when the file is absent); an ``InputError`` listing every line
    that is not a JSON object of the writer's shape (``metric_line_problems``; ``file:line: reason``) when it is
    damaged."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")  # bad bytes are named by line below
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err})") from err
    records: list[dict[str, Any]] = []
    problems: dict[int, list[str]] = {}  # line number -> what is wrong with it (a line may have several problems)
    # json_lines names a line that is not UTF-8, not JSON or not an object as every data reader does
    for number, row in json_lines(text.splitlines()):
        if isinstance(row, str):
            problems[number] = [row]
        elif wrong := metric_line_problems(row):
            problems[number] = wrong
        else:
            records.append(row)
    if problems:
        listed = "\n".join(f"  - {path}:{n}: {p}" for n, wrong in problems.items() for p in wrong)
        raise InputError(f"{path}: {len(problems)} damaged line(s):\n{listed}")
    return records
