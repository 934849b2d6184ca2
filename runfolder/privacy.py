"""``fedlocale audit privacy``: the membership-inference audit of a run folder, per region and per model that
leaves or is served, written to summary.json (section ``privacy``) and RUN_DIR/audit/privacy-report.md.

Per region the audited models are: ``global`` (the run's global adapter, ``adapter/``: the best round's, what
the server and every region keep), ``served`` (what the region serves: its personalized adapter when the run
chose it, else the global; ``runfolder.export.choose_adapter`` decides, as for export), and ``update`` (with
``audit.keep_updates``: the region's own reply of the last round, i.e. its update applied to the previous global
adapter, which is what an honest-but-curious server sees). Members are the region's training records exactly as
its node trained on them (``client.pipeline.node_data``: redacted, val carved from train when the region has no
val file); non-members its test split. The references are the global adapters of the rounds before the delivered
one, from ``checkpoints/`` (docs/audit.md says why). The maths is ``client.membership.audit_scored``, which a node
runs too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.canaries import Canary, exposures, make_canaries
from client.membership import (
    LOW_FPRS,
    MEANING_TEXT,
    REFERENCE,
    Predictor,
    RegionAudit,
    RegionRecords,
    Scored,
    audit_records,
    audit_scored,
    fmt_number,
    record_logp,
    results_table,
    score,
    swap_state,
)
from client.pipeline import node_data
from common.config import RunConfig, load_config
from common.errors import ConfigError, InputError
from common.model import adapter_state
from common.policy import load_policy
from common.runfiles import (
    ADAPTER_DIR,
    AUDIT_DIR,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    PRIVACY_PLOT,
    PRIVACY_REPORT_FILE,
    ROUND_PREFIX,
    UPDATE_SUFFIX,
    UPDATES_DIR,
    Summary,
    read_summary,
    round_name,
    write_atomic,
)
from common.seeds import derive_seed
from runfolder.export import DAMAGED_MODEL_ERRORS, ExportError, RunInfo, choose_adapter, load_exported

GLOBAL_MODEL, SERVED_MODEL, UPDATE_MODEL = "global", "served", "update"
MODEL_TEXT = {
    GLOBAL_MODEL: "global adapter",
    SERVED_MODEL: "served model",
    UPDATE_MODEL: "own last update",
}
DEFAULT_BOOTSTRAP = 1000
INITIAL_ROUND = 0
WEIGHTS = "adapter_model.safetensors"  # peft's weights file in adapter/ and checkpoints/round-NNN/


class PrivacyAuditError(InputError):
    """A run folder the privacy audit cannot use; the message says what is missing and where."""


# whose shape a reference round's or a kept update's adapter must have to be swapped in (``swap_state``)
_SHAPE = "this run's"


@dataclass(frozen=True)
class PrivacyAudit:
    """The audit of a run: per region its result, which model it serves, and how the audit was made."""

    regions: dict[str, RegionAudit]
    served: dict[str, str]  # region → global | personalized
    references: list[str]  # the reference models, as run-folder paths
    bootstrap: int
    seed: int
    seconds: float
    canaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # region → model → exposure numbers
    # region → (model → its scores, each reference's scores): kept in memory only, for comparing reference sets
    # (benchmarks/bench_privacy.py); never written
    scores: dict[str, tuple[dict[str, Scored], list[Scored]]] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The ``privacy`` section of summary.json: aggregate numbers only."""
        regions: dict[str, Any] = {}
        for name, result in self.regions.items():
            regions[name] = {**result.to_json(), "served": self.served[name]}
            if name in self.canaries:
                regions[name]["canaries"] = self.canaries[name]
        return {
            "references": list(self.references),
            "bootstrap": self.bootstrap,
            "seed": self.seed,
            "seconds": round(self.seconds, 1),
            "regions": regions,
        }


def _rounds(run_dir: Path) -> tuple[int, int, list[int]]:
    """The last round kept in checkpoints/, the round the global adapter (``adapter/``: the best round's) is, and
    every round before that one (the references); refuses a run without an earlier round."""
    folder = run_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        raise PrivacyAuditError(
            f"{folder}: no such folder; the reference attack calibrates against earlier rounds' global adapters, "
            "which a run keeps in checkpoints/"
        )
    rounds = sorted(
        int(p.name.removeprefix(ROUND_PREFIX))
        for p in folder.iterdir()
        if p.is_dir() and p.name.startswith(ROUND_PREFIX) and p.name.removeprefix(ROUND_PREFIX).isdigit()
    )
    if not rounds:
        raise PrivacyAuditError(f"{folder}: holds no round; did the run finish?")
    weights = (run_dir / ADAPTER_DIR / WEIGHTS).read_bytes() if (run_dir / ADAPTER_DIR / WEIGHTS).is_file() else None
    # the run's global adapter is its best round's (early stopping keeps it), not necessarily the last round's
    same = [r for r in rounds if weights is not None and _weights(folder / round_name(r)) == weights]
    adapter_round = same[-1] if same else rounds[-1]
    # round 0 is the initial global adapter (the run's seed; it never saw any data): the reference when the
    # delivered adapter is round 1's
    earlier = [r for r in rounds if r < adapter_round] or [INITIAL_ROUND]
    return rounds[-1], adapter_round, earlier


def pick_references(run_dir: Path, earlier: Sequence[int], rounds: Sequence[int] | None, count: int) -> list[int]:
    """The reference rounds: ``rounds`` when given (each must be one of ``earlier``), else the ``count`` latest of
    ``earlier`` (the rounds before the delivered adapter's), which are the strongest references."""
    chosen = list(rounds) if rounds is not None else list(earlier[-count:])
    missing = [r for r in chosen if r not in earlier]
    if missing or not chosen:
        raise PrivacyAuditError(
            f"{run_dir / CHECKPOINTS_DIR}: reference round(s) {missing or chosen} not among the earlier rounds kept "
            f"({', '.join(map(str, earlier))})"
        )
    return chosen


def _weights(folder: Path) -> bytes | None:
    path = folder / WEIGHTS
    return path.read_bytes() if path.is_file() else None


def read_run_config(run_dir: Path) -> RunConfig:
    """RUN_DIR/config.yaml, which says where each region's data is and how its node read it."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise PrivacyAuditError(
            f"{path}: no such file; the audit reads each region's data as the run's config names it (a simulation "
            "run folder has it; on a deployed node run `fedlocale audit node` there, see docs/audit.md)"
        )
    return load_config(path)


def check_run(run_dir: Path, regions: Sequence[str] | None) -> tuple[RunInfo, RunConfig, list[str]]:
    """Everything the audit refuses, before any model loads: not a run folder, unknown regions, no global adapter,
    no earlier checkpoints. Returns the run, its config and the regions to audit (all when ``regions`` is empty)."""
    if not run_dir.is_dir():
        raise PrivacyAuditError(f"{run_dir}: no such folder (expected a run folder, e.g. runs/demo)")
    run = RunInfo(dir=run_dir, summary=read_summary(run_dir), config={})
    cfg = read_run_config(run_dir)
    known = list(cfg.region_names)
    unknown = [r for r in regions or () if r not in known]
    if unknown:
        raise PrivacyAuditError(
            f"{run_dir}: no region {', '.join(map(repr, unknown))} in this run (regions: {', '.join(known)})"
        )
    if not (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        raise PrivacyAuditError(f"{run_dir / ADAPTER_DIR}: no global adapter; did the run finish?")
    _rounds(run_dir)
    return run, cfg, list(dict.fromkeys(regions)) if regions else known


def region_records(cfg: RunConfig, name: str) -> RegionRecords:
    """The region's records through the node's own pipeline (redacted, val carved as its node carved it; not
    augmented: augmented copies are not records of people), members and non-members matched per label
    (``client.membership.audit_records``)."""
    region = next(r for r in cfg.regions if r.name == name)
    try:
        policy = load_policy(region.policy) if region.policy else None
    except ConfigError as err:
        raise PrivacyAuditError(f"region {name}: its policy does not load: {err}") from err
    data = node_data(name, region.data, cfg.labels, policy, seed=cfg.seed, settings=cfg.data).data
    if not data.train or not data.test:
        raise PrivacyAuditError(
            f"region {name}: {len(data.train)} training and {len(data.test)} test records; the audit needs both"
        )
    return audit_records(name, data.train, data.test, cfg.seed)


def _load(folder: Path, max_length: int) -> Predictor:
    loaded = load_exported(folder, max_length)
    return Predictor(loaded.model, loaded.tokenizer, loaded.max_length)


def _score(p: Predictor, records: RegionRecords, batch_size: int) -> Scored:
    return score(p, records.members, records.nonmembers, batch_size)


def _exposures(predictor: Predictor, canaries: Sequence[Canary], batch_size: int) -> dict[str, Any]:
    """The model's exposure of the region's canaries (``client.canaries.exposures``)."""
    return exposures(
        lambda examples: record_logp(
            predictor.model, predictor.tokenizer, examples, max_length=predictor.max_length, batch_size=batch_size
        ),
        canaries,
    )


def kept_update(run_dir: Path, final_round: int, region: str) -> Path | None:
    """The region's last kept update (audit.keep_updates), None when the run did not keep it."""
    path = run_dir / AUDIT_DIR / UPDATES_DIR / round_name(final_round) / f"{region}{UPDATE_SUFFIX}"
    return path if path.is_file() else None


def _checkpoint_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = folder / WEIGHTS
    if not path.is_file():
        raise PrivacyAuditError(f"{path}: no such file; the reference round's global adapter is missing")
    try:
        return load_file(str(path))
    except DAMAGED_MODEL_ERRORS as err:
        raise PrivacyAuditError(f"{path}: damaged adapter weights ({err})") from err


def _initial_state(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The global adapter the run started from: built from its seed as the server builds it (zero LoRA update,
    the seeded initial head)."""
    from common.model import build_model

    return adapter_state(build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed).model)


def _update_state(update: Path) -> dict[str, torch.Tensor]:
    from server.audit import load_kept

    arrays, _ = load_kept(update)
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def audit_privacy(
    run_dir: Path,
    regions: Sequence[str] | None = None,
    *,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    reference_rounds: Sequence[int] | None = None,
    reference_count: int | None = None,
    say: Callable[[str], None] = print,
    clock: Callable[[], float] = time.perf_counter,
) -> PrivacyAudit:
    """The membership-inference audit of ``run_dir`` for ``regions`` (all when empty); writes nothing.

    Each model loads once and scores every audited region's records (the global adapter and the references are
    the same for all regions). ``reference_rounds`` picks the checkpoints used as references; by default they
    are the ``reference_count`` (default: the run's ``audit.references``) rounds just before the global
    adapter's, or round 0, the initial adapter, when there is none.
    """
    start = clock()
    run, cfg, names = check_run(run_dir, regions)
    final, adapter_round, earlier = _rounds(run_dir)
    count = reference_count if reference_count is not None else cfg.audit.references
    chosen = pick_references(run_dir, earlier, reference_rounds, count)
    records = {name: region_records(cfg, name) for name in names}
    size = cfg.train.eval_batch_size
    length = cfg.model.max_length
    say(
        f"privacy audit: {len(names)} region(s); global adapter: round {adapter_round}; "
        f"references: rounds {', '.join(map(str, chosen))}"
    )
    global_dir = run_dir / ADAPTER_DIR
    predictor = _load(global_dir, length)  # the global model; earlier rounds and kept updates are swapped into it
    final_state = adapter_state(predictor.model)  # type: ignore[arg-type]
    global_scores = {name: _score(predictor, records[name], size) for name in names}
    canaries = {name: make_canaries(name, cfg.audit.canaries, len(cfg.labels), cfg.seed) for name in names}
    exposed: dict[str, dict[str, Any]] = {name: {} for name in names if canaries[name]}
    for name in exposed:
        exposed[name][GLOBAL_MODEL] = _exposures(predictor, canaries[name], size)
    refs: dict[str, list[Scored]] = {name: [] for name in names}
    for r in chosen:
        folder = run_dir / CHECKPOINTS_DIR / round_name(r)
        state = _initial_state(cfg) if r == INITIAL_ROUND else _checkpoint_state(folder)
        swap_state(predictor, state, folder, PrivacyAuditError, _SHAPE)
        for name in names:
            refs[name].append(_score(predictor, records[name], size))
    updates: dict[str, Scored] = {}
    for name in names:
        update = kept_update(run_dir, final, name)
        if update is not None:
            swap_state(predictor, _update_state(update), update, PrivacyAuditError, _SHAPE)
            updates[name] = _score(predictor, records[name], size)
            if name in exposed:
                exposed[name][UPDATE_MODEL] = _exposures(predictor, canaries[name], size)
    swap_state(predictor, final_state, global_dir, PrivacyAuditError, _SHAPE)
    results: dict[str, RegionAudit] = {}
    served: dict[str, str] = {}
    kept: dict[str, tuple[dict[str, Scored], list[Scored]]] = {}
    for name in names:
        targets = {GLOBAL_MODEL: global_scores[name]}
        try:
            choice = choose_adapter(run, name)
        except ExportError as err:
            raise PrivacyAuditError(str(err)) from err
        served[name] = choice.kind
        if choice.path == global_dir:
            targets[SERVED_MODEL] = global_scores[name]
            if name in exposed:
                exposed[name][SERVED_MODEL] = exposed[name][GLOBAL_MODEL]
        else:
            served_model = _load(choice.path, length)
            targets[SERVED_MODEL] = _score(served_model, records[name], size)
            if name in exposed:
                exposed[name][SERVED_MODEL] = _exposures(served_model, canaries[name], size)
        if name in updates:
            targets[UPDATE_MODEL] = updates[name]
        results[name] = audit_scored(
            name, targets, refs[name], bootstrap=bootstrap, seed=derive_seed(cfg.seed, "privacy-audit", name) % 2**32
        )
        kept[name] = (targets, refs[name])
        say(_line(results[name]))
    return PrivacyAudit(
        regions=results,
        served=served,
        references=[
            "initial global adapter (round 0)" if r == INITIAL_ROUND else f"{CHECKPOINTS_DIR}/{round_name(r)}"
            for r in chosen
        ],
        bootstrap=bootstrap,
        seed=cfg.seed,
        seconds=clock() - start,
        canaries=exposed,
        scores=kept,
    )


def _line(result: RegionAudit) -> str:
    cells = []
    for model, attacks in result.results.items():
        ref = attacks[REFERENCE]
        cells.append(f"{model} AUC {ref.auc:.3f} [{ref.auc_low:.3f}, {ref.auc_high:.3f}]")
    return f"  {result.region}: {result.members} members / {result.nonmembers} non-members; " + "; ".join(cells)


def with_privacy(summary: Summary, audit: PrivacyAudit) -> Summary:
    """``summary`` with its ``privacy`` section replaced by ``audit`` (regions not audited this time are kept)."""
    import dataclasses

    section = audit.to_json()
    before = summary.privacy or {}
    kept = {k: v for k, v in dict(before.get("regions", {})).items() if k not in section["regions"]}
    section["regions"] = {**kept, **section["regions"]}
    return dataclasses.replace(summary, privacy=section)


# ------------------------------------------------------------------------------------------------ the report


def render_report(audit: PrivacyAudit) -> str:
    """The Markdown report: a table per region (model × attack) and its ROC plot, then what the numbers mean."""
    lines = [
        "# Privacy audit: membership inference per region",
        "",
        f"References: {', '.join(audit.references)} (earlier rounds' global adapters); bootstrap "
        f"{audit.bootstrap} resamples; {audit.seconds:.0f} s.",
        "",
    ]
    for name, result in audit.regions.items():
        lines += [
            f"## {name}",
            "",
            f"{result.members} members (training records) and {result.nonmembers} non-members (test records); "
            f"serves the {audit.served[name]} model.",
            "",
            *results_table(result, MODEL_TEXT),
        ]
        if result.nonmembers < 1 / LOW_FPRS[1]:
            lines += [
                "",
                f"TPR at 0.1 % FPR: n/a, {result.nonmembers} non-members resolve FPRs down to "
                f"{100 / result.nonmembers:.2g} % only (it needs at least {int(1 / LOW_FPRS[1])}).",
            ]
        if name in audit.canaries:
            lines += [
                "",
                "Canaries inserted into this region's training data: exposure in bits (0: the true secret ranks "
                "like a random one; the maximum: it ranks first among its candidates).",
                "",
                "| model | canaries | mean exposure | max exposure | ranked first | maximum possible |",
                "|---|---|---|---|---|---|",
            ]
            for model, n in audit.canaries[name].items():
                lines.append(
                    f"| {MODEL_TEXT.get(model, model)} | {n['canaries']} | {n['mean_exposure']:.2f} | "
                    f"{n['max_exposure']:.2f} | {n['ranked_first']} | {n['max_possible']:.2f} |"
                )
        lines += ["", f"![ROC of {name}]({PRIVACY_PLOT.format(name)})", ""]
    return "\n".join(lines) + "\n" + MEANING_TEXT


def _plot_roc(path: Path, result: RegionAudit) -> None:
    """Log-log ROC of each model and attack, with the chance diagonal (as LiRA and RMIA plot them)."""
    from runfolder.report import new_figure, save_figure

    fig, ax = new_figure(6.0, 5.0)
    floor = 1.0 / max(result.nonmembers, 1) / 2
    grid = np.logspace(np.log10(floor), 0, 50)
    ax.plot(grid, grid, color="grey", linestyle=":", label="chance")
    for color, (model, attacks) in enumerate(result.results.items()):
        for attack_name, r in attacks.items():
            style = "-" if attack_name == REFERENCE else "--"  # one colour per model, one line style per attack
            ax.plot(
                np.maximum(r.fpr_curve, floor),
                np.maximum(r.tpr_curve, floor),
                linestyle=style,
                color=f"C{color}",
                label=f"{MODEL_TEXT.get(model, model)}, {attack_name} (AUC {fmt_number(r.auc)})",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_title(f"{result.region}: membership inference ROC", fontsize=13)
    ax.set_xlabel("false-positive rate", fontsize=11)
    ax.set_ylabel("true-positive rate", fontsize=11)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def write_privacy_report(run_dir: Path, audit: PrivacyAudit) -> Path:
    """Write RUN_DIR/audit/privacy-report.md and one log-log ROC plot per region; return the report's path."""
    folder = run_dir / AUDIT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, result in audit.regions.items():
        _plot_roc(folder / PRIVACY_PLOT.format(name), result)
    return write_atomic(folder / PRIVACY_REPORT_FILE, render_report(audit))


def region_table(section: Mapping[str, Any]) -> list[tuple[str, str, str, float | None, float | None]]:
    """Rows (region, model, attack, AUC, TPR at 1 % FPR) of a summary.json ``privacy`` section."""
    rows = []
    for region, body in dict(section.get("regions", {})).items():
        for model, attacks in dict(body.get("models", {})).items():
            for attack_name, numbers in dict(attacks).items():
                rows.append((region, model, attack_name, numbers.get("auc"), numbers.get("tpr_at_fpr", {}).get("0.01")))
    return rows
